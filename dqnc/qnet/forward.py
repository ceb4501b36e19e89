"""The one numpy forward pass of every dqnc Q-network (MLP or conv), used in every hot loop.

:func:`forward` runs plain weights ``[W0, b0, W1, b1, ...]``: 4-D kernels are valid-padding NHWC
convolutions, 2-D ones Dense layers (the input is flattened before the first). An MLP costs
~10 us per batch; a conv net runs a whole batch in a few numpy calls. :class:`NumpyQNet` holds the
weights and the input layout; ``NumpyMLP`` and ``NumpyConvNet`` (:mod:`dqnc.nets`,
:mod:`dqnc.nets_conv`) are its two historical constructors.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from dqnc.qnet.layout import LAYOUTS

CHUNK = 256  # image observations per numpy forward call (see NumpyQNet.__call__)


def act(x: np.ndarray, activation: str) -> np.ndarray:
    """Apply a hidden activation (in place where numpy allows)."""
    if activation == "relu":
        return np.maximum(x, 0.0, out=x)
    if activation == "tanh":
        return np.tanh(x, out=x)
    if activation == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0))).astype(np.float32)
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    if activation == "linear":
        return x
    raise ValueError(f"unknown activation {activation!r}")


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """Valid-padding NHWC convolution as one tensordot over strided windows (no copies until then)."""
    kh, kw = kernel.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    # win: [N, H', W', C, kh, kw]; kernel: [kh, kw, C, F]
    out = np.tensordot(win, kernel.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2]))
    out += bias
    return out.astype(np.float32, copy=False)


def forward(layers: list[tuple[np.ndarray, np.ndarray]], activations: list[str], x: np.ndarray,
            strides: list[int] | tuple[int, ...] = ()) -> np.ndarray:
    """Q-values of float32 inputs ``x`` (images in NHWC before any conv kernel) through ``layers``."""
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        if w.ndim == 4:
            x = conv2d(x, w, b, strides[i])
        else:
            if x.ndim > 2:  # images reach Dense layers flattened (HWC order)
                x = x.reshape(len(x), -1)
            x = x @ w
            x += b
        if i < last:
            x = act(x, activations[i])
    return x


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class NumpyQNet:
    """Q-values of a plain network in numpy, for a batch of observations: flat vectors for an MLP
    (image observations are flattened), ``[N, H, W, C]`` or ``[N, C, H, W]`` (or flattened in
    that order) for a conv net reading ``layout``."""

    def __init__(self, weights: list[np.ndarray], activations: list[str], strides: list[int] | tuple[int, ...] = (),
                 obs_shape: tuple[int, ...] | None = None, layout: str = "flat") -> None:
        if strides and layout not in LAYOUTS:
            raise ValueError(f"unknown image layout {layout!r}; known: {', '.join(LAYOUTS)}")
        self.strides = [int(s) for s in strides]
        self.activations = list(activations)
        self.layout = layout
        self.set_weights(weights)
        self.obs_shape = tuple(int(s) for s in obs_shape) if obs_shape is not None else (int(self.layers[0][0].shape[0]),)

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.layers = [(np.asarray(weights[i], np.float32), np.asarray(weights[i + 1], np.float32))
                       for i in range(0, len(weights), 2)]
        n_conv = sum(1 for w, _ in self.layers if w.ndim == 4)
        if n_conv != len(self.strides) or len(self.activations) != len(self.layers) - 1:
            raise ValueError(f"malformed network: {n_conv} conv kernels, {len(self.strides)} strides, "
                             f"{len(self.layers)} layers, {len(self.activations)} activations")

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.obs_shape))

    @property
    def n_actions(self) -> int:
        return int(self.layers[-1][0].shape[1])

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        if not self.strides:
            x = np.asarray(obs, np.float32)
            return forward(self.layers, self.activations, x.reshape(len(x), -1) if x.ndim > 2 else x)
        # OpenBLAS threads on a busy 2-core host make these small products ~100x slower (measured:
        # 27 ms instead of 0.23 ms for 8 MinAtar observations); one thread is what a batch this size needs.
        obs = np.asarray(obs)
        n = obs.size // self.obs_dim if obs.ndim > 1 else 1
        with _blas_controller().limit(limits=1, user_api="blas"):
            if n <= CHUNK:
                return self._images(obs)
            # Large batches (eval's visited states) in chunks: the strided windows of one Atari frame
            # stack are 400 KB as float32, so 10,000 states at once would need 4 GB.
            flat = obs.reshape(n, -1)
            return np.concatenate([self._images(flat[i:i + CHUNK]) for i in range(0, n, CHUNK)])

    def _images(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, np.float32).reshape(-1, *self.obs_shape)
        if self.layout == "CHW":  # the model's Permute layer
            x = x.transpose(0, 2, 3, 1)
        return forward(self.layers, self.activations, x, self.strides)
