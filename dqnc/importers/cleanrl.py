"""CleanRL checkpoints (``.cleanrl_model``) and any bare PyTorch ``state_dict`` of Linear layers.

CleanRL's DQN saves ``q_network.state_dict()``: ``network.0.weight``, ``network.2.weight``, ...
for ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)``. A state_dict records no activations,
so the hidden activation is ReLU (CleanRL's) unless ``--activation`` says otherwise; the
manifest records which was used. Conv nets (``dqn_atari``: Conv2d 0/2/4, Linear 7/9) are read by
:mod:`dqnc.importers.torchconv`; their ``x / 255`` lives in CleanRL's code, not the file, so the
import applies it for uint8 images unless ``--input-scale`` says otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from dqnc.importers import torchconv, torchzip
from dqnc.importers.common import Act, Affine, Op, Source, UnsupportedModelError, check_activation
from dqnc.qnet.layout import to_hwc

SUPPORTED_MODULES = "nn.Linear layers in one nn.Sequential, with ReLU / Tanh / ELU / Sigmoid between them"
_KEY = re.compile(r"^(?P<prefix>.*?)\.?(?P<index>\d+)\.(?P<param>weight|bias)$")


def linear_chain(state: dict[str, np.ndarray], prefix: str, activation: str, what: str) -> tuple[list[Op], list[dict[str, Any]], int]:
    """The ops of ``nn.Sequential`` Linear layers stored under ``prefix`` (torch's ``x @ W.T + b``)."""
    layers: dict[int, dict[str, np.ndarray]] = {}
    for key in sorted(state):
        if not key.startswith(prefix + ".") and prefix:
            continue
        m = _KEY.match(key)
        if m is None or m.group("prefix") != prefix:
            raise UnsupportedModelError(f"{what}: tensor {key!r} is not a Linear layer's weight/bias "
                                        f"(supported: {SUPPORTED_MODULES})")
        layers.setdefault(int(m.group("index")), {})[m.group("param")] = state[key]
    if not layers:
        raise UnsupportedModelError(f"{what}: no Linear layers under {prefix!r} (supported: {SUPPORTED_MODULES})")
    ops: list[Op] = []
    mapping: list[dict[str, Any]] = []
    indices = sorted(layers)
    for n, idx in enumerate(indices):
        name = f"{prefix}.{idx}" if prefix else str(idx)
        w = layers[idx].get("weight")
        if w is None:
            raise UnsupportedModelError(f"{what}: {name} has a bias but no weight")
        if w.ndim != 2:
            kind = {3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}.get(w.ndim, f"{w.ndim}-D")
            raise UnsupportedModelError(f"{what}: {name}.weight has shape {tuple(w.shape)} (a {kind} layer), which is not "
                                        f"supported yet (supported: {SUPPORTED_MODULES})")
        b = layers[idx].get("bias", np.zeros(w.shape[0], np.float32))
        if b.shape != (w.shape[0],):
            raise UnsupportedModelError(f"{what}: {name}.bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
        if n:
            gap = idx - indices[n - 1]
            if gap > 2:
                raise UnsupportedModelError(f"{what}: {gap - 1} parameter-free modules between {prefix}.{indices[n - 1]} "
                                            f"and {name}; only one activation between Linear layers is supported "
                                            f"({SUPPORTED_MODULES})")
            if gap == 2:
                ops.append(Act(activation))
        ops.append(Affine(np.asarray(w, np.float32).T, np.asarray(b, np.float32)))
        mapping.append({"source": f"{name}.weight/bias", "shape": list(w.shape), "transposed": True,
                        "activation_after": activation if n < len(indices) - 1 and indices[n + 1] - idx == 2 else "linear"})
    return ops, mapping, int(ops[0].w.shape[0])  # type: ignore[union-attr]


def _prefix(state: dict[str, np.ndarray], what: str) -> str:
    prefixes = sorted({m.group("prefix") for k in state if (m := _KEY.match(k)) is not None})
    for preferred in ("q_net.q_net", "network", "q_network.network"):
        if preferred in prefixes:
            return preferred
    if len(prefixes) == 1:
        return prefixes[0]
    raise UnsupportedModelError(f"{what}: the state_dict holds several networks ({', '.join(prefixes) or 'none'}); "
                                f"expected one nn.Sequential of Linear layers (CleanRL's 'network.*')")


def load(path: Path, cfg: Any, spec: Any = None) -> Source:
    what = str(path)
    state = torchzip.load_state_dict(torchzip.read_file(path), what)
    prefix = _prefix(state, what)
    activation = check_activation(cfg.activation or "relu", what)
    fmt = "cleanrl" if prefix == "network" else "torch"
    details = {"state_dict_prefix": prefix, "activation": activation, "activation_assumed": cfg.activation is None,
               "ignored_tensors": sorted(k for k in state if not k.startswith(prefix + "."))}
    if any(v.ndim == 4 for k, v in state.items() if k.startswith(prefix + ".")):
        return _conv(state, prefix, activation, fmt, details, what, spec)
    ops, mapping, obs_dim = linear_chain(state, prefix, activation, what)
    return Source(fmt, obs_dim, ops, mapping, details=details)


def _conv(state: dict[str, np.ndarray], prefix: str, activation: str, fmt: str, details: dict[str, Any], what: str,
          spec: Any) -> Source:
    """CleanRL's ``dqn_atari`` QNetwork (``network.{0,2,4}`` Conv2d, ``network.{7,9}`` Linear) or any
    such Sequential: torch convs read CHW images; the env's image size fixes the strides."""
    mods = torchconv.modules(state, prefix + ".", what)
    n_conv = next((i for i, m in enumerate(mods) if not m.is_conv), len(mods))
    if n_conv == 0 or n_conv == len(mods):
        raise UnsupportedModelError(f"{what}: expected Conv2d layers then Linear layers (supported: {torchconv.SUPPORTED})")
    if spec is None or not spec.is_image:
        shape = None if spec is None else tuple(spec.obs_shape)
        raise UnsupportedModelError(f"{what}: a conv net needs an image env to read its strides from; env observations "
                                    f"are {shape}: pass --env with the env (and frame stack) it was trained on")
    h, w, c = to_hwc(tuple(spec.obs_shape), spec.obs_layout)
    chw = (c, h, w)
    # CleanRL's dqn_atari QNetwork (network.{0,2,4,7,9}) is the Nature DQN network: its strides are CleanRL's.
    dqn_atari = prefix == "network" and [m.index for m in mods] == [0, 2, 4, 7, 9]
    strides = torchconv.nature_strides(mods[:n_conv]) if dqn_atari else None
    ops, mapping = torchconv.conv_ops(mods[:n_conv], mods[n_conv], chw, what, strides=strides)
    lin_ops, lin_map = torchconv.linear_ops(mods[n_conv:], activation, what)
    return Source(fmt, int(np.prod(chw)), ops + lin_ops, mapping + lin_map,
                  details=details | {"architecture": "conv", "conv_input": "CHW (torch)", "frame_order": "channel -1 newest"},
                  obs_shape=chw, layout="CHW", scale_unknown=True)
