"""The weights a tf_keras Q-network computes with, as plain ``[W0, b0, W1, b1, ...]``.

One extractor for every model dqnc handles: plain Sequential networks, trainable dueling ones
(the head folded, :func:`dqnc.qnet.fold.fold_dueling`), TFMOT pruning wrappers (kernels times
their masks) and clustering wrappers (``centroids[indices]``). Also the TFMOT-clone helpers the
prune paths share.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dqnc.qnet.fold import fold_dueling
from dqnc.qnet.layout import ACTIVATIONS

WEIGHTED = ("Dense", "Conv2D")


def _kernel(layer: Any, inner: Any) -> np.ndarray:
    if hasattr(layer, "cluster_centroids"):
        centroids = layer.cluster_centroids["kernel"].numpy()
        return np.asarray(centroids[layer.pulling_indices["kernel"].numpy()], np.float32)
    kernel = inner.kernel.numpy()
    for _, mask, _ in getattr(layer, "pruning_vars", ()):
        kernel = kernel * mask.numpy()
    return kernel


def effective_weights(model: Any) -> list[np.ndarray]:
    """``[W0, b0, ...]`` of the equivalent plain network: masks applied, clusters resolved,
    a dueling head folded."""
    out: list[np.ndarray] = []
    heads: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if type(inner).__name__ not in WEIGHTED:
            continue
        pair = (_kernel(layer, inner), inner.bias.numpy())
        if inner.name in ("value", "advantage"):
            heads[inner.name] = pair
        else:
            out += list(pair)
    if len(heads) == 2:
        out += list(fold_dueling(*heads["value"], *heads["advantage"]))
    else:
        out += [a for pair in heads.values() for a in pair]
    return out


def plain_mlp_weights(model: Any) -> tuple[list[np.ndarray], list[str]] | None:
    """Weights and hidden activations if ``model`` is a plain chain of biased Dense layers with a
    linear output, else None."""
    layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
    if not layers or any(type(l).__name__ != "Dense" for l in layers):
        return None
    acts = [l.get_config().get("activation", "linear") for l in layers]
    if any(a not in ACTIVATIONS for a in acts) or acts[-1] != "linear":
        return None
    if any(not l.use_bias for l in layers):
        return None
    return [w for l in layers for w in l.get_weights()], acts[:-1]


def clone_with_weights(model: Any, weights: list[np.ndarray]) -> Any:
    """A fresh copy of ``model``'s architecture holding ``weights``."""
    from dqnc.keras import keras

    clone = keras().models.clone_model(model)
    clone.set_weights(weights)
    return clone


def weights_for_wrapped(wrapped: Any, plain: Any) -> list[np.ndarray]:
    """Map a plain model's weights onto its pruning-wrapped clone (wrappers add mask/threshold/step)."""
    out = []
    by_layer = {l.name: l.get_weights() for l in plain.layers}
    for layer in wrapped.layers:
        inner = getattr(layer, "layer", None)
        if inner is None:
            out += by_layer.get(layer.name, [])
            continue
        kernel, bias = by_layer[inner.name]
        for w in layer.weights:
            n = w.name
            if "mask" in n:
                out.append(np.ones(w.shape, np.float32))
            elif "threshold" in n:
                out.append(np.zeros(w.shape, np.float32))
            elif "pruning_step" in n:
                out.append(np.array(-1, np.int64))
            elif "kernel" in n:
                out.append(kernel)
            elif "bias" in n:
                out.append(bias)
            else:
                out.append(w.numpy())
    return out
