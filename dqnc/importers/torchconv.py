"""Conv Q-networks in PyTorch state_dicts (SB3 CnnPolicy / QR-DQN, CleanRL ``dqn_atari``), read
from the tensors alone.

A state_dict keeps no module classes, strides or paddings: the architecture is read from the
weight shapes, the order torch saved them in (module registration order, which is forward order
for ``nn.Sequential`` nets), and the gaps in a Sequential's indices (``network.0``, ``network.2``:
one parameter-free module, an activation, between them). Strides are solved from the input image
and the first Linear layer's input size with valid padding (what NatureCNN and CleanRL use); the
import is refused when no stride fits (padding or pooling) or when more than one does.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from dqnc.importers.common import Act, Affine, Conv, Flatten, Op, UnsupportedModelError

SUPPORTED = ("nn.Conv2d (square kernels, no padding, no dilation or groups) with ReLU between them, one flatten, "
             "then nn.Linear layers")
_MODULE = re.compile(r"^(?P<seq>.*?)\.?(?P<index>\d+)$")
MAX_STRIDE_SEARCH = 100_000  # stride combinations tried before giving up (8x8, 4x4, 3x3 kernels: 96)
# The Nature DQN network (Mnih et al. 2015) as SB3's NatureCNN and CleanRL's dqn_atari QNetwork
# define it: (filters, kernel) -> stride. On 84x84 frames three stride choices fit its 3136
# features (4-2-1, 2-4-1, 3-1-3), so these files name it by their format, not their shapes.
NATURE_STRIDES = {((32, 8), (64, 4), (64, 3)): [4, 2, 1]}


@dataclass
class Module:
    """One parameterized module: its name, weight and bias, and its place in a Sequential."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    seq: str  # the Sequential's prefix ("" if the module is not in one)
    index: int | None  # its index in that Sequential

    @property
    def is_conv(self) -> bool:
        return self.weight.ndim == 4


def modules(state: dict[str, np.ndarray], prefix: str, what: str) -> list[Module]:
    """The parameterized modules under ``prefix``, in the order torch saved them."""
    order: list[str] = []
    params: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):
            raise UnsupportedModelError(f"{what}: tensor {key!r} is not a weight or bias (supported: {SUPPORTED})")
        if name not in params:
            order.append(name)
            params[name] = {}
        params[name][param] = np.asarray(value, np.float32)
    out = []
    for name in order:
        w = params[name].get("weight")
        if w is None or w.ndim not in (2, 4):
            shape = None if w is None else tuple(w.shape)
            raise UnsupportedModelError(f"{what}: module {name!r} has weight shape {shape}, which is neither nn.Linear "
                                        f"nor nn.Conv2d (supported: {SUPPORTED})")
        b = params[name].get("bias", np.zeros(w.shape[0], np.float32))
        if b.shape != (w.shape[0],):
            raise UnsupportedModelError(f"{what}: {name}.bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
        m = _MODULE.match(name)
        seq, index = (m.group("seq"), int(m.group("index"))) if m else (name, None)
        out.append(Module(name, w, b, seq, index))
    return out


def gap(a: Module, b: Module) -> int | None:
    """Parameter-free modules between ``a`` and ``b`` when both sit in one Sequential, else None."""
    if a.seq == b.seq and a.index is not None and b.index is not None:
        return b.index - a.index - 1
    return None


def solve_strides(chw: tuple[int, int, int], kernels: list[int], channels: int, flat: int, what: str) -> list[int]:
    """The strides (valid padding) that turn a ``chw`` image into ``flat`` features of ``channels``
    channels; exactly one must fit."""
    _, h, w = chw
    ranges = [range(1, k + 1) for k in kernels]
    fits = []
    for n, strides in enumerate(itertools.product(*ranges)):
        if n >= MAX_STRIDE_SEARCH:
            break
        hh, ww = h, w
        for k, s in zip(kernels, strides):
            hh, ww = (hh - k) // s + 1, (ww - k) // s + 1
            if hh < 1 or ww < 1:
                break
        else:
            if hh * ww * channels == flat:
                fits.append(list(strides))
    if not fits:
        raise UnsupportedModelError(f"{what}: no conv strides turn a {h}x{w} image into the first Linear layer's {flat} "
                                    "inputs without padding: the net pads, pools or reads another image size (supported: "
                                    f"{SUPPORTED}); check the env and its frame stack")
    if len(fits) > 1:
        options = "; ".join("x".join(map(str, f)) for f in fits[:4])
        raise UnsupportedModelError(f"{what}: the conv strides are ambiguous: {len(fits)} choices fit a {h}x{w} image and "
                                    f"{flat} features ({options}); a state_dict does not record strides, so dqnc refuses "
                                    "to guess: export the model to ONNX (which records them) and import that")
    return fits[0]


def _chain_acts(mods: list[Module], what: str, tail_act: bool) -> list[bool]:
    """Whether an activation follows each conv (from Sequential index gaps; across Sequentials, and
    after a Sequential's last conv, ReLU as NatureCNN has it)."""
    acts = []
    for i, m in enumerate(mods):
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        g = gap(m, nxt) if nxt is not None else None
        if nxt is not None and nxt.is_conv:
            if g is not None and g > 1:
                raise UnsupportedModelError(f"{what}: {g} parameter-free modules between {m.name} and {nxt.name} (a pooling "
                                            f"layer?); supported: {SUPPORTED}")
            acts.append(g is None or g == 1)
        else:  # the last conv: the flatten (and maybe an activation) before the first Linear
            if g is not None and g > 2:
                raise UnsupportedModelError(f"{what}: {g} parameter-free modules between {m.name} and the first Linear "
                                            f"{nxt.name if nxt else ''} (a pooling layer?); supported: {SUPPORTED}")
            acts.append(g == 2 if g is not None else tail_act)
    return acts


def nature_strides(convs: list[Module]) -> list[int] | None:
    """The Nature DQN strides when ``convs`` have its shapes (the caller knows the file is one)."""
    return NATURE_STRIDES.get(tuple((int(m.weight.shape[0]), int(m.weight.shape[2])) for m in convs))


def check_strides(chw: tuple[int, int, int], kernels: list[int], strides: list[int], channels: int, flat: int,
                  what: str) -> None:
    """Refuse known strides that do not turn the image into the first Linear layer's inputs."""
    _, h, w = chw
    for k, s in zip(kernels, strides):
        h, w = (h - k) // s + 1, (w - k) // s + 1
    if min(h, w) < 1 or h * w * channels != flat:
        raise UnsupportedModelError(f"{what}: the Nature DQN strides {'-'.join(map(str, strides))} turn a {chw[1]}x{chw[2]} "
                                    f"image into {max(h, 0) * max(w, 0) * channels} features, not the first Linear layer's "
                                    f"{flat}: use the env and frame stack it was trained on (84x84 frames)")


def conv_ops(convs: list[Module], first_linear: Module, chw: tuple[int, int, int], what: str,
             tail_act: bool = True, strides: list[int] | None = None) -> tuple[list[Op], list[dict[str, Any]]]:
    """Ops for ``convs`` reading CHW images of shape ``chw``, then a CHW flatten. ``strides``: known
    from the file's format (checked against the sizes), else solved from the sizes."""
    for m in convs:
        o, i, kh, kw = m.weight.shape
        if kh != kw:
            raise UnsupportedModelError(f"{what}: {m.name} has a {kh}x{kw} kernel; supported: {SUPPORTED}")
    if convs[0].weight.shape[1] != chw[0]:
        raise UnsupportedModelError(f"{what}: {convs[0].name} reads {convs[0].weight.shape[1]} channels but the images "
                                    f"have {chw[0]} ({chw}): use the env and frame stack it was trained on")
    acts = _chain_acts(convs + [first_linear], what, tail_act)
    kernels, channels, flat = [int(m.weight.shape[2]) for m in convs], int(convs[-1].weight.shape[0]), int(first_linear.weight.shape[1])
    known = strides is not None
    if strides is not None:
        check_strides(chw, kernels, strides, channels, flat, what)
    else:
        strides = solve_strides(chw, kernels, channels, flat, what)
    ops: list[Op] = []
    mapping = []
    for m, s, act in zip(convs, strides, acts):
        ops.append(Conv(m.weight.transpose(2, 3, 1, 0), m.bias, s))  # OIHW -> HWIO
        if act:
            ops.append(Act("relu"))
        mapping.append({"source": f"{m.name}.weight/bias", "shape": list(m.weight.shape), "stride": s,
                        "stride_from": "the Nature DQN network the format defines" if known else "the tensor sizes",
                        "padding": "valid (assumed: not recorded)", "activation_after": "relu" if act else "linear"})
    ops.append(Flatten("CHW"))
    return ops, mapping


def linear_ops(mods: list[Module], activation: str, what: str, act_after_last: bool = False) -> tuple[list[Op], list[dict[str, Any]]]:
    """Ops for Linear modules (``x @ W.T + b``); an activation between two of them unless they are
    adjacent in one Sequential."""
    ops: list[Op] = []
    mapping = []
    for i, m in enumerate(mods):
        if m.is_conv:
            raise UnsupportedModelError(f"{what}: {m.name} is a Conv2d after a Linear layer; supported: {SUPPORTED}")
        if ops:
            prev = mods[i - 1]
            g = gap(prev, m)
            if g is not None and g > 1:
                raise UnsupportedModelError(f"{what}: {g} parameter-free modules between {prev.name} and {m.name}; "
                                            f"only one activation between Linear layers is supported ({SUPPORTED})")
            if g is None or g == 1:
                ops.append(Act(activation))
        if ops and isinstance(ops[-1], Affine) and ops[-1].w.shape[1] != m.weight.shape[1]:
            raise UnsupportedModelError(f"{what}: {m.name} takes {m.weight.shape[1]} inputs after {ops[-1].w.shape[1]}")
        ops.append(Affine(m.weight.T, m.bias))
        mapping.append({"source": f"{m.name}.weight/bias", "shape": list(m.weight.shape), "transposed": True})
    if act_after_last:
        ops.append(Act(activation))
    return ops, mapping


def quantile_mean(n_outputs: int, n_actions: int, what: str) -> Affine:
    """QR-DQN's head: ``n_quantiles * A`` outputs, quantile-major; Q is the mean over quantiles, one
    linear map that folds into the last layer exactly."""
    if n_actions < 1 or n_outputs % n_actions:
        raise UnsupportedModelError(f"{what}: a quantile head of {n_outputs} outputs does not divide into {n_actions} actions")
    nq = n_outputs // n_actions
    m = np.zeros((n_outputs, n_actions))
    for q in range(nq):
        m[q * n_actions + np.arange(n_actions), np.arange(n_actions)] = 1.0 / nq
    return Affine(m, np.zeros(n_actions))
