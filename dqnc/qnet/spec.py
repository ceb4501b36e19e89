"""QNetSpec: what a dqnc Q-network is, as data; its family and the capability table.

A spec is the network a plain artifact holds (dueling heads are folded into one output layer
when saved, so ``dueling`` matters only to the trainable build). The manifest's ``network``
entry and the sidecar files (``mlp.npz``, ``convnet.npz``) keep their formats: :meth:`to_dict`
writes exactly the keys each family wrote before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqnc.errors import UsageError
from dqnc.qnet.layout import LAYOUTS, to_hwc

FAMILIES = ("mlp", "conv")

# MinAtar's network (Young & Tian 2019): one 3x3 conv with 16 filters, stride 1, then 128 units.
MINATAR_CONV: tuple[tuple[int, int, int], ...] = ((16, 3, 1),)
# The Nature DQN network (Mnih et al. 2015) for 84x84x4 Atari frames, then 512 units.
NATURE_CONV: tuple[tuple[int, int, int], ...] = ((32, 8, 4), (64, 4, 2), (64, 3, 1))

# The capability table: feature -> (families that have it, the refusal for the others). Each
# refusal is worded here once; stages ask ``spec.supports(f)`` and raise ``spec.refusal(f)``.
FEATURES: dict[str, tuple[frozenset[str], str]] = {
    "prune.weights": (frozenset(FAMILIES), ""),
    "prune.structure.units": (frozenset(FAMILIES), ""),
    "prune.structure.2by4": (frozenset({"mlp"}), "--structure 2by4 is for Dense MLPs; for a conv net use --structure weights"),
    "prune.finetune.rl": (frozenset({"mlp"}), "--finetune rl covers Dense MLPs so far; for a conv net use --finetune distill or none"),
    "prune.distribution.erk": (frozenset({"mlp"}), "--distribution erk covers Dense MLPs so far; for a conv net use uniform "
                                                    "(or --layer-sparsity)"),
    # Inputs standardized and folded into the first layer (distillation, int8 preparation): a
    # convolution cannot absorb a per-pixel scaling, and 0/1 or 0..255 pixels need none.
    "fold.input_standardization": (frozenset({"mlp"}), "a conv net's inputs are not standardized: a convolution cannot "
                                                        "absorb a per-pixel scaling"),
    "quantize.equalize": (frozenset({"mlp"}), "cross-layer equalization covers Dense MLPs"),
    "quantize.weight_bits": (frozenset({"mlp"}), "--weight-bits 4|2 clusters plain Dense MLPs; this model has other layers "
                                                  "(quantize it with --weight-bits 8)"),
    "runtime.c": (frozenset(FAMILIES), ""),
    # export recomputes TFLM's integer arithmetic exactly (dqnc.cpolicy): fully connected chains and conv nets.
    "tflm.recompute": (frozenset(FAMILIES), ""),
}


@dataclass(frozen=True)
class QNetSpec:
    """A Q-network: ``conv`` layers ``(filters, kernel, stride)`` (none for an MLP), then Dense
    ``hidden`` layers, then a linear output of ``n_actions``. ``activations`` has one entry per
    conv and hidden layer. ``obs_shape`` is the model's input: ``(obs_dim,)`` for an MLP, the
    env's image shape in ``layout`` for a conv net."""

    obs_shape: tuple[int, ...]
    n_actions: int
    layout: str = "flat"
    conv: tuple[tuple[int, int, int], ...] = ()
    hidden: tuple[int, ...] = (64, 64)
    activations: tuple[str, ...] = ("relu", "relu")
    dueling: bool = False

    def __post_init__(self) -> None:
        if len(self.activations) != len(self.conv) + len(self.hidden):
            raise ValueError(f"{len(self.activations)} activations for {len(self.conv)} conv and "
                             f"{len(self.hidden)} hidden layers")
        if (self.layout in LAYOUTS) != bool(self.conv) or self.layout not in (*LAYOUTS, "flat"):
            raise ValueError(f"layout {self.layout!r} does not fit {len(self.conv)} conv layers")

    # --- constructors ------------------------------------------------------------------------

    @classmethod
    def mlp(cls, obs_dim: int, n_actions: int, hidden: tuple[int, ...] = (64, 64),
            activation: str | tuple[str, ...] | list[str] = "relu", dueling: bool = False) -> QNetSpec:
        acts = (activation,) * len(hidden) if isinstance(activation, str) else tuple(activation)
        return cls((int(obs_dim),), int(n_actions), "flat", (), tuple(int(h) for h in hidden), acts, bool(dueling))

    @classmethod
    def conv_net(cls, obs_shape: tuple[int, ...], n_actions: int, conv: Any = MINATAR_CONV,
                 hidden: tuple[int, ...] = (128,), activation: str = "relu", dueling: bool = False,
                 layout: str = "HWC") -> QNetSpec:
        conv = tuple(tuple(int(v) for v in c) for c in conv)
        hidden = tuple(int(h) for h in hidden)
        return cls(tuple(int(s) for s in obs_shape), int(n_actions), layout, conv, hidden,  # type: ignore[arg-type]
                   (activation,) * (len(conv) + len(hidden)), bool(dueling))

    @classmethod
    def from_weights(cls, weights: list[np.ndarray], activations: list[str] | tuple[str, ...]) -> QNetSpec:
        """The MLP whose plain weights ``[W0, b0, ...]`` these are."""
        return cls.mlp(int(weights[0].shape[0]), int(weights[-1].shape[0]),
                       tuple(int(w.shape[1]) for w in weights[0:-2:2]), tuple(activations))

    @classmethod
    def for_env(cls, env: Any, conv: Any, hidden: Any, activation: str, dueling: bool) -> QNetSpec:
        """The network a train config asks for on ``env`` (``conv`` empty/None: an MLP), or a
        one-line UsageError when conv layers meet observations that are not 3-D images."""
        if not conv:
            return cls.mlp(env.obs_dim, env.n_actions, tuple(hidden), activation, dueling)
        shape = tuple(env.obs_shape)
        if env.obs_layout not in LAYOUTS:
            fix = ("drop 'conv' to train an MLP, or give the frames a channel axis (e.g. stack them with the "
                   "FrameStackObservation wrapper in env_kwargs 'wrappers')" if len(shape) == 2 else
                   "drop 'conv' to train an MLP, or use an image env such as MinAtar/Breakout-v1 or ALE/Breakout-v5")
            raise UsageError(f"'conv' needs (height, width, channels) image observations (or channels first); "
                             f"env {env.id!r} gives {len(shape)}-D observations {shape}: {fix}")
        spec = cls.conv_net(shape, env.n_actions, conv, tuple(hidden), activation, dueling, env.obs_layout)
        spec.feature_shapes()
        return spec

    @classmethod
    def from_network(cls, env: Any, network: dict[str, Any]) -> QNetSpec:
        """The spec a manifest's ``network`` entry describes (artifacts before layouts were HWC)."""
        hidden = tuple(int(h) for h in network["hidden"])
        if network.get("conv"):
            return cls.conv_net(tuple(env.obs_shape), env.n_actions, network["conv"], hidden,
                                network.get("activation", "relu"), bool(network.get("dueling", False)),
                                network.get("layout", "HWC"))
        acts = network.get("activations") or [network.get("activation", "relu")] * len(hidden)
        return cls.mlp(int(network.get("obs_dim", env.obs_dim)), env.n_actions, hidden, tuple(acts),
                       bool(network.get("dueling", False)))

    @classmethod
    def from_model(cls, model: Any) -> QNetSpec:
        """The spec of a tf_keras Q-network (plain, dueling, or wrapped by TFMOT); ValueError
        names the layers of a model that is neither a Dense chain nor a dqnc conv net."""
        from dqnc.qnet.keras_build import spec_of_model

        return spec_of_model(cls, model)  # type: ignore[no-any-return]

    @classmethod
    def from_sidecar(cls, path: str | Path) -> QNetSpec:
        """The spec of a sidecar file (``mlp.npz`` or ``convnet.npz``)."""
        from dqnc.qnet.sidecar import read

        arrays, meta = read(path)
        acts = tuple(meta["activations"])
        if "strides" not in meta:
            return cls.from_weights(arrays, acts)
        kernels = [w for w in arrays[0::2] if w.ndim == 4]
        conv = tuple((int(k.shape[3]), int(k.shape[0]), int(s)) for k, s in zip(kernels, meta["strides"]))
        hidden = tuple(int(w.shape[1]) for w in arrays[2 * len(kernels):-2:2])
        return cls(tuple(meta["obs_shape"]), int(arrays[-1].shape[0]), meta["layout"], conv, hidden, acts)

    # --- the family ----------------------------------------------------------------------------

    @property
    def family(self) -> str:
        """"conv" when the network has conv layers, else "mlp": the one family predicate."""
        return "conv" if self.conv else "mlp"

    def supports(self, feature: str) -> bool:
        return self.family in FEATURES[feature][0]

    def refusal(self, feature: str) -> str:
        """The one-line reason ``feature`` does not apply to this family ("" if it does)."""
        return "" if self.supports(feature) else FEATURES[feature][1]

    def require(self, feature: str) -> None:
        """Raise the feature's UsageError unless this family supports it."""
        if not self.supports(feature):
            raise UsageError(self.refusal(feature))

    @property
    def prunable_kinds(self) -> tuple[str, ...]:
        """The Keras layer types magnitude pruning wraps."""
        return ("Conv2D", "Dense") if self.family == "conv" else ("Dense",)

    @property
    def sidecar_file(self) -> str:
        from dqnc.qnet.sidecar import CONV_FILE, MLP_FILE

        return CONV_FILE if self.family == "conv" else MLP_FILE

    # --- shapes ----------------------------------------------------------------------------

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.obs_shape))

    @property
    def activation(self) -> str:
        """The manifest's single activation (the first layer's)."""
        return self.activations[0] if self.activations else "relu"

    @property
    def strides(self) -> list[int]:
        return [int(c[2]) for c in self.conv]

    @property
    def hwc(self) -> tuple[int, int, int]:
        return to_hwc(self.obs_shape, self.layout)

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """The (H, W, C) after each conv layer; raises UsageError when an image gets too small."""
        if not self.conv:
            return []
        h, w, c = self.hwc
        shapes = []
        for i, (filters, kernel, stride) in enumerate(self.conv):
            if kernel > h or kernel > w:
                raise UsageError(f"conv layer {i} ({kernel}x{kernel}) does not fit its {h}x{w} input: "
                                 "use smaller kernels or strides, or fewer conv layers")
            h, w, c = (h - kernel) // stride + 1, (w - kernel) // stride + 1, filters
            shapes.append((h, w, c))
        return shapes

    def params(self) -> int:
        """Weights and biases of the plain (dueling-folded) network."""
        total, c = 0, (self.hwc[2] if self.conv else 0)
        shapes = self.feature_shapes()
        for (filters, kernel, _), _shape in zip(self.conv, shapes):
            total += kernel * kernel * c * filters + filters
            c = filters
        first = int(np.prod(shapes[-1])) if shapes else self.obs_dim
        dims = [first, *self.hidden, self.n_actions]
        return total + int(sum(a * b + b for a, b in zip(dims, dims[1:])))

    # --- manifest, builders, numpy ---------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``network`` entry (each family's keys, in the order dqnc always wrote)."""
        if self.family == "mlp":
            return {"obs_dim": self.obs_dim, "n_actions": self.n_actions, "hidden": list(self.hidden),
                    "activation": self.activation, "dueling": self.dueling}
        return {"obs_shape": list(self.obs_shape), "obs_dim": self.obs_dim, "layout": self.layout,
                "n_actions": self.n_actions, "conv": [list(c) for c in self.conv], "hidden": list(self.hidden),
                "activation": self.activation, "dueling": self.dueling}

    def to_network(self) -> dict[str, Any]:
        """:meth:`to_dict` plus how the plain model is saved."""
        return self.to_dict() | {"saved_as": "sequential_conv" if self.family == "conv" else "sequential_mlp"}

    def plain(self) -> QNetSpec:
        """The saved network (the dueling head folded into one output layer)."""
        return QNetSpec(self.obs_shape, self.n_actions, self.layout, self.conv, self.hidden, self.activations)

    def build_trainable(self, name: str = "q_network") -> Any:
        from dqnc.qnet.keras_build import build_trainable

        return build_trainable(self, name)

    def build_plain(self, weights: list[np.ndarray] | None = None, name: str = "q_network") -> Any:
        from dqnc.qnet.keras_build import build_plain

        return build_plain(self, weights, name)

    def numpy(self, weights: list[np.ndarray]) -> Any:
        """The numpy forward of this network with plain weights ``weights``."""
        from dqnc.qnet.forward import NumpyQNet

        return NumpyQNet(weights, list(self.activations), self.strides, self.obs_shape, self.layout)

    def save_sidecar(self, directory: str | Path, weights: list[np.ndarray]) -> None:
        """Write this network's TF-free weights file (``mlp.npz`` or ``convnet.npz``) into ``directory``."""
        from dqnc.qnet.sidecar import save_conv, save_mlp

        path = Path(directory) / self.sidecar_file
        if self.family == "conv":
            save_conv(path, weights, self)
        else:
            save_mlp(path, weights, list(self.activations))

