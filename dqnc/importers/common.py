"""What every importer produces: the source network as a chain of simple ops, and its folding.

An importer reads a file into :class:`Source`: a list of ops applied in order to a flat
observation (affine maps, per-feature scale/shift from preprocessing layers, activations,
clipping), evaluated in float32 exactly as the source framework would (:meth:`Source.forward`).
:func:`fold` composes that chain into the plain MLP a dqnc artifact holds: preprocessing folds
into the next affine map, consecutive affine maps merge, and a clip becomes one extra ReLU
layer (``clip(z, lo, hi) = relu(z - lo) - relu(z - hi) + lo``), so the deployed policy takes
raw observations and needs no preprocessing code of its own.
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


Op = Affine | ScaleShift | Act | Clip


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
        return run_ops(self.ops, obs)

    def prepend(self, ops: list[Op], note: dict[str, Any]) -> None:
        """Put observation preprocessing (e.g. VecNormalize) in front of the network."""
        inner = self.reference
        self.ops = [*ops, *self.ops]
        if inner is not None:
            self.reference = lambda obs: inner(run_ops(ops, obs))
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


def run_ops(ops: list[Op], obs: np.ndarray) -> np.ndarray:
    x = np.asarray(obs, np.float32).reshape(len(obs), -1)
    for op in ops:
        if isinstance(op, Affine):
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
    pending = False

    def close(w: np.ndarray, b: np.ndarray, act: str) -> None:
        weights.extend([w.astype(np.float32), b.astype(np.float32)])
        acts.append(act)

    for op in ops:
        if isinstance(op, Affine):
            w = op.w.astype(np.float64)
            if w.shape[0] != a.shape[1]:
                raise UnsupportedModelError(f"layer shapes do not chain: {a.shape[1]} features into a {w.shape} kernel")
            a, c, pending = a @ w, c @ w + op.b.astype(np.float64), True
        elif isinstance(op, ScaleShift):
            s = np.broadcast_to(op.scale.astype(np.float64), (a.shape[1],))
            t = np.broadcast_to(op.shift.astype(np.float64), (a.shape[1],))
            a, c, pending = a * s, c * s + t, True
        elif isinstance(op, Act):
            if op.name == "linear":
                continue
            close(a, c, op.name)
            a, c, pending = np.eye(a.shape[1]), np.zeros(a.shape[1]), False
        else:  # Clip -> one ReLU layer of twice the width, then a linear map back
            k = a.shape[1]
            close(np.concatenate([a, a], axis=1), np.concatenate([c - op.lo, c - op.hi]), "relu")
            a = np.concatenate([np.eye(k), -np.eye(k)], axis=0)
            c, pending = np.full(k, float(op.lo)), True
    if not acts and not pending:
        raise UnsupportedModelError("the network has no layers")
    # The last layer of a dqnc MLP is linear: whatever is pending (or an identity) becomes it.
    weights.extend([a.astype(np.float32), c.astype(np.float32)])
    return weights, acts


def check_activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{where}: activation {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return name
