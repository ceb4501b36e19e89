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
from dqnc.qnet.spec import QNetSpec
from dqnc.qnet.weights import plain_mlp_weights as mlp_weights  # the one extractor; old name kept
# Opening .tflite files moved to dqnc.runtimes; these names stay for their callers.
from dqnc.runtimes.c import c_policy  # noqa: F401
from dqnc.runtimes.litert import MODULES as RUNTIME_MODULES  # noqa: F401
from dqnc.runtimes.litert import probe_tflite, tflite_policy


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
    shape = tuple(int(d) for d in getattr(pol, "input_shape", ())[1:])
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


def runtime_q_function(artifact: Artifact, runtime: str) -> QFunction:
    """The artifact's .tflite run by a registered runtime (:mod:`dqnc.runtimes`: litert, tflite-runtime, tflm, c, ...)."""
    from dqnc.errors import UsageError
    from dqnc.runtimes import get, open_policy

    get(runtime)  # an unknown name is refused before anything is read
    if artifact.kind != "tflite":
        raise UsageError(f"--runtime {runtime} runs .tflite models; {str(artifact.path)!r} is a SavedModel: "
                         "quantize or export it first")
    if not artifact.manifest.get("files"):
        probe_tflite(artifact.model_path)
    pol = open_policy(runtime, artifact, artifact.manifest)
    _check_tflite_io(pol, artifact.env, str(artifact.path))
    return pol


def _sidecar_q_function(artifact: Artifact, path: Path) -> QFunction:
    where = str(artifact.path)
    try:
        spec = QNetSpec.from_sidecar(path)
        net = load_conv(path) if spec.family == "conv" else load_mlp(path)
    except (ValueError, OSError, KeyError) as e:
        raise ArtifactError(f"{where}: {e}; re-create the artifact") from None
    if spec.family == "conv":
        check_image_env(spec.obs_shape, artifact.env, where)
    _check_dims(spec.obs_dim, spec.n_actions, artifact.env, where, spec.obs_shape, (spec.n_actions,))
    return net


def q_function(artifact: Artifact, model: Any | None = None, runtime: str = "auto") -> QFunction:
    """A batched Q-function for any artifact, using the lightest runtime that can serve it
    (or, for a .tflite, the named ``runtime``, one of :func:`dqnc.runtimes.names`)."""
    where = str(artifact.path)
    if runtime != "auto":
        return runtime_q_function(artifact, runtime)
    if artifact.kind == "tflite":
        if not artifact.manifest.get("files"):  # no checksums vouch for this file
            probe_tflite(artifact.model_path)
        pol = tflite_policy(artifact.model_path, artifact.manifest)
        _check_tflite_io(pol, artifact.env, where)
        return pol
    files = artifact.manifest.get("files", {})
    sidecar = next((n for n in (CONV_FILE, MLP_FILE) if files.get(n) and (artifact.path / n).is_file()), None)
    if model is None and sidecar is not None:  # dqnc's own weights: a numpy forward, no TensorFlow
        return _sidecar_q_function(artifact, artifact.path / sidecar)
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
