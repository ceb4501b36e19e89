"""Turn any artifact into a Q-function ``obs[N, d] -> q[N, n]`` for rollouts.

- ``.tflite`` models run in LiteRT (or tflite-runtime): no TensorFlow import.
- dqnc SavedModel artifacts carry ``mlp.npz`` (the same weights) and run as a numpy forward
  pass: no TensorFlow import either.
- Any other tf_keras SavedModel is rebuilt from its checked config (``dqnc.savedmodel``: no code
  stored in it runs) and called once per batch.

Shapes are checked against the env before any episode runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dqnc.artifact import Artifact
from dqnc.envs import EnvSpec, QFunction, image_layout
from dqnc.errors import ArtifactError
from dqnc.nets import MLP_FILE, NumpyMLP, load_mlp
from dqnc.nets_conv import CONV_FILE, load_conv


def load_keras_model(path: Path) -> Any:
    """A tf_keras SavedModel as a tf_keras model, read as data (:mod:`dqnc.savedmodel`): its layers
    are checked against the built-in ones dqnc supports, the model is rebuilt from the checked
    config and its variables are restored from the checkpoint. No code stored in the directory
    (a ``Lambda``'s bytecode, a custom class, a restore-time initializer) ever runs."""
    from dqnc.savedmodel import load_keras_model as load

    return load(Path(path))


def _check_dims(obs_dim: int, n_actions: int, env: EnvSpec, where: str, in_desc: Any, out_desc: Any) -> None:
    if obs_dim != env.obs_dim:
        raise ArtifactError(
            f"{where}: model input shape {in_desc} does not fit env {env.id!r} observations {tuple(env.obs_shape)}: "
            "use the env the model was trained on"
        )
    if n_actions != env.n_actions:
        raise ArtifactError(
            f"{where}: model output shape {out_desc} does not fit env {env.id!r} with {env.n_actions} actions: "
            "use the env the model was trained on"
        )


def check_image_env(model_shape: tuple[int, ...], env: EnvSpec, where: str) -> None:
    """A model that reads images (HWC or CHW) needs an env that gives exactly those images."""
    if not env.is_image or tuple(env.obs_shape) != tuple(model_shape):
        raise ArtifactError(f"{where}: the model reads {'x'.join(map(str, model_shape))} ({image_layout(model_shape)}) images but env "
                            f"{env.id!r} gives {env.obs_layout} observations {tuple(env.obs_shape)}: "
                            "use the image env the model was trained on")


def _check_tflite_io(pol: Any, env: EnvSpec, where: str) -> None:
    shape = tuple(int(d) for d in getattr(pol, "_in_shape", ())[1:])
    if len(shape) == 3:
        check_image_env(shape, env, where)
    _check_dims(pol.obs_dim, pol.n_actions, env, where, (pol.obs_dim,), (pol.n_actions,))


def check_io(model: Any, env: EnvSpec, where: str) -> None:
    if isinstance(model.input_shape, list) or isinstance(model.output_shape, list):
        raise ArtifactError(f"{where}: the model has several inputs or outputs; a Q-network has one of each")
    in_shape, out_shape = tuple(model.input_shape[1:]), tuple(model.output_shape[1:])
    obs_dim = int(np.prod([d if d is not None else -1 for d in in_shape]))
    n_actions = out_shape[0] if len(out_shape) == 1 else -1
    _check_dims(obs_dim, n_actions, env, where, in_shape, out_shape)


def mlp_weights(model: Any) -> tuple[list[np.ndarray], list[str]] | None:
    """Weights and activations if ``model`` is a chain of Dense layers, else None."""
    layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
    if not layers or any(type(l).__name__ != "Dense" for l in layers):
        return None
    acts = [l.get_config().get("activation", "linear") for l in layers]
    if any(a not in ("relu", "tanh", "elu", "sigmoid", "linear") for a in acts) or acts[-1] != "linear":
        return None
    if any(not l.use_bias for l in layers):
        return None
    return [w for l in layers for w in l.get_weights()], acts[:-1]


def tflite_policy(path: Path, manifest: dict[str, Any] | None = None, runtime: str | None = None) -> Any:
    """A runtime.Policy for a .tflite file, with damaged files reported as ArtifactError."""
    from dqnc.runtime import Policy

    try:
        return Policy.from_manifest(str(path), manifest, runtime=runtime)
    except ImportError as e:
        from dqnc.errors import UsageError

        raise UsageError(str(e)) from None
    except (ValueError, RuntimeError, OSError) as e:
        from dqnc.lowbit import decode_refusal

        decode_refusal(path, runtime)  # a LUT-compressed model is not damaged: say which runtime runs it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{str(path)!r} is not a valid TFLite model ({first[:200]}): re-create it with dqnc quantize or export") from None


_PROBE = (
    "import sys, numpy as np\n"
    "from dqnc.runtime import Policy\n"
    "p = Policy(sys.argv[1])\n"
    "p.q_values(np.zeros((1, p.obs_dim), np.float32))\n"
)


def probe_tflite(path: Path) -> None:
    """Load and invoke an unverified .tflite in a child process first.

    TFLite's flatbuffer checks do not catch every corruption: some damaged files abort the
    process (measured: about 1 in 300 random byte flips). A file without a dqnc manifest has no
    checksum to catch that first, so a crash is confined to a child and reported as bad input.
    """
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{str(path)!r}: loading the TFLite model hangs: the file is damaged; re-create it") from None
    if proc.returncode < 0 or proc.returncode > 1:
        raise ArtifactError(f"{str(path)!r} is not a valid TFLite model (the runtime crashed loading it, "
                            f"exit {proc.returncode}): re-create it with dqnc quantize or export")


RUNTIME_MODULES = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}


def runtime_q_function(artifact: Artifact, runtime: str) -> QFunction:
    """The artifact's .tflite run by a named runtime: litert, tflite-runtime, tflm or c."""
    from dqnc.errors import UsageError

    if artifact.kind != "tflite":
        raise UsageError(f"--runtime {runtime} runs .tflite models; {str(artifact.path)!r} is a SavedModel: "
                         "quantize or export it first")
    if not artifact.manifest.get("files"):
        probe_tflite(artifact.model_path)
    content = artifact.model_path.read_bytes()
    if runtime in RUNTIME_MODULES:
        pol = tflite_policy(artifact.model_path, artifact.manifest, runtime=RUNTIME_MODULES[runtime])
    elif runtime == "tflm":
        from dqnc import tflm

        pol = tflm.policy(content, artifact.manifest)
    elif runtime == "c":
        pol = c_policy(artifact, content)
    else:
        raise UsageError(f"unknown runtime {runtime!r}: use litert, tflite-runtime, tflm or c")
    _check_tflite_io(pol, artifact.env, str(artifact.path))
    return pol


def c_policy(artifact: Artifact, content: bytes) -> Any:
    """The bundle's policy.c compiled for the host (generated from the model where the artifact has none)."""
    import tempfile

    from dqnc import cpolicy
    from dqnc.errors import UsageError
    from dqnc.runtime import Policy

    mlp = cpolicy.extract(content)
    if isinstance(mlp, str):
        raise UsageError(f"--runtime c: no C policy for this model: {mlp}")
    if cpolicy.host_compiler() is None:
        raise UsageError("--runtime c needs a host C compiler (cc, gcc or clang): install one, e.g. apt-get install gcc")
    work = Path(tempfile.mkdtemp(prefix="dqnc-cpolicy-"))
    if (artifact.path / cpolicy.SOURCE).is_file() and (artifact.path / cpolicy.HEADER).is_file():
        src = artifact.path
    else:
        pre = artifact.manifest.get("preprocess") or {}
        lite = Policy(model_content=content, obs_mean=pre.get("obs_mean"), obs_std=pre.get("obs_std"))
        cpolicy.write(mlp, lite, artifact.env.action_meanings, work, pre.get("obs_mean"), pre.get("obs_std"))
        src = work
    lib = cpolicy.build_host(src, work)
    return cpolicy.CPolicy(lib, mlp.obs_dim, mlp.n_actions, mlp.output_scale, mlp.output_zero_point)


def q_function(artifact: Artifact, model: Any | None = None, runtime: str = "auto") -> QFunction:
    """A batched Q-function for any artifact, using the lightest runtime that can serve it
    (or, for a .tflite, the named ``runtime``: litert, tflite-runtime, tflm, c)."""
    where = str(artifact.path)
    if runtime != "auto":
        return runtime_q_function(artifact, runtime)
    if artifact.kind == "tflite":
        if not artifact.manifest.get("files"):  # no checksums vouch for this file
            probe_tflite(artifact.model_path)
        pol = tflite_policy(artifact.model_path, artifact.manifest)
        _check_tflite_io(pol, artifact.env, where)
        return pol
    conv_file = artifact.path / CONV_FILE
    if model is None and artifact.manifest.get("files", {}).get(CONV_FILE) and conv_file.is_file():
        try:
            net = load_conv(conv_file)
        except (ValueError, OSError, KeyError) as e:
            raise ArtifactError(f"{where}: {e}; re-create the artifact") from None
        check_image_env(net.obs_shape, artifact.env, where)
        _check_dims(net.obs_dim, net.n_actions, artifact.env, where, net.obs_shape, (net.n_actions,))
        return net
    mlp_file = artifact.path / MLP_FILE
    if model is None and artifact.manifest.get("files", {}).get(MLP_FILE) and mlp_file.is_file():
        try:
            mlp = load_mlp(mlp_file)
        except (ValueError, OSError, KeyError) as e:
            raise ArtifactError(f"{where}: {e}; re-create the artifact") from None
        w0, wl = mlp.layers[0][0], mlp.layers[-1][0]
        _check_dims(w0.shape[0], wl.shape[1], artifact.env, where, (w0.shape[0],), (wl.shape[1],))
        return mlp
    model = model if model is not None else load_keras_model(artifact.model_path)
    in_shape = tuple(int(d) if d is not None else -1 for d in model.input_shape[1:]) \
        if not isinstance(model.input_shape, list) else ()
    if len(in_shape) == 3:
        check_image_env(in_shape, artifact.env, where)
    check_io(model, artifact.env, where)
    mlp_w = mlp_weights(model)
    if mlp_w is not None:
        weights, acts = mlp_w
        return NumpyMLP(weights, acts)
    from dqnc.keras import tf

    t = tf()
    call = t.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda obs: call(t.convert_to_tensor(np.asarray(obs, np.float32).reshape(len(obs), *in_shape))).numpy()
