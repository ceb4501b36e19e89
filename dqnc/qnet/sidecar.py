"""The TF-free weights file beside every dqnc SavedModel: ``mlp.npz`` or ``convnet.npz``.

Both hold the plain weights as ``p0, p1, ...`` and the hidden ``activations``; a conv net's file
adds ``strides``, ``obs_shape`` and ``layout`` (files from before layouts were recorded are HWC).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dqnc.qnet.forward import NumpyQNet

MLP_FILE = "mlp.npz"
CONV_FILE = "convnet.npz"


def save_mlp(path: Any, weights: list[np.ndarray], activations: list[str]) -> None:
    """Save a plain MLP's weights beside its SavedModel so TF-free tools can run it in numpy."""
    arrays = {f"p{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    np.savez(path, activations=np.array(activations), **arrays)


def save_conv(path: Any, weights: list[np.ndarray], spec: Any) -> None:
    """Save a plain conv net beside its SavedModel so TF-free tools can run it in numpy."""
    arrays = {f"p{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    n_layers = len(weights) // 2
    np.savez(path, activations=np.array([spec.activation] * (n_layers - 1)),
             strides=np.array([c[2] for c in spec.conv], np.int64), obs_shape=np.array(spec.obs_shape, np.int64),
             layout=np.array(spec.layout), **arrays)


def read(path: Any) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The weights and metadata of either file (``strides`` present only for conv nets)."""
    with np.load(path, allow_pickle=False) as d:
        n = len([k for k in d.files if k.startswith("p")])
        weights = [d[f"p{i}"] for i in range(n)]
        meta: dict[str, Any] = {"activations": [str(a) for a in d["activations"]]}
        if "strides" in d.files:
            meta.update(strides=[int(s) for s in d["strides"]], obs_shape=tuple(int(s) for s in d["obs_shape"]),
                        layout=str(d["layout"]) if "layout" in d.files else "HWC")
    return weights, meta


def load(path: Any) -> NumpyQNet:
    """The numpy forward of either file; ValueError for a malformed one."""
    weights, meta = read(path)
    n, acts = len(weights), meta["activations"]
    if "strides" in meta:
        if n < 2 or n % 2:
            raise ValueError(f"{path}: malformed conv net weights ({n} arrays)")
        return NumpyQNet(weights, acts, meta["strides"], meta["obs_shape"], meta["layout"])
    if n < 2 or n % 2 or len(acts) != n // 2 - 1:
        raise ValueError(f"{path}: malformed MLP weights ({n} arrays, {len(acts)} activations)")
    return NumpyQNet(weights, acts)
