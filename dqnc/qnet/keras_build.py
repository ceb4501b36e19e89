"""tf_keras models of a :class:`~dqnc.qnet.spec.QNetSpec` (TensorFlow is imported lazily).

Functions take the spec by its attributes (this module is below :mod:`dqnc.qnet.spec`, which
calls it), so ``spec`` is annotated ``Any``.

Networks are plain Sequential/Functional tf_keras models (TFMOT cannot wrap subclassed ones).
A conv net is ``Conv2D`` layers (valid padding) then ``Flatten`` then Dense layers; a CHW net
gets one ``Permute`` to HWC as its first layer (Keras' CPU Conv2D is channels-last), so every
runtime is fed the env's observation unchanged. A dueling head trains as two linear streams;
because ``Q = V + A - mean(A)`` is linear in the last hidden layer, it folds exactly into one
Dense layer when saved (:func:`dqnc.qnet.fold.fold_dueling`), so every artifact holds a plain
Sequential network. Layer names (``chw_to_hwc``, ``conv_i``, ``flatten``, ``dense_i``,
``q_values``) are part of the saved bytes: keep them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dqnc.qnet.layout import ACTIVATIONS


def _trunk(spec: Any, init: bool) -> list[Any]:
    """The layers between the input and the output head."""
    from dqnc.keras import keras

    k = keras()

    def kw(activation: str) -> dict[str, Any]:
        scale = 2.0 if activation == "relu" else 1.0
        return {"kernel_initializer": k.initializers.VarianceScaling(scale=scale)} if init else {}

    acts = list(spec.activations)
    layers: list[Any] = []
    if spec.layout == "CHW":
        layers.append(k.layers.Permute((2, 3, 1), name="chw_to_hwc"))
    for i, (filters, kernel, stride) in enumerate(spec.conv):
        a = acts.pop(0)
        layers.append(k.layers.Conv2D(filters, kernel, strides=stride, padding="valid", activation=a,
                                      name=f"conv_{i}", **kw(a)))
    if spec.conv:
        layers.append(k.layers.Flatten(name="flatten"))
    for i, (width, a) in enumerate(zip(spec.hidden, acts)):
        layers.append(k.layers.Dense(width, activation=a, name=f"dense_{i}", **kw(a)))
    return layers


def build_trainable(spec: Any, name: str = "q_network") -> Any:
    """The trainable Q-network (Functional; a dueling head when ``spec.dueling``)."""
    from dqnc.keras import keras

    k = keras()
    inputs = k.Input(shape=spec.obs_shape, name="obs")
    x = inputs
    for layer in _trunk(spec, init=True):
        x = layer(x)
    if not spec.dueling:
        return k.Model(inputs, k.layers.Dense(spec.n_actions, name="q_values")(x), name=name)
    value = k.layers.Dense(1, name="value")(x)
    adv = k.layers.Dense(spec.n_actions, name="advantage")(x)
    return k.Model(inputs, DuelingCombine(name="q_values")([value, adv]), name=name)


def build_plain(spec: Any, weights: list[np.ndarray] | None = None, name: str = "q_network") -> Any:
    """The deployable Sequential network (dueling folded), optionally with given weights."""
    from dqnc.keras import keras

    k = keras()
    model = k.Sequential([k.Input(shape=spec.obs_shape, name="obs"), *_trunk(spec, init=False),
                          k.layers.Dense(spec.n_actions, name="q_values")], name=name)
    if weights is not None:
        model.set_weights(weights)
    return model


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


def _activation(layer: Any) -> str:
    return str(layer.get_config().get("activation", "linear"))


def spec_of_model(cls: Any, model: Any) -> Any:
    """:meth:`QNetSpec.from_model`: read the family, shapes and activations off the layers."""
    layers = [getattr(l, "layer", l) for l in model.layers]  # TFMOT wrappers hold the real layer
    kinds = [type(l).__name__ for l in layers]
    dense = [l for l in layers if type(l).__name__ == "Dense" and l.name not in ("value", "advantage")]
    dueling = {"value", "advantage"} <= {l.name for l in layers}
    hidden = dense if dueling else dense[:-1]
    in_shape = tuple(int(d) for d in model.input_shape[1:])
    n_actions = int(model.output_shape[-1])
    if "Conv2D" in kinds:
        convs = [l for l in layers if type(l).__name__ == "Conv2D"]
        conv = tuple((int(l.filters), int(l.kernel_size[0]), int(l.strides[0])) for l in convs)
        return cls(in_shape, n_actions, "CHW" if "Permute" in kinds else "HWC", conv,
                   tuple(int(l.units) for l in hidden), tuple(_activation(l) for l in [*convs, *hidden]), dueling)
    other = sorted({k for k in kinds if k not in ("Dense", "InputLayer")} - ({"_DuelingCombine"} if dueling else set()))
    acts = [_activation(l) for l in hidden]
    if other or len(in_shape) != 1 or any(a not in ACTIVATIONS for a in acts):
        raise ValueError(f"not a Dense chain: it has {', '.join(other) or 'activations or shapes dqnc cannot map'}")
    return cls.mlp(in_shape[0], n_actions, tuple(int(l.units) for l in hidden), tuple(acts), dueling)


# Image side up to which conv nets train as im2col matmuls under XLA (benchmarks/conv_step.py:
# MinAtar's 10x10 nets 1.6 vs 2.5 ms per gradient step; on Atari's 84x84 frames the patches are
# large and TF's own conv kernels win, 27.5 vs 39.1 ms).
IM2COL_MAX_SIDE = 32


def im2col_pays(spec: Any) -> bool:
    """Whether ``spec`` is a conv net on images small enough for im2col under XLA (see IM2COL_MAX_SIDE)."""
    return spec.family == "conv" and max(spec.hwc[:2]) <= IM2COL_MAX_SIDE


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
