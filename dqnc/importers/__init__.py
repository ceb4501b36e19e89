"""The import stage: a Q-network made elsewhere -> a verified fp32 dqnc artifact.

One module per format (``keras``, ``onnx``, ``sb3``, ``cleanrl``; ``torchzip`` is the PyTorch
file reader they share, ``torchconv`` reads conv nets from torch tensors), each exposing
``load(path, cfg, spec) -> Source``; :data:`FORMATS` is the registry and :func:`sniff` picks a
format from the file's first bytes. :func:`run` folds the source into a plain dqnc network (an
MLP, or for a pixel policy a conv QNetSpec: input scaling such as ``/255`` folded into the first
kernel, the source's CHW/HWC layout adapted to the env's), writes it exactly as ``train`` does
(SavedModel + weights sidecar + manifest), and refuses (exit 2) unless the artifact's Q-values
match the source's forward on rollout states to ``max_rel_error`` of the Q range with identical
greedy actions. The source's forward is independent of the fold where the format allows:
``onnx.reference.ReferenceEvaluator`` for ONNX conv graphs, dqnc's numpy graph evaluator for ONNX
MLPs, a torch-semantics forward of the stored tensors for torch files.

:func:`adopt` is what other stages (and a recipe's ``{import: PATH, env: ID}`` source) call to
use such a file directly: it imports once into a cache keyed by the file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dqnc import artifact as art
from dqnc.config import ImportConfig
from dqnc.envs import EnvSpec, collect_states, env_spec, rollout
from dqnc.errors import ArtifactError, UsageError
from dqnc.limits import DAMAGED_ZIP
from dqnc.importers.common import Source, UnsupportedModelError, fold, fold_conv
from dqnc.seeds import episode_seed

if TYPE_CHECKING:
    from dqnc.qnet import QNetSpec

FORMATS: dict[str, str] = {  # format -> module with load(path, cfg) -> Source
    "keras": "dqnc.importers.keras",
    "onnx": "dqnc.importers.onnx",
    "sb3": "dqnc.importers.sb3",
    "cleanrl": "dqnc.importers.cleanrl",
    "torch": "dqnc.importers.cleanrl",  # any bare state_dict of Linear layers
}
SUPPORTED = ("MLP and conv (pixel) Q-networks from Keras 3 .keras/.h5, tf_keras SavedModel/.h5, ONNX (.onnx), "
             "Stable-Baselines3 DQN/QR-DQN .zip (MlpPolicy, CnnPolicy), CleanRL .cleanrl_model / PyTorch state_dict "
             "(.pt/.pth); MLPs from Keras 3 export() SavedModels")
_HDF5 = b"\x89HDF\r\n\x1a\n"


class ImportCheckError(ArtifactError):
    """The imported network does not reproduce the source's Q-values or actions."""


def sniff(path: str | Path) -> str | None:
    """The format of ``path`` from its first bytes (or zip listing), or None if it is none of ours."""
    p = Path(path)
    if p.is_dir():
        if (p / "saved_model.pb").is_file() and not (p / art.MANIFEST).is_file():
            return "keras"
        return None
    if not p.is_file():
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if head.startswith(_HDF5):
        return "keras"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as zf:
                names = set(zf.namelist())
        except DAMAGED_ZIP:  # damaged: its reader says why
            return {".keras": "keras", ".onnx": "onnx", ".zip": "sb3"}.get(p.suffix.lower(), "torch")
        if "policy.pth" in names or "data" in names:
            return "sb3"
        if "config.json" in names and "model.weights.h5" in names:
            return "keras"
        return "torch"
    if p.suffix.lower() == ".onnx":
        return "onnx"
    if p.suffix.lower() in (".keras", ".h5", ".hdf5"):
        return "keras"
    if p.suffix.lower() in (".cleanrl_model", ".pt", ".pth", ".zip"):
        return "torch"
    return None


def source_digest(path: Path) -> str:
    return art.dir_digest(path) if path.is_dir() else art.sha256_file(path)


def load_source(path: Path, cfg: ImportConfig, spec: EnvSpec | None = None) -> Source:
    """Read ``path`` with the importer for its (given or sniffed) format."""
    if not path.exists():
        raise ArtifactError(f"{str(path)!r} does not exist: check the path")
    fmt = cfg.format if cfg.format != "auto" else sniff(path)
    if fmt is None:
        raise UsageError(f"{str(path)!r} is not a model format dqnc imports (supported: {SUPPORTED}); "
                         "pass --format if the file name hides its format")
    module = importlib.import_module(FORMATS[fmt])
    return module.load(path, cfg, spec)


def _check_dims(src: Source, spec: EnvSpec, path: Path) -> None:
    if src.obs_dim != spec.obs_dim:
        raise ArtifactError(f"{str(path)!r}: the network takes {src.obs_dim} inputs but env {spec.id!r} observations "
                            f"have {spec.obs_dim} values {tuple(spec.obs_shape)}: use the env it was trained on")
    if src.n_actions != spec.n_actions:
        raise ArtifactError(f"{str(path)!r}: the network outputs {src.n_actions} Q-values but env {spec.id!r} has "
                            f"{spec.n_actions} actions: use the env it was trained on")


def compare(q_src: np.ndarray, q_new: np.ndarray) -> dict[str, Any]:
    """Max |dQ| relative to the source's Q range, and greedy-action equality.

    A state whose source top-two gap is within twice the measured max |dQ| is a tie at the
    precision of float32 arithmetic: its action may differ without the networks differing,
    so it is counted apart (and reported) rather than failed.
    """
    q_src, q_new = np.asarray(q_src, np.float64), np.asarray(q_new, np.float64)
    err = float(np.max(np.abs(q_src - q_new))) if q_src.size else 0.0
    q_range = float(q_src.max() - q_src.min()) if q_src.size else 0.0
    differ = q_src.argmax(axis=1) != q_new.argmax(axis=1)
    top2 = np.sort(q_src, axis=1)[:, -2:] if q_src.shape[1] > 1 else np.zeros((len(q_src), 2))
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * err
    return {"states": int(len(q_src)), "max_abs_dq": err, "q_range": q_range,
            "rel_error": err / q_range if q_range > 0 else (0.0 if err == 0 else float("inf")),
            "action_mismatches": int(np.sum(differ & ~tie)), "tied_states": int(np.sum(tie)),
            "tied_mismatches": int(np.sum(differ & tie))}


def _check_image(src: Source, spec: EnvSpec, path: Path) -> None:
    """A conv source must read the env's images (in either layout); it is then fed them as the env
    gives them (a CHW/HWC transpose in front of a reference that reads the other layout)."""
    from dqnc.qnet.layout import to_hwc

    if not spec.is_image:
        raise ArtifactError(f"{str(path)!r}: the network is a conv net reading {src.obs_shape} ({src.layout}) images, but "
                            f"env {spec.id!r} gives {len(spec.obs_shape)}-D observations {tuple(spec.obs_shape)}: use the "
                            "env it was trained on, with its wrappers (env_kwargs)")
    env_hwc = to_hwc(tuple(spec.obs_shape), spec.obs_layout)
    if src.hwc != env_hwc:
        raise ArtifactError(f"{str(path)!r}: the network reads {src.hwc[0]}x{src.hwc[1]} images with {src.hwc[2]} channels "
                            f"but env {spec.id!r} gives {env_hwc[0]}x{env_hwc[1]} with {env_hwc[2]}: use the env (and frame "
                            "stack) it was trained on")
    if src.n_actions != spec.n_actions:
        raise ArtifactError(f"{str(path)!r}: the network outputs {src.n_actions} Q-values but env {spec.id!r} has "
                            f"{spec.n_actions} actions: use the env it was trained on")
    src.adapt_to(tuple(spec.obs_shape), spec.obs_layout)


def _input_scale(src: Source, spec: EnvSpec, cfg: ImportConfig) -> None:
    """Apply the input scaling a file does not record (CleanRL's ``x / 255``): ``--input-scale``, else
    1/255 for uint8 0-255 images (CleanRL's and SB3's convention), else none."""
    if not src.scale_unknown and cfg.input_scale is None:
        return
    if cfg.input_scale is not None:
        scale, why = float(cfg.input_scale), "--input-scale"
    elif spec.obs_dtype == "uint8" and list(spec.obs_high) == [255.0]:
        scale, why = 1.0 / 255.0, "assumed: uint8 0-255 images (CleanRL's dqn_atari divides by 255; --input-scale 1 if not)"
    else:
        return
    if scale != 1.0:
        src.scale_input(scale, {"kind": "input_scale", "scale": scale, "why": why,
                                "folded": "into the first layer's weights"})


def _network(src: Source, spec: EnvSpec, path: Path) -> tuple[QNetSpec, list[np.ndarray]]:
    """The plain dqnc network (spec and weights) the source folds into."""
    from dqnc.qnet import QNetSpec

    if not src.is_conv:
        _check_dims(src, spec, path)
        weights, acts = fold(src.ops, src.obs_dim)
        return QNetSpec.from_weights(weights, acts), weights
    _check_image(src, spec, path)
    weights, acts, conv = fold_conv(src.ops, src.hwc, repr(str(path)))
    if len(set(acts)) > 1:
        raise UnsupportedModelError(f"{str(path)!r}: a conv net with mixed activations {acts} is not supported "
                                    "(supported: one activation for every hidden layer)")
    hidden = tuple(int(w.shape[1]) for w in weights[2 * len(conv):-2:2])
    net = QNetSpec(tuple(spec.obs_shape), spec.n_actions, spec.obs_layout, tuple(conv), hidden, tuple(acts))
    net.feature_shapes()
    return net, weights


def _q(model: Any, states: np.ndarray, chunk: int = 256) -> np.ndarray:
    """A Keras model's Q-values on float32 states, in chunks (Atari states are 113 KB each as float32)."""
    return np.concatenate([np.asarray(model(np.asarray(states[i:i + chunk], np.float32), training=False))
                           for i in range(0, len(states), chunk)])


def _check(src: Source, net: QNetSpec, weights: list[np.ndarray], model: Any, spec: EnvSpec,
           cfg: ImportConfig) -> dict[str, Any]:
    """Q-values and greedy actions of the SavedModel and the numpy forward against the source's, on
    the source policy's own rollout states (the check purpose's seed block), and returns."""
    seed0 = episode_seed("check", cfg.seed)
    states = collect_states(src.forward, spec, cfg.check_states, seed0, epsilon=0.1)
    numpy_net = net.numpy(weights)
    q_src = src.forward(states)
    checks = {"savedmodel": compare(q_src, _q(model, states)), "numpy": compare(q_src, numpy_net(states))}
    worst = max(checks.values(), key=lambda c: (c["action_mismatches"], c["rel_error"]))
    src_returns = rollout(src.forward, spec, cfg.check_episodes, seed0).returns
    new_returns = rollout(numpy_net, spec, cfg.check_episodes, seed0).returns
    return {"check": worst | {"seed": seed0, "by_runtime": checks},
            "source_mean_return": float(src_returns.mean()), "imported_mean_return": float(new_returns.mean()),
            "return_episodes": cfg.check_episodes}


def run(cfg: ImportConfig, path: str | Path, out: str | Path, *, force: bool = False,
        command: list[str] | None = None, spec: EnvSpec | None = None) -> art.Artifact:
    """Import ``path`` into an fp32 artifact at ``out``, verified against the source's forward pass."""
    path, out = Path(path), Path(out)
    art.check_output(out, force)
    spec = spec or env_spec(cfg.env, cfg.env_kwargs)
    digest = source_digest(path) if path.exists() else ""
    src = load_source(path, cfg, spec)
    if cfg.obs_norm is not None:
        from dqnc.importers.sb3 import vecnormalize_ops

        ops, note = vecnormalize_ops(Path(cfg.obs_norm), src.obs_dim)
        src.prepend(ops, note)
    _input_scale(src, spec, cfg)
    net, weights = _network(src, spec, path)
    model = net.build_plain(weights)
    metrics = _check(src, net, weights, model, spec, cfg)
    worst = metrics["check"]
    if worst["rel_error"] > cfg.max_rel_error or worst["action_mismatches"]:
        raise ImportCheckError(
            f"{str(path)!r}: the imported network does not reproduce the source: max |dQ| {worst['max_abs_dq']:.3g} "
            f"= {worst['rel_error']:.3g} of the Q range {worst['q_range']:.4g} (allowed {cfg.max_rel_error:g}), "
            f"{worst['action_mismatches']} of {worst['states']} greedy actions differ; this is a dqnc bug for a "
            "supported file: please report it with the file"
        )
    if net.family == "mlp":
        acts = list(net.activations)
        network = {"obs_dim": spec.obs_dim, "n_actions": spec.n_actions, "hidden": list(net.hidden),
                   "activation": acts[0] if len(set(acts)) == 1 else "mixed", "activations": acts, "dueling": False,
                   "saved_as": "sequential_mlp"}
    else:
        network = net.to_network()
    origin = {"format": src.format, "path": str(path.resolve()), "sha256": digest, "mapping": src.mapping,
              "preprocessing": src.preprocessing, **src.details}
    if cfg.obs_norm is not None:
        origin["obs_norm_sha256"] = art.sha256_file(Path(cfg.obs_norm))
    with art.atomic_output(out, force) as tmp:
        model.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        net.save_sidecar(tmp, weights)
        art.write_manifest(tmp, stage="import", env=spec, network=network, config=cfg.model_dump(mode="json"),
                           metrics=metrics, command=command, extra={"origin": origin})
    return art.load(out)


def cache_root() -> Path:
    base = os.environ.get("DQNC_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "dqnc")
    return Path(base) / "imports"


def adopt(path: str | Path, spec: EnvSpec, obs_norm: str | Path | None = None,
          log: Callable[[str], None] | None = None) -> art.Artifact:
    """Use a foreign model file where an artifact is expected: import it once, then reuse the import.

    The import lives in a cache directory named by the file's sha256 (and the env and obs-norm
    file), so the user's file is never modified and a changed file is imported afresh. This is
    the hook for a recipe source ``{import: PATH, env: ID}`` (plus ``obs_norm: PKL``).
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{str(path)!r} does not exist: check the path")
    key = hashlib.sha256(json.dumps([source_digest(path), spec.to_dict(),
                                     art.sha256_file(Path(obs_norm)) if obs_norm else None]).encode()).hexdigest()[:24]
    out = cache_root() / key
    if (out / art.MANIFEST).is_file():
        try:
            return art.load(out)
        except ArtifactError:
            pass  # a damaged cache entry is simply redone
    if log is not None:
        log(f"importing {path} into {out}")
    cfg = ImportConfig(env=spec.id, env_kwargs=spec.kwargs, obs_norm=str(obs_norm) if obs_norm else None)
    return run(cfg, path, out, force=True, spec=spec)


__all__ = ["FORMATS", "SUPPORTED", "ImportCheckError", "UnsupportedModelError", "adopt", "load_source", "run", "sniff"]
