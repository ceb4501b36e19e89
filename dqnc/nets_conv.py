"""Conv Q-networks: the historical names, kept importable; the family lives in :mod:`dqnc.qnet`.

``ConvSpec(...)`` makes a conv :class:`~dqnc.qnet.spec.QNetSpec` (layout, feature shapes and
parameter count are the spec's); builders, im2col training, the numpy forward and the
``convnet.npz`` sidecar are the family's own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dqnc.qnet.forward import CHUNK, NumpyQNet, conv2d
from dqnc.qnet.keras_build import IM2COL_MAX_SIDE, build_plain, build_trainable, im2col_conv, im2col_pays, use_im2col
from dqnc.qnet.sidecar import CONV_FILE, save_conv
from dqnc.qnet.sidecar import load as _load
from dqnc.qnet.layout import LAYOUTS, to_hwc
from dqnc.qnet.spec import MINATAR_CONV, NATURE_CONV, QNetSpec

__all__ = ["CHUNK", "CONV_FILE", "IM2COL_MAX_SIDE", "LAYOUTS", "MINATAR_CONV", "NATURE_CONV", "ConvSpec", "NumpyConvNet",
           "build_conv_q_network", "build_plain_conv", "conv2d", "conv_spec_for", "im2col_conv", "im2col_pays",
           "load_conv", "save_conv", "spec_from_network", "to_hwc", "use_im2col"]


def ConvSpec(obs_shape: tuple[int, ...], n_actions: int, conv: Any = MINATAR_CONV,  # noqa: N802
             hidden: tuple[int, ...] = (128,), activation: str = "relu", dueling: bool = False,
             layout: str = "HWC") -> QNetSpec:
    """A conv spec (the historical constructor)."""
    return QNetSpec.conv_net(obs_shape, n_actions, conv, hidden, activation, dueling, layout)


def conv_spec_for(env: Any, conv: list[list[int]], hidden: list[int], activation: str, dueling: bool) -> QNetSpec:
    """A conv spec for an env, or a one-line error when its observations are not 3-D images."""
    return QNetSpec.for_env(env, conv, hidden, activation, dueling)


def spec_from_network(env: Any, network: dict[str, Any]) -> QNetSpec:
    return QNetSpec.from_network(env, network)


def build_conv_q_network(spec: QNetSpec, name: str = "q_network") -> Any:
    return build_trainable(spec, name)


def build_plain_conv(spec: QNetSpec, weights: list[np.ndarray] | None = None, name: str = "q_network") -> Any:
    return build_plain(spec, weights, name)


class NumpyConvNet(NumpyQNet):
    """Q-values of a plain conv net in numpy (:class:`~dqnc.qnet.forward.NumpyQNet` with strides
    and an image layout)."""

    def __init__(self, weights: list[np.ndarray], strides: list[int], obs_shape: tuple[int, ...],
                 activations: list[str], layout: str = "HWC") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown image layout {layout!r}; known: {', '.join(LAYOUTS)}")
        super().__init__(weights, activations, strides, obs_shape, layout)


def load_conv(path: Any) -> NumpyConvNet:
    net = _load(path)
    if not net.strides:
        raise ValueError(f"{path}: malformed conv net weights (no strides)")
    return NumpyConvNet([a for layer in net.layers for a in layer], net.strides, net.obs_shape, net.activations,
                        net.layout)
