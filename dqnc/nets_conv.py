"""Convolutional Q-networks for image observations (HWC or CHW), and their numpy forward pass.

A conv net is ``Conv2D`` layers (``[filters, kernel, stride]``, valid padding, ReLU-family
activation) then ``Flatten`` then Dense layers, as a plain tf_keras Sequential (TFMOT and the
TFLite converter need one). A dueling head folds into one Dense layer exactly as for MLPs
(:func:`dqnc.nets.dense_weights`). Acting and TF-free evaluation use :class:`NumpyConvNet`, which
runs the same arithmetic on a whole batch of observations in a few numpy calls.

Layout: the network reads observations in the env's own layout. Keras' CPU Conv2D is
channels-last, so a CHW env (Atari's stacked frames, ``(4, 84, 84)``) gets one ``Permute`` to HWC
as the model's first layer: the transpose happens once, inside the model, and every runtime
(numpy, LiteRT, TFLite Micro, the bundle's runner) is fed the env's observation unchanged. The
int8 TFLite graph carries it as one TRANSPOSE op, which TFLite Micro has.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from dqnc.errors import UsageError
from dqnc.nets import _act

CONV_FILE = "convnet.npz"

# MinAtar's network (Young & Tian 2019): one 3x3 conv with 16 filters, stride 1, then 128 units.
MINATAR_CONV: tuple[tuple[int, int, int], ...] = ((16, 3, 1),)
# The Nature DQN network (Mnih et al. 2015) for 84x84x4 Atari frames, then 512 units.
NATURE_CONV: tuple[tuple[int, int, int], ...] = ((32, 8, 4), (64, 4, 2), (64, 3, 1))
LAYOUTS = ("HWC", "CHW")
CHUNK = 256  # observations per numpy forward call (see NumpyConvNet.__call__)


def to_hwc(shape: tuple[int, ...], layout: str) -> tuple[int, int, int]:
    """The (height, width, channels) of an observation shape given in ``layout``."""
    if layout == "CHW":
        return (int(shape[1]), int(shape[2]), int(shape[0]))
    return (int(shape[0]), int(shape[1]), int(shape[2]))


@dataclass(frozen=True)
class ConvSpec:
    obs_shape: tuple[int, int, int]  # the model's input: the env's observation shape, in ``layout``
    n_actions: int
    conv: tuple[tuple[int, int, int], ...] = MINATAR_CONV
    hidden: tuple[int, ...] = (128,)
    activation: str = "relu"
    dueling: bool = False
    layout: str = "HWC"

    @property
    def hwc(self) -> tuple[int, int, int]:
        return to_hwc(self.obs_shape, self.layout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "obs_shape": list(self.obs_shape),
            "obs_dim": int(np.prod(self.obs_shape)),
            "layout": self.layout,
            "n_actions": self.n_actions,
            "conv": [list(c) for c in self.conv],
            "hidden": list(self.hidden),
            "activation": self.activation,
            "dueling": self.dueling,
        }

    def params(self) -> int:
        """Weights and biases of the plain (dueling-folded) network."""
        total, c = 0, self.hwc[2]
        for (filters, kernel, _), _shape in zip(self.conv, self.feature_shapes()):
            total += kernel * kernel * c * filters + filters
            c = filters
        dims = [int(np.prod(self.feature_shapes()[-1])), *self.hidden, self.n_actions]
        return total + int(sum(a * b + b for a, b in zip(dims, dims[1:])))

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """The (H, W, C) after each conv layer; raises UsageError when an image gets too small."""
        h, w, c = self.hwc
        shapes = []
        for i, (filters, kernel, stride) in enumerate(self.conv):
            if kernel > h or kernel > w:
                raise UsageError(f"conv layer {i} ({kernel}x{kernel}) does not fit its {h}x{w} input: "
                                 "use smaller kernels or strides, or fewer conv layers")
            h, w, c = (h - kernel) // stride + 1, (w - kernel) // stride + 1, filters
            shapes.append((h, w, c))
        return shapes


def conv_spec_for(env: Any, conv: list[list[int]], hidden: list[int], activation: str, dueling: bool) -> ConvSpec:
    """A ConvSpec for an env, or a one-line error when its observations are not 3-D images."""
    shape = tuple(env.obs_shape)
    if env.obs_layout not in LAYOUTS:
        fix = ("drop 'conv' to train an MLP, or give the frames a channel axis (e.g. stack them with the "
               "FrameStackObservation wrapper in env_kwargs 'wrappers')" if len(shape) == 2 else
               "drop 'conv' to train an MLP, or use an image env such as MinAtar/Breakout-v1 or ALE/Breakout-v5")
        raise UsageError(f"'conv' needs (height, width, channels) image observations (or channels first); "
                         f"env {env.id!r} gives {len(shape)}-D observations {shape}: {fix}")
    spec = ConvSpec(shape, env.n_actions, tuple(tuple(int(v) for v in c) for c in conv), tuple(hidden), activation,
                    dueling, env.obs_layout)
    spec.feature_shapes()
    return spec


def spec_from_network(env: Any, network: dict[str, Any]) -> ConvSpec:
    """The ConvSpec a manifest's ``network`` entry describes (artifacts before layouts were HWC)."""
    return ConvSpec(tuple(env.obs_shape), env.n_actions, tuple(tuple(int(v) for v in c) for c in network["conv"]),
                    tuple(network["hidden"]), network.get("activation", "relu"), bool(network.get("dueling", False)),
                    network.get("layout", "HWC"))


def _layers(spec: ConvSpec, init: bool) -> list[Any]:
    from dqnc.keras import keras

    k = keras()
    scale = 2.0 if spec.activation == "relu" else 1.0

    def kw() -> dict[str, Any]:
        return {"kernel_initializer": k.initializers.VarianceScaling(scale=scale)} if init else {}

    layers: list[Any] = []
    if spec.layout == "CHW":
        layers.append(k.layers.Permute((2, 3, 1), name="chw_to_hwc"))
    for i, (filters, kernel, stride) in enumerate(spec.conv):
        layers.append(k.layers.Conv2D(filters, kernel, strides=stride, padding="valid", activation=spec.activation,
                                      name=f"conv_{i}", **kw()))
    layers.append(k.layers.Flatten(name="flatten"))
    for i, width in enumerate(spec.hidden):
        layers.append(k.layers.Dense(width, activation=spec.activation, name=f"dense_{i}", **kw()))
    return layers


def build_conv_q_network(spec: ConvSpec, name: str = "q_network") -> Any:
    """The trainable conv Q-network (Functional with a dueling head, else Sequential)."""
    from dqnc.keras import keras
    from dqnc.nets import DuelingCombine

    k = keras()
    inputs = k.Input(shape=spec.obs_shape, name="obs")
    x = inputs
    for layer in _layers(spec, init=True):
        x = layer(x)
    if not spec.dueling:
        return k.Model(inputs, k.layers.Dense(spec.n_actions, name="q_values")(x), name=name)
    value = k.layers.Dense(1, name="value")(x)
    adv = k.layers.Dense(spec.n_actions, name="advantage")(x)
    return k.Model(inputs, DuelingCombine(name="q_values")([value, adv]), name=name)


def build_plain_conv(spec: ConvSpec, weights: list[np.ndarray] | None = None, name: str = "q_network") -> Any:
    """The deployable Sequential conv net (dueling folded), optionally with given weights."""
    from dqnc.keras import keras

    k = keras()
    model = k.Sequential([k.Input(shape=spec.obs_shape, name="obs"), *_layers(spec, init=False),
                          k.layers.Dense(spec.n_actions, name="q_values")], name=name)
    if weights is not None:
        model.set_weights(weights)
    return model


# Image side up to which conv nets train as im2col matmuls under XLA (benchmarks/conv_step.py:
# MinAtar's 10x10 nets 1.6 vs 2.5 ms per gradient step; on Atari's 84x84 frames the patches are
# large and TF's own conv kernels win, 27.5 vs 39.1 ms).
IM2COL_MAX_SIDE = 32


def im2col_pays(spec: ConvSpec) -> bool:
    """Whether ``spec``'s images are small enough for im2col under XLA (see IM2COL_MAX_SIDE)."""
    return max(spec.hwc[:2]) <= IM2COL_MAX_SIDE


def im2col_conv(inputs: Any, kernel: Any, stride: int) -> Any:
    """A valid-padding NHWC convolution as one matmul over the stacked kernel windows.

    XLA's CPU convolution is slow on small images (measured, MinAtar net, batch 64: 11.4 ms per
    gradient step vs 5.0 ms for TF's own kernels); the same arithmetic as strided slices, a concat
    and one matmul compiles to less CPU than either. Window order (row, column, channel) matches
    the kernel's [kh, kw, C, F] layout, so the reshaped kernel is the matmul's right side.
    """
    from dqnc.keras import tf

    t = tf()
    kh, kw, c, f = (int(d) for d in kernel.shape)
    h, w = int(inputs.shape[1]), int(inputs.shape[2])
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    windows = [inputs[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
               for i in range(kh) for j in range(kw)]
    patches = t.reshape(t.concat(windows, axis=-1), [-1, kh * kw * c])
    return t.reshape(t.matmul(patches, t.reshape(kernel, [kh * kw * c, f])), [-1, ho, wo, f])


def use_im2col(model: Any) -> None:
    """Make ``model``'s Conv2D layers (also inside TFMOT pruning wrappers) compute through
    :func:`im2col_conv`, for XLA-compiled training. Training copies only: their weights are copied
    into a fresh plain model for saving, so the override never reaches an artifact."""
    from dqnc.keras import keras

    for layer in (getattr(l, "layer", l) for l in model.layers):
        if isinstance(layer, keras().layers.Conv2D):
            if layer.padding != "valid" or tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
                raise ValueError(f"{layer.name}: only valid, undilated, ungrouped convolutions have an im2col form")
            layer.convolution_op = lambda x, k, s=int(layer.strides[0]): im2col_conv(x, k, s)


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """Valid-padding NHWC convolution as one tensordot over strided windows (no copies until then)."""
    kh, kw = kernel.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    # win: [N, H', W', C, kh, kw]; kernel: [kh, kw, C, F]
    out = np.tensordot(win, kernel.transpose(2, 0, 1, 3), axes=([3, 4, 5], [0, 1, 2]))
    out += bias
    return out.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


class NumpyConvNet:
    """Q-values of a plain conv net in numpy, for a batch of observations in ``layout``
    (``[N, H, W, C]`` or ``[N, C, H, W]``, or flattened in that order)."""

    def __init__(self, weights: list[np.ndarray], strides: list[int], obs_shape: tuple[int, ...],
                 activations: list[str], layout: str = "HWC") -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown image layout {layout!r}; known: {', '.join(LAYOUTS)}")
        self.strides = [int(s) for s in strides]
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.activations = list(activations)
        self.layout = layout
        self.set_weights(weights)

    def set_weights(self, weights: list[np.ndarray]) -> None:
        self.layers = [(np.asarray(weights[i], np.float32), np.asarray(weights[i + 1], np.float32))
                       for i in range(0, len(weights), 2)]
        n_conv = sum(1 for w, _ in self.layers if w.ndim == 4)
        if n_conv != len(self.strides) or len(self.activations) != len(self.layers) - 1:
            raise ValueError(f"malformed conv net: {n_conv} conv kernels, {len(self.strides)} strides, "
                             f"{len(self.layers)} layers, {len(self.activations)} activations")

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.obs_shape))

    @property
    def n_actions(self) -> int:
        return int(self.layers[-1][0].shape[1])

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        # OpenBLAS threads on a busy 2-core host make these small products ~100x slower (measured:
        # 27 ms instead of 0.23 ms for 8 MinAtar observations); one thread is what a batch this size needs.
        obs = np.asarray(obs)
        n = obs.size // self.obs_dim if obs.ndim > 1 else 1
        with _blas_controller().limit(limits=1, user_api="blas"):
            if n <= CHUNK:
                return self._forward(obs)
            # Large batches (eval's visited states) in chunks: the strided windows of one Atari frame
            # stack are 400 KB as float32, so 10,000 states at once would need 4 GB.
            flat = obs.reshape(n, -1)
            return np.concatenate([self._forward(flat[i:i + CHUNK]) for i in range(0, n, CHUNK)])

    def _forward(self, obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, np.float32).reshape(-1, *self.obs_shape)
        if self.layout == "CHW":  # the model's Permute layer
            x = x.transpose(0, 2, 3, 1)
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            if w.ndim == 4:
                x = conv2d(x, w, b, self.strides[i])
            else:
                if x.ndim > 2:
                    x = x.reshape(len(x), -1)
                x = x @ w
                x += b
            if i < last:
                x = _act(x, self.activations[i])
        return x


def save_conv(path: Any, weights: list[np.ndarray], spec: ConvSpec) -> None:
    """Save a plain conv net beside its SavedModel so TF-free tools can run it in numpy."""
    arrays = {f"p{i}": np.asarray(w, np.float32) for i, w in enumerate(weights)}
    n_layers = len(weights) // 2
    np.savez(path, activations=np.array([spec.activation] * (n_layers - 1)),
             strides=np.array([c[2] for c in spec.conv], np.int64), obs_shape=np.array(spec.obs_shape, np.int64),
             layout=np.array(spec.layout), **arrays)


def load_conv(path: Any) -> NumpyConvNet:
    with np.load(path, allow_pickle=False) as d:
        n = len([k for k in d.files if k.startswith("p")])
        weights = [d[f"p{i}"] for i in range(n)]
        activations = [str(a) for a in d["activations"]]
        strides = [int(s) for s in d["strides"]]
        obs_shape = tuple(int(s) for s in d["obs_shape"])
        layout = str(d["layout"]) if "layout" in d.files else "HWC"
    if n < 2 or n % 2:
        raise ValueError(f"{path}: malformed conv net weights ({n} arrays)")
    return NumpyConvNet(weights, strides, obs_shape, activations, layout)
