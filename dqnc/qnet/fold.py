"""Exact rewrites of plain weights ``[W0, b0, ..., Wn, bn]`` that keep every greedy action.

- Input standardization ``x' = (x - mean) / std`` folds into the first layer (Dense MLPs only:
  a convolution cannot absorb a per-pixel scaling).
- An output scaling ``q' = (q - mean) / std`` folds into the last layer (any family).
- Centering ``Q - mean_a(Q)`` is linear in the last layer: subtract the mean output column.
- A dueling head ``Q = V + A - mean(A)`` folds into one linear layer.

The functions do no dtype conversion of their own: callers pick float64 (and round once) where
the composition must be exact, and the arithmetic is the one each stage has always done.
"""

from __future__ import annotations

import numpy as np


def standardize_input(w0: np.ndarray, b0: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first layer that reads standardized inputs ``(x - mean) / std`` and computes what
    ``(w0, b0)`` computed on raw ``x``."""
    return w0 * std[:, None], b0 + mean @ w0


def unstandardize_input(w0: np.ndarray, b0: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`standardize_input`: a first layer reading raw inputs."""
    w = w0 / std[:, None]
    return w, b0 - mean @ w


def scale_output(w: np.ndarray, b: np.ndarray, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
    """The last layer computing ``(q - mean) / std``."""
    return w / std, (b - mean) / std


def unscale_output(w: np.ndarray, b: np.ndarray, mean: float, std: float) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`scale_output`."""
    return w * std, b * std + mean


def center_q(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The last layer computing ``Q - mean_a(Q)``."""
    return kernel - kernel.mean(axis=1, keepdims=True), bias - bias.mean()


def fold_dueling(wv: np.ndarray, bv: np.ndarray, wa: np.ndarray, ba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold V (h->1) and A (h->n) into the single linear head Q = V + A - mean(A)."""
    w = wv + wa - wa.mean(axis=1, keepdims=True)
    b = bv + ba - ba.mean()
    return w.astype(np.float32), b.astype(np.float32)
