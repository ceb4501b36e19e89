"""What every importer produces: the source network as a chain of simple ops, and its folding.

An importer reads a file into :class:`Source`: a list of ops applied in order to an
observation (affine maps, per-feature scale/shift from preprocessing layers, activations,
clipping; for a conv net, valid-padding convolutions and a flatten before them), evaluated in
float32 exactly as the source framework would (:meth:`Source.forward`). :func:`fold` composes an
MLP chain into the plain MLP a dqnc artifact holds: preprocessing folds into the next affine
map, consecutive affine maps merge, and a clip becomes one extra ReLU layer (``clip(z, lo, hi) =
relu(z - lo) - relu(z - hi) + lo``), so the deployed policy takes raw observations and needs no
preprocessing code of its own. :func:`fold_conv` does the same for a conv net: a uniform or
per-channel input scaling (``/255``) folds into the first kernel, and a flatten in torch's CHW
order becomes a row permutation of the first Dense layer (dqnc flattens HWC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dqnc.errors import ArtifactError

ACTIVATIONS = ("relu", "tanh", "elu", "sigmoid", "linear")


class UnsupportedModelError(ArtifactError):
    """The file is readable but holds an op/layer outside the supported subset."""


@dataclass
class Affine:
    """``x @ w + b`` with ``w`` of shape (in, out)."""

    w: np.ndarray
    b: np.ndarray


@dataclass
class ScaleShift:
    """``x * scale + shift`` per feature (Normalization, Rescaling, VecNormalize)."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass
class Act:
    name: str


@dataclass
class Clip:
    lo: float
    hi: float


@dataclass
class Conv:
    """A valid-padding 2-D convolution: kernel ``w`` in HWIO ``[kh, kw, in, out]``, bias, stride."""

    w: np.ndarray
    b: np.ndarray
    stride: int


@dataclass
class Flatten:
    """The feature map flattened in ``order``: "CHW" (torch, ONNX) or "HWC" (Keras)."""

    order: str


Op = Affine | ScaleShift | Act | Clip | Conv | Flatten
IMAGE_LAYOUTS = ("HWC", "CHW")


@dataclass
class Source:
    """A readable Q-network: its ops, plus a record of where each came from."""

    format: str
    obs_dim: int
    ops: list[Op]
    mapping: list[dict[str, Any]] = field(default_factory=list)
    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    reference: Any = None  # an independent forward of the file (the ONNX graph evaluator), else None
    # A conv net's input as the source reads it: its shape in ``layout`` ("HWC" or "CHW").
    obs_shape: tuple[int, ...] | None = None
    layout: str = "flat"
    scale_unknown: bool = False  # the file does not say how pixels were scaled (CleanRL: /255 in code)

    @property
    def is_conv(self) -> bool:
        return any(isinstance(op, Conv) for op in self.ops)

    @property
    def hwc(self) -> tuple[int, int, int]:
        """The (height, width, channels) of a conv source's input."""
        shape = self.obs_shape or ()
        if self.layout not in IMAGE_LAYOUTS or len(shape) != 3:
            raise UnsupportedModelError(f"a conv net needs a 3-D image input; this one reads {shape} ({self.layout})")
        return (shape[1], shape[2], shape[0]) if self.layout == "CHW" else (shape[0], shape[1], shape[2])

    @property
    def n_actions(self) -> int:
        width = self.obs_dim
        for op in self.ops:
            if isinstance(op, Affine):
                width = op.w.shape[1]
        return width

    def forward(self, obs: np.ndarray) -> np.ndarray:
        """The source's Q-values, op by op in float32 (the reference the artifact is checked against)."""
        if self.reference is not None:
            return np.asarray(self.reference(obs), np.float32)
        return run_ops(self.ops, obs, self.obs_shape if self.is_conv else None, self.layout)

    def prepend(self, ops: list[Op], note: dict[str, Any]) -> None:
        """Put observation preprocessing (e.g. VecNormalize) in front of the network."""
        inner = self.reference
        self.ops = [*ops, *self.ops]
        if inner is not None:
            self.reference = lambda obs: inner(run_ops(ops, obs))
        self.preprocessing.append(note)

    def adapt_to(self, shape: tuple[int, ...], layout: str) -> None:
        """Read images as the env gives them (``layout``): the ops compute in NHWC whatever the
        layout; a reference that reads the source's own layout gets the transpose in front."""
        if not self.is_conv or layout == self.layout:
            return
        inner, perm = self.reference, ((0, 3, 1, 2) if self.layout == "CHW" else (0, 2, 3, 1))
        if inner is not None:
            self.reference = lambda obs: inner(np.asarray(obs).reshape(len(obs), *shape).transpose(perm))
        self.preprocessing.append({"kind": "layout", "source": self.layout, "env": layout,
                                   "folded": "the env's images are read in their own layout; weights are layout-free"})
        self.obs_shape, self.layout = tuple(shape), layout

    def scale_input(self, scale: float, note: dict[str, Any]) -> None:
        """Multiply the network's input by ``scale`` first (CleanRL's ``x / 255``, outside its file)."""
        inner = self.reference
        self.ops = [ScaleShift(np.float32(scale), np.float32(0)), *self.ops]
        if inner is not None:
            self.reference = lambda obs: inner(np.asarray(obs, np.float32) * np.float32(scale))
        self.preprocessing.append(note)


def activate(x: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(x, np.float32(0))
    if name == "tanh":
        return np.tanh(x)
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, np.float32(0)))).astype(np.float32)
    if name == "sigmoid":
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)
    if name == "linear":
        return x
    raise ValueError(f"unknown activation {name!r}")


def run_ops(ops: list[Op], obs: np.ndarray, image: tuple[int, ...] | None = None, layout: str = "flat") -> np.ndarray:
    """``ops`` on a batch: flat vectors, or (``image`` given) images of that shape in ``layout``,
    computed in NHWC as the source computes them in its own layout."""
    from dqnc.qnet.forward import conv2d

    x = np.asarray(obs, np.float32)
    if image is None:
        x = x.reshape(len(obs), -1)
    else:
        x = x.reshape(len(obs), *image)
        x = x.transpose(0, 2, 3, 1) if layout == "CHW" else x
    for op in ops:
        if isinstance(op, Conv):
            x = conv2d(np.ascontiguousarray(x), op.w.astype(np.float32), op.b.astype(np.float32), op.stride)
        elif isinstance(op, Flatten):
            x = (x.transpose(0, 3, 1, 2) if op.order == "CHW" else x).reshape(len(x), -1)
        elif isinstance(op, Affine):
            x = x @ op.w.astype(np.float32) + op.b.astype(np.float32)
        elif isinstance(op, ScaleShift):
            x = x * op.scale.astype(np.float32) + op.shift.astype(np.float32)
        elif isinstance(op, Act):
            x = activate(x, op.name)
        else:
            x = np.clip(x, np.float32(op.lo), np.float32(op.hi))
    return x


def fold(ops: list[Op], obs_dim: int) -> tuple[list[np.ndarray], list[str]]:
    """Compose ``ops`` into plain MLP weights ``[W0, b0, W1, b1, ...]`` and hidden activations.

    Composition runs in float64 and rounds once to float32, so a folded layer is the float32
    nearest to the exact composition, not the product of two roundings.
    """
    weights: list[np.ndarray] = []
    acts: list[str] = []
    a = np.eye(obs_dim)  # pending affine map from the last closed layer's output
    c = np.zeros(obs_dim)
    pending, ident = False, True  # ident: ``a`` is still the identity

    def close(w: np.ndarray, b: np.ndarray, act: str) -> None:
        weights.extend([w.astype(np.float32), b.astype(np.float32)])
        acts.append(act)

    for op in ops:
        if isinstance(op, Affine):
            w = op.w.astype(np.float64)
            if w.shape[0] != a.shape[1]:
                raise UnsupportedModelError(f"layer shapes do not chain: {a.shape[1]} features into a {w.shape} kernel")
            # ``a @ w`` with an identity ``a`` is ``w``: skip the product (3136 x 3136 for Atari)
            a, c, pending = (w if ident else a @ w), c @ w + op.b.astype(np.float64), True
            ident = False
        elif isinstance(op, ScaleShift):
            s = np.broadcast_to(np.asarray(op.scale, np.float64), (a.shape[1],))
            t = np.broadcast_to(np.asarray(op.shift, np.float64), (a.shape[1],))
            a, c, pending, ident = a * s, c * s + t, True, False
        elif isinstance(op, Act):
            if op.name == "linear":
                continue
            close(a, c, op.name)
            a, c, pending, ident = np.eye(a.shape[1]), np.zeros(a.shape[1]), False, True
        else:  # Clip -> one ReLU layer of twice the width, then a linear map back
            k = a.shape[1]
            close(np.concatenate([a, a], axis=1), np.concatenate([c - op.lo, c - op.hi]), "relu")
            a = np.concatenate([np.eye(k), -np.eye(k)], axis=0)
            c, pending, ident = np.full(k, float(op.lo)), True, False
    if not acts and not pending:
        raise UnsupportedModelError("the network has no layers")
    # The last layer of a dqnc MLP is linear: whatever is pending (or an identity) becomes it.
    weights.extend([a.astype(np.float32), c.astype(np.float32)])
    return weights, acts


def _chw_to_hwc_rows(h: int, w: int, c: int) -> np.ndarray:
    """``perm`` with ``hwc_flat = chw_flat[perm]``: the rows of a Dense kernel written for a CHW
    flatten, reordered for dqnc's HWC flatten."""
    return np.arange(h * w * c).reshape(c, h, w).transpose(1, 2, 0).ravel()


def _permute_rows(ops: list[Op], perm: np.ndarray, what: str) -> list[Op]:
    """The ops after a CHW flatten, rewritten to read an HWC flatten (up to the first Affine)."""
    out: list[Op] = []
    for i, op in enumerate(ops):
        if isinstance(op, Affine):
            return [*out, Affine(op.w[perm], op.b), *ops[i + 1:]]
        if isinstance(op, ScaleShift):
            s, t = (np.asarray(v) for v in (op.scale, op.shift))
            out.append(ScaleShift(s[perm] if s.size > 1 else s, t[perm] if t.size > 1 else t))
        elif isinstance(op, Act | Clip):
            out.append(op)
        else:
            raise UnsupportedModelError(f"{what}: a {type(op).__name__} after the flatten is not supported")
    raise UnsupportedModelError(f"{what}: no Dense layer after the flatten (a Q-network ends in one)")


@dataclass
class _ConvFold:
    """The state of :func:`fold_conv` walking the layers before the flatten."""

    weights: list[np.ndarray] = field(default_factory=list)
    acts: list[str] = field(default_factory=list)
    conv: list[tuple[int, int, int]] = field(default_factory=list)
    open: list[np.ndarray] | None = None  # the last conv's kernel and bias, not yet closed by an activation

    def close(self, act: str) -> None:
        assert self.open is not None
        self.weights.extend(a.astype(np.float32) for a in self.open)
        self.acts.append(act)
        self.open = None


def _input_affine(op: ScaleShift, channels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    s, t = np.asarray(op.scale, np.float64), np.asarray(op.shift, np.float64)
    if s.size not in (1, channels) or t.size not in (1, channels):
        raise UnsupportedModelError(f"{what}: a per-pixel input scaling ({s.size} values) cannot fold into a convolution; "
                                    "supported: one scale for all pixels (e.g. /255) or one per channel")
    return np.broadcast_to(s.ravel(), (channels,)), np.broadcast_to(t.ravel(), (channels,))


def fold_conv(ops: list[Op], hwc: tuple[int, int, int], what: str = "the network") -> tuple[
        list[np.ndarray], list[str], list[tuple[int, int, int]]]:
    """Compose a conv chain into plain dqnc conv weights ``[K0, b0, ..., W, b, ...]`` (HWIO kernels,
    Dense rows in HWC flatten order), one activation per hidden layer, and the ``(filters, kernel,
    stride)`` of each conv. Input scalings fold into the next kernel (exact for valid padding)."""
    h, w, c = hwc
    st = _ConvFold()
    scale, shift = np.ones(c), np.zeros(c)
    for i, op in enumerate(ops):
        if isinstance(op, Flatten):
            if st.open is not None:
                st.close("linear")
            if not st.conv:
                raise UnsupportedModelError(f"{what}: a flatten before any convolution")
            rest = ops[i + 1:] if op.order == "HWC" else _permute_rows(ops[i + 1:], _chw_to_hwc_rows(h, w, c), what)
            dense_w, dense_acts = fold(rest, h * w * c)
            return st.weights + dense_w, st.acts + dense_acts, st.conv
        if isinstance(op, ScaleShift):
            s, t = _input_affine(op, c, what)
            if st.open is None:
                scale, shift = scale * s, shift * s + t
            else:  # after a conv, before its activation: scale its output channels
                st.open = [st.open[0] * s, st.open[1] * s + t]
        elif isinstance(op, Conv):
            k = np.asarray(op.w, np.float64)
            if st.open is not None:
                raise UnsupportedModelError(f"{what}: two convolutions with no activation between them are not supported")
            if k.shape[0] != k.shape[1] or k.shape[2] != c:
                raise UnsupportedModelError(f"{what}: conv kernel {tuple(k.shape)} (HWIO) is not square or does not read "
                                            f"{c} channels; supported: square kernels")
            st.open = [k * scale[None, None, :, None], np.asarray(op.b, np.float64) + np.einsum("hwio,i->o", k, shift)]
            h, w, c = (h - k.shape[0]) // op.stride + 1, (w - k.shape[1]) // op.stride + 1, k.shape[3]
            if h < 1 or w < 1:
                raise UnsupportedModelError(f"{what}: conv layer {len(st.conv)} leaves no pixels")
            st.conv.append((int(k.shape[3]), int(k.shape[0]), int(op.stride)))
            scale, shift = np.ones(c), np.zeros(c)
        elif isinstance(op, Act):
            if st.open is None:
                raise UnsupportedModelError(f"{what}: an activation on the input image is not supported")
            st.close(op.name)
        else:
            raise UnsupportedModelError(f"{what}: a {type(op).__name__} before the flatten is not supported "
                                        "(supported: Conv2d, activations, Flatten, then Linear layers)")
    raise UnsupportedModelError(f"{what}: the conv layers are never flattened into Dense layers")


def check_activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{where}: activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return name
