"""Q-network builders and the numpy forward pass used in every hot loop.

Networks are plain Sequential/Functional tf_keras models (TFMOT cannot wrap subclassed ones).
A dueling head trains as two linear streams; because ``Q = V + A - mean(A)`` is linear in the
last hidden layer, it folds exactly into one Dense layer when saved, so every artifact holds a
plain Sequential MLP that pruning, quantization and the runtimes handle alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

@dataclass(frozen=True)
class NetSpec:
    obs_dim: int
    n_actions: int
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    dueling: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "obs_dim": self.obs_dim,
            "n_actions": self.n_actions,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "dueling": self.dueling,
        }


def build_q_network(spec: NetSpec, name: str = "q_network") -> Any:
    """Build the trainable Q-network (Functional when dueling, else Sequential)."""
    from dqnc.keras import keras

    k = keras()
    scale = 2.0 if spec.activation == "relu" else 1.0
    inputs = k.Input(shape=(spec.obs_dim,), name="obs")
    x = inputs
    for i, width in enumerate(spec.hidden):
        x = k.layers.Dense(width, activation=spec.activation, kernel_initializer=k.initializers.VarianceScaling(scale=scale), name=f"dense_{i}")(x)
    if not spec.dueling:
        q = k.layers.Dense(spec.n_actions, name="q_values")(x)
        return k.Model(inputs, q, name=name)
    value = k.layers.Dense(1, name="value")(x)
    adv = k.layers.Dense(spec.n_actions, name="advantage")(x)
    q = DuelingCombine(name="q_values")([value, adv])
    return k.Model(inputs, q, name=name)


class _LazyDueling:
    """Builds the DuelingCombine layer class on first use so this module never imports TF."""

    _cls: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._cls is None:
            from dqnc.keras import keras, tf

            k, t = keras(), tf()

            class _DuelingCombine(k.layers.Layer):
                def call(self, inputs):  # type: ignore[override]
                    value, adv = inputs
                    return value + adv - t.reduce_mean(adv, axis=-1, keepdims=True)

            type(self)._cls = _DuelingCombine
        return self._cls(*args, **kwargs)


DuelingCombine = _LazyDueling()


def dense_weights(model: Any) -> list[np.ndarray]:
    """Return [W0, b0, W1, b1, ...] of the equivalent plain MLP (dueling heads folded)."""
    layers = [l for l in model.layers if l.weights]
    names = [l.name for l in layers]
    if "value" in names and "advantage" in names:
        trunk = [l for l in layers if l.name not in ("value", "advantage")]
        out: list[np.ndarray] = []
        for layer in trunk:
            w, b = layer.get_weights()
            out += [w, b]
        wv, bv = model.get_layer("value").get_weights()
        wa, ba = model.get_layer("advantage").get_weights()
        out += list(fold_dueling(wv, bv, wa, ba))
        return out
    return [w for l in layers for w in l.get_weights()]


def fold_dueling(wv: np.ndarray, bv: np.ndarray, wa: np.ndarray, ba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fold V (h->1) and A (h->n) into the single linear head Q = V + A - mean(A)."""
    w = wv + wa - wa.mean(axis=1, keepdims=True)
    b = bv + ba - ba.mean()
    return w.astype(np.float32), b.astype(np.float32)


def build_plain_mlp(spec: NetSpec, weights: list[np.ndarray] | None = None, name: str = "q_network") -> Any:
    """Build the deployable Sequential MLP (no dueling layer), optionally with given weights."""
    from dqnc.keras import keras

    k = keras()
    layers = [k.Input(shape=(spec.obs_dim,), name="obs")]
    for i, width in enumerate(spec.hidden):
        layers.append(k.layers.Dense(width, activation=spec.activation, name=f"dense_{i}"))
    layers.append(k.layers.Dense(spec.n_actions, name="q_values"))
    model = k.Sequential(layers, name=name)
    if weights is not None:
        model.set_weights(weights)
    return model


def _act(x: np.ndarray, activation: str) -> np.ndarray:
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


class NumpyMLP:
    """Q-values of a plain MLP in numpy: ~10 us per batch, no framework call per env step."""

    def __init__(self, weights: list[np.ndarray], activation: str | list[str] = "relu") -> None:
        n_hidden = len(weights) // 2 - 1
        self.activations = [activation] * n_hidden if isinstance(activation, str) else list(activation)
        self.set_weights(weights)

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.layers = [
            (np.asarray(weights[i], np.float32), np.asarray(weights[i + 1], np.float32))
            for i in range(0, len(weights), 2)
        ]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, np.float32)
        if x.ndim > 2:  # image observations (rollouts keep their shape): an MLP reads them flattened
            x = x.reshape(len(x), -1)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            x = x @ w
            x += b
            if i < last:
                x = _act(x, self.activations[i])
        return x


MLP_FILE = "mlp.npz"


def save_mlp(path: Any, weights: list[np.ndarray], activations: list[str]) -> None:
    """Save a plain MLP's weights beside its SavedModel so TF-free tools can run it in numpy."""
    arrays = {f"p{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    np.savez(path, activations=np.array(activations), **arrays)


def load_mlp(path: Any) -> NumpyMLP:
    with np.load(path, allow_pickle=False) as d:
        n = len([k for k in d.files if k.startswith("p")])
        weights = [d[f"p{i}"] for i in range(n)]
        activations = [str(a) for a in d["activations"]]
    if n < 2 or n % 2 or len(activations) != n // 2 - 1:
        raise ValueError(f"{path}: malformed MLP weights ({n} arrays, {len(activations)} activations)")
    return NumpyMLP(weights, activations)
