"""MLP Q-networks: the historical names, kept importable; the family lives in :mod:`dqnc.qnet`.

``NetSpec(...)`` makes an MLP :class:`~dqnc.qnet.spec.QNetSpec`; builders, the numpy forward,
effective weights and the dueling fold are the family's own (one of each for MLPs and conv nets).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dqnc.qnet.fold import fold_dueling
from dqnc.qnet.forward import NumpyQNet
from dqnc.qnet.keras_build import DuelingCombine, build_plain, build_trainable
from dqnc.qnet.sidecar import MLP_FILE, save_mlp
from dqnc.qnet.sidecar import load as _load
from dqnc.qnet.spec import QNetSpec
from dqnc.qnet.weights import effective_weights as dense_weights

__all__ = ["MLP_FILE", "DuelingCombine", "NetSpec", "NumpyMLP", "build_plain_mlp", "build_q_network", "dense_weights",
           "fold_dueling", "load_mlp", "save_mlp"]


def NetSpec(obs_dim: int, n_actions: int, hidden: tuple[int, ...] = (64, 64), activation: str = "relu",  # noqa: N802
            dueling: bool = False) -> QNetSpec:
    """An MLP spec (the historical constructor)."""
    return QNetSpec.mlp(obs_dim, n_actions, tuple(hidden), activation, dueling)


def build_q_network(spec: QNetSpec, name: str = "q_network") -> Any:
    """The trainable Q-network (Functional; a dueling head when ``spec.dueling``)."""
    return build_trainable(spec, name)


def build_plain_mlp(spec: QNetSpec, weights: list[np.ndarray] | None = None, name: str = "q_network") -> Any:
    """The deployable Sequential MLP (no dueling layer), optionally with given weights."""
    return build_plain(spec, weights, name)


class NumpyMLP(NumpyQNet):
    """Q-values of a plain MLP in numpy (:class:`~dqnc.qnet.forward.NumpyQNet` with one activation
    for every hidden layer, or a list)."""

    def __init__(self, weights: list[np.ndarray], activation: str | list[str] = "relu") -> None:
        n_hidden = len(weights) // 2 - 1
        super().__init__(weights, [activation] * n_hidden if isinstance(activation, str) else list(activation))


def load_mlp(path: Any) -> NumpyMLP:
    net = _load(path)
    if net.strides:
        raise ValueError(f"{path}: malformed MLP weights (a conv net's file)")
    return NumpyMLP([a for layer in net.layers for a in layer], net.activations)
