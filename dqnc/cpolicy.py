"""A dependency-free C99 policy for int8 models: fully connected chains and conv Q-networks.

``policy.c``/``policy.h`` hold the weights as ``const`` arrays (flash) and the inference as plain
integer code: no TFLM, no malloc, no floating point after the input is quantized. The integer
arithmetic is TFLite's own (``QuantizeMultiplier`` at export time; ``MultiplyByQuantizedMultiplier``
= ``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT`` at run time, per output
channel where the converter quantized per channel), so its int8 outputs equal those of TFLM's
reference kernels bit for bit; export checks that on its verification states.

A chain of FULLY_CONNECTED layers is an :class:`IntegerMLP` (templates ``policy.{h,c}.tmpl``).
A conv net, ``extract(content, conv=True)``, is an :class:`IntegerConvNet`: an optional TRANSPOSE
of the input (a CHW net's Permute), CONV_2D layers as TFLM's ConvPerChannel (SAME or VALID
padding, any stride, fused ReLU/ReLU6), the RESHAPE that flattens NHWC, then the same chain
(templates ``policy_conv.{h,c}.tmpl``: every activation in one static scratch buffer sized at
generation, :func:`scratch_plan`; byte pixels in through a 256-entry table, :func:`pixel_table`).
Both recompute TFLM in numpy (``forward``), which export compares with TFLM's own outputs.

This module also builds the C policy for the host (a shared library driven through ctypes) and for
a Cortex-M4 run on QEMU (see :mod:`dqnc.mcu`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import re
import shutil
import string
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dqnc.runtimes.names import C

HEADER = "policy.h"
SOURCE = "policy.c"
# Why a float differs in the last bit between two compilers: fused multiply-add. ISO C mode
# (-std=c99) keeps GCC from contracting a*b+c; policy.c also rounds through a volatile.
HOST_CFLAGS = ["-std=c99", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-Wall", "-Wextra", "-Wpedantic", "-Werror"]

# Fused activations of FULLY_CONNECTED (schema ActivationFunctionType) dqnc can reproduce.
_ACT_NONE, _ACT_RELU, _ACT_RELU6 = 0, 1, 3


@dataclass
class Layer:
    """One int8 fully connected layer in TFLite's integer form."""

    weights: np.ndarray  # int8 [out, in]
    bias: np.ndarray  # int32 [out] (zeros where the model has none)
    multiplier: np.ndarray  # int32 [out]
    shift: np.ndarray  # int32 [out]
    input_offset: int  # -input zero point
    output_offset: int  # output zero point
    act_min: int
    act_max: int


@dataclass
class IntegerMLP:
    """A chain of int8 fully connected layers with int8 input and output."""

    layers: list[Layer]
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int

    @property
    def obs_dim(self) -> int:
        return int(self.layers[0].weights.shape[1])

    @property
    def n_actions(self) -> int:
        return int(self.layers[-1].weights.shape[0])

    def forward(self, xq: np.ndarray, rounding: str = "double") -> np.ndarray:
        """int8 inputs ``[N, obs_dim]`` -> int8 outputs, in exactly the C policy's arithmetic.

        ``rounding="double"`` is TFLite's default requantization (TFLM's reference kernels and the
        C policy); ``"single"`` is its TFLITE_SINGLE_ROUNDING variant, which LiteRT 2.x's kernels
        (builtin reference and XNNPACK) compute.
        """
        requantize = multiply_by_quantized_multiplier if rounding == "double" else single_rounding_multiply
        return _dense_forward(self.layers, np.asarray(xq, np.int64).reshape(-1, self.obs_dim), requantize)


def _dense_forward(layers: list[Layer], h: np.ndarray, requantize: Any) -> np.ndarray:
    """int64 rows of int8 values through fully connected ``layers`` -> int8 outputs."""
    for layer in layers:
        acc = (h + layer.input_offset) @ layer.weights.astype(np.int64).T + layer.bias
        acc = requantize(acc, layer.multiplier, layer.shift) + layer.output_offset
        h = np.clip(acc, layer.act_min, layer.act_max)
    return h.astype(np.int8)


@dataclass
class ConvLayer:
    """One int8 CONV_2D layer (NHWC), per-channel requantization as TFLM's ConvPerChannel."""

    weights: np.ndarray  # int8 [out_c, kh, kw, in_c], symmetric
    bias: np.ndarray  # int32 [out_c] (zeros where the model has none)
    multiplier: np.ndarray  # int32 [out_c]
    shift: np.ndarray  # int32 [out_c]
    in_shape: tuple[int, int, int]  # (H, W, C)
    out_shape: tuple[int, int, int]
    stride: tuple[int, int]  # (rows, columns)
    pad: tuple[int, int]  # zero rows above and columns left of the image ('same' padding; 0 for 'valid')
    input_offset: int
    output_offset: int
    act_min: int
    act_max: int

    @property
    def taps_inside(self) -> bool:
        """Whether every window lies inside the image (no padding is read: always for 'valid')."""
        (h, w, _), (oh, ow, _), (kh, kw) = self.in_shape, self.out_shape, self.weights.shape[1:3]
        return self.pad == (0, 0) and (oh - 1) * self.stride[0] + kh <= h and (ow - 1) * self.stride[1] + kw <= w

    def forward(self, h: np.ndarray, requantize: Any) -> np.ndarray:
        """int64 ``[N, H, W, C]`` holding int8 values -> the int8 output ``[N, OH, OW, OC]`` (as int64).

        TFLM skips the kernel taps outside the image, which is adding zeros once the input offset
        is added: so the offset input is zero-padded. The sums run as float64 matrix products,
        exact for integers below 2^53 (an int8 conv's accumulator fits in 32 bits).
        """
        from numpy.lib.stride_tricks import sliding_window_view

        (oh, ow, oc), (kh, kw), (sh, sw), (ph, pw) = self.out_shape, self.weights.shape[1:3], self.stride, self.pad
        x = h + self.input_offset
        below, right = max(0, (oh - 1) * sh + kh - x.shape[1] - ph), max(0, (ow - 1) * sw + kw - x.shape[2] - pw)
        x = np.pad(x, ((0, 0), (ph, below), (pw, right), (0, 0)))
        win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, : (oh - 1) * sh + 1 : sh, : (ow - 1) * sw + 1 : sw]
        cols = win.reshape(len(x) * oh * ow, -1).astype(np.float64)  # each row: (channel, row, column) of one window
        kernel = self.weights.transpose(0, 3, 1, 2).reshape(oc, -1).astype(np.float64)
        acc = np.rint(cols @ kernel.T).astype(np.int64).reshape(len(x), oh, ow, oc) + self.bias
        acc = requantize(acc, self.multiplier, self.shift) + self.output_offset
        return np.clip(acc, self.act_min, self.act_max)


@dataclass
class IntegerConvNet:
    """int8 convolutions (after an optional TRANSPOSE of the input), flattened in NHWC order, then
    a chain of int8 fully connected layers: dqnc's conv Q-networks in TFLite's integer form."""

    input_shape: tuple[int, ...]  # the model's input without the batch axis (the env's layout)
    perm: tuple[int, ...] | None  # TRANSPOSE of the input (without the batch axis), None without one
    convs: list[ConvLayer]
    layers: list[Layer]  # the fully connected layers after the flatten
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def n_actions(self) -> int:
        return int(self.layers[-1].weights.shape[0])

    def forward(self, xq: np.ndarray, rounding: str = "double") -> np.ndarray:
        """int8 inputs (``[N, obs_dim]`` or ``[N, *input_shape]``) -> int8 outputs, as :meth:`IntegerMLP.forward`."""
        requantize = multiply_by_quantized_multiplier if rounding == "double" else single_rounding_multiply
        h = np.asarray(xq, np.int64).reshape(-1, *self.input_shape)
        # A few thousand windows' worth of rows at a time: Atari-sized frames stay within memory.
        step = max(1, (1 << 22) // max(int(np.prod(c.out_shape)) * c.weights[0].size for c in self.convs))
        out = [self._forward(h[i : i + step], requantize) for i in range(0, len(h), step)]
        return np.concatenate(out) if out else np.zeros((0, self.n_actions), np.int8)

    def _forward(self, h: np.ndarray, requantize: Any) -> np.ndarray:
        if self.perm is not None:
            h = h.transpose(0, *(p + 1 for p in self.perm))
        for conv in self.convs:
            h = conv.forward(h, requantize)
        return _dense_forward(self.layers, h.reshape(len(h), -1), requantize)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: ``real`` = q * 2^(shift - 31), q a Q31 integer."""
    if real == 0.0:
        return 0, 0
    q, shift = math.frexp(real)
    fixed = int(math.copysign(math.floor(abs(q) * (1 << 31) + 0.5), q))  # std::round: half away from zero
    if fixed == 1 << 31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return fixed, shift


def _srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int64 arrays holding int32 values."""
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    s = ab + nudge
    high = np.where(s >= 0, s >> 31, -((-s) >> 31))  # C division truncates toward zero
    return np.where((a == b) & (a == -(1 << 31)), (1 << 31) - 1, high)


def _rdbpot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT."""
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    left = np.maximum(shift, 0).astype(np.int64)
    right = np.maximum(-shift, 0).astype(np.int64)
    x32 = ((x << left) + (1 << 31)) % (1 << 32) - (1 << 31)  # int32 wrap, as C's x * (1 << left)
    return _rdbpot(_srdhm(x32, multiplier.astype(np.int64)), right)


def single_rounding_multiply(x: np.ndarray, multiplier: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier under TFLITE_SINGLE_ROUNDING: one rounding, in 64 bits."""
    total = 31 - shift.astype(np.int64)
    return (x * multiplier.astype(np.int64) + (np.int64(1) << (total - 1))) >> total


def _act_range(act: int, y_scale: float, zero: int) -> tuple[int, int]:
    """TFLite's CalculateActivationRangeQuantized for int8 and a fused NONE, RELU or RELU6."""
    act_min, act_max = -128, 127
    if act in (_ACT_RELU, _ACT_RELU6):
        act_min = max(act_min, zero)
    if act == _ACT_RELU6:
        act_max = min(act_max, zero + int(math.copysign(math.floor(abs(6.0 / float(y_scale)) + 0.5), 1)))
    return act_min, act_max


def _qparams(model: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    t = model.tensor(i)
    if not t.scales:
        raise ValueError
    return np.asarray(t.scales, np.float32), np.asarray(t.zero_points, np.int64)


def _fc_layer(model: Any, op: Any) -> Layer | str:
    """One FULLY_CONNECTED operator as a :class:`Layer`, or why the C policy cannot run it."""
    x_i, w_i = int(op.inputs[0]), int(op.inputs[1])
    b_i = int(op.inputs[2]) if len(op.inputs) > 2 else -1
    y_i = int(op.outputs[0])
    if any(model.tensor(i).dtype != "int8" for i in (x_i, w_i, y_i)):
        return "the C policy needs int8 activations, weights, input and output (float_io off, mode int8)"
    if model.tensor(w_i).sparse:
        return "the model stores sparse weights (quantize for target mcu)"
    opts = op.builtinOptions
    act = int(getattr(opts, "fusedActivationFunction", 0))
    if act not in (_ACT_NONE, _ACT_RELU, _ACT_RELU6) or getattr(opts, "keepNumDims", False):
        return f"fused activation {act} or keep_num_dims is not supported by the C policy"
    try:
        (x_scale, x_zero), (w_scale, w_zero), (y_scale, y_zero) = (_qparams(model, i) for i in (x_i, w_i, y_i))
    except ValueError:
        return "a tensor has no quantization parameters"
    weights = model.data(w_i, np.int8, shaped=False)
    if weights is None or (w_zero != 0).any():
        return "weights must be constant and symmetrically quantized"
    shape = list(model.tensor(w_i).shape)
    weights = weights.reshape(shape)
    bias = model.data(b_i, np.int32, shaped=False) if b_i >= 0 else None
    if b_i >= 0 and (model.tensor(b_i).dtype != "int32" or bias is None):
        return "biases must be constant int32"
    per_channel = len(w_scale) > 1
    mult, shift = np.empty(shape[0], np.int64), np.empty(shape[0], np.int64)
    for c in range(shape[0]):
        if per_channel:
            # PopulateConvolutionQuantizationParams: the product in double
            real = float(x_scale[0]) * float(w_scale[c]) / float(y_scale[0])
        else:
            # GetQuantizedConvolutionMultipler: input * filter scale in float, then double
            real = float(np.float32(x_scale[0]) * np.float32(w_scale[0])) / float(y_scale[0])
        mult[c], shift[c] = quantize_multiplier(real)
    zero = int(y_zero[0])
    act_min, act_max = _act_range(act, float(y_scale[0]), zero)
    return Layer(weights, np.zeros(shape[0], np.int64) if bias is None else bias.astype(np.int64),
                 mult, shift, -int(x_zero[0]), zero, act_min, act_max)


def extract(content: bytes, conv: bool = False) -> IntegerMLP | IntegerConvNet | str:
    """The model as an :class:`IntegerMLP` (a chain of FULLY_CONNECTED layers) or, with ``conv``,
    an :class:`IntegerConvNet` (convolutions, then that chain), or why it is neither (a reason string)."""
    from dqnc.tflite_model import Model

    model = Model(content)
    if len(model.raw.subgraphs) != 1:
        return "the model has several subgraphs"
    sg = model.subgraph
    ops = model.op_names()
    if len(sg.inputs) != 1 or len(sg.outputs) != 1:
        return "the model must have one input and one output"
    if conv and ops and set(ops) != {"FULLY_CONNECTED"}:
        return _extract_conv(model, ops)
    if not ops or set(ops) != {"FULLY_CONNECTED"}:
        return f"the C policy covers chains of FULLY_CONNECTED layers; this model uses {', '.join(dict.fromkeys(ops))}"
    layers = []
    previous = int(sg.inputs[0])
    for op in sg.operators:
        if int(op.inputs[0]) != previous:
            return "the layers do not form a chain"
        layer = _fc_layer(model, op)
        if isinstance(layer, str):
            return layer
        layers.append(layer)
        previous = int(op.outputs[0])
    if previous != int(sg.outputs[0]):
        return "the last layer's output is not the model's only output"
    first_in, last_out = _qparams(model, int(sg.inputs[0])), _qparams(model, int(sg.outputs[0]))
    return IntegerMLP(layers, float(first_in[0][0]), int(first_in[1][0]), float(last_out[0][0]), int(last_out[1][0]))


# TFLite's Padding enum (schema): SAME 0, VALID 1.
_PAD_SAME, _PAD_VALID = 0, 1
# What the C policy runs in a conv net, in this order ("+": one or more, "?": optional).
CONV_OPS = re.compile(r"(TRANSPOSE )?(CONV_2D )+(RESHAPE )?(FULLY_CONNECTED )+")


def _window(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int] | None:
    """(output size, zero padding before the image) of one axis, as TFLite's ComputePaddingHeightWidth."""
    if padding == _PAD_VALID:
        return ((size - kernel) // stride + 1, 0) if size >= kernel else None
    if padding == _PAD_SAME:
        out = -(-size // stride)
        return out, max(0, ((out - 1) * stride + kernel - size) // 2)
    return None


def _conv_layer(model: Any, op: Any, in_shape: tuple[int, ...]) -> ConvLayer | str:
    """One CONV_2D operator reading an NHWC input of ``in_shape`` (H, W, C) as a :class:`ConvLayer`."""
    x_i, w_i, y_i = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    b_i = int(op.inputs[2]) if len(op.inputs) > 2 else -1
    if any(model.tensor(i).dtype != "int8" for i in (x_i, w_i, y_i)):
        return "the C policy needs int8 activations, weights, input and output (float_io off, mode int8)"
    opts = op.builtinOptions
    act = int(opts.fusedActivationFunction)
    if act not in (_ACT_NONE, _ACT_RELU, _ACT_RELU6):
        return f"fused activation {act} of a convolution is not supported by the C policy"
    if int(opts.dilationHFactor) != 1 or int(opts.dilationWFactor) != 1:
        return "dilated convolutions are not supported by the C policy"
    try:
        (x_scale, x_zero), (w_scale, w_zero), (y_scale, y_zero) = (_qparams(model, i) for i in (x_i, w_i, y_i))
    except ValueError:
        return "a tensor has no quantization parameters"
    shape = tuple(int(v) for v in model.tensor(w_i).shape)
    weights = model.data(w_i, np.int8, shaped=False)
    if weights is None or (w_zero != 0).any() or len(shape) != 4 or model.tensor(w_i).sparse:
        return "convolution weights must be constant, dense and symmetrically quantized"
    if shape[3] != in_shape[2]:
        return "grouped convolutions are not supported by the C policy"
    bias = model.data(b_i, np.int32, shaped=False) if b_i >= 0 else None
    if b_i >= 0 and (model.tensor(b_i).dtype != "int32" or bias is None):
        return "biases must be constant int32"
    rows = _window(in_shape[0], shape[1], int(opts.strideH), int(opts.padding))
    cols = _window(in_shape[1], shape[2], int(opts.strideW), int(opts.padding))
    if rows is None or cols is None or tuple(model.tensor(y_i).shape) != (1, rows[0], cols[0], shape[0]):
        return "a convolution's padding, strides or output shape are not TFLite's (SAME or VALID)"
    if shape[1] * shape[2] * shape[3] * 127 * 255 + int(np.abs(bias).max(initial=0) if bias is not None else 0) >= 1 << 31:
        return "a convolution's int32 accumulator could overflow (kernel too large for int8 arithmetic)"
    # TFLM's int8 conv always takes the per-channel path: each multiplier from a double product.
    scales = np.broadcast_to(w_scale, (shape[0],))
    mult_shift = [quantize_multiplier(float(x_scale[0]) * float(w) / float(y_scale[0])) for w in scales]
    zero = int(y_zero[0])
    return ConvLayer(weights.reshape(shape), np.zeros(shape[0], np.int64) if bias is None else bias.astype(np.int64),
                     np.array([m for m, _ in mult_shift], np.int64), np.array([e for _, e in mult_shift], np.int64),
                     (int(in_shape[0]), int(in_shape[1]), int(in_shape[2])), (rows[0], cols[0], shape[0]),
                     (int(opts.strideH), int(opts.strideW)), (rows[1], cols[1]),
                     -int(x_zero[0]), zero, *_act_range(act, float(y_scale[0]), zero))


def _transpose_perm(model: Any, op: Any) -> tuple[int, ...] | str:
    """The permutation of a TRANSPOSE of the (batch 1, rank 4) model input, without the batch axis."""
    perm = model.data(int(op.inputs[1]), np.int32, shaped=False) if len(op.inputs) > 1 else None
    if perm is None or len(perm) != 4 or int(perm[0]) != 0 or sorted(int(p) for p in perm) != [0, 1, 2, 3]:
        return "the C policy transposes a rank-4 input with a constant permutation keeping the batch axis"
    return tuple(int(p) - 1 for p in perm[1:])


def _extract_conv(model: Any, ops: list[str]) -> IntegerConvNet | str:
    """The conv net behind ``ops`` (see :data:`CONV_OPS`), or why the C policy cannot run it."""
    if not CONV_OPS.fullmatch(" ".join(ops) + " "):
        return ("the C policy covers a TRANSPOSE of the input, CONV_2D layers, a RESHAPE and FULLY_CONNECTED layers, in "
                f"that order; this model runs {' -> '.join(ops)}")
    sg = model.subgraph
    input_shape = tuple(int(v) for v in model.tensor(int(sg.inputs[0])).shape)
    if len(input_shape) != 4 or input_shape[0] != 1:
        return f"the C policy needs a batch-1 NHWC image input; the model's input is {list(input_shape)}"
    previous, shape = int(sg.inputs[0]), input_shape[1:]
    perm: tuple[int, ...] | None = None
    convs: list[ConvLayer] = []
    layers: list[Layer] = []
    for name, op in zip(ops, sg.operators):
        if int(op.inputs[0]) != previous or model.tensor(int(op.outputs[0])).dtype != "int8":
            return "the layers do not form a chain of int8 tensors"
        if name == "TRANSPOSE":
            found = _transpose_perm(model, op)
            if isinstance(found, str):
                return found
            perm, shape = found, tuple(shape[p] for p in found)
        elif name == "CONV_2D":
            conv = _conv_layer(model, op, shape)
            if isinstance(conv, str):
                return conv
            convs.append(conv)
            shape = conv.out_shape
        elif name == "RESHAPE":  # bytes unchanged: a flatten of NHWC
            if int(np.prod(model.tensor(int(op.outputs[0])).shape)) != int(np.prod(shape)):
                return "a RESHAPE that is not a flatten"
        else:
            fc = _fc_layer(model, op)
            if isinstance(fc, str):
                return fc
            layers.append(fc)
        previous = int(op.outputs[0])
    if previous != int(sg.outputs[0]):
        return "the last layer's output is not the model's only output"
    if int(layers[0].weights.shape[1]) != int(np.prod(shape)):
        return "the first fully connected layer does not read the flattened convolution output"
    first_in, last_out = _qparams(model, int(sg.inputs[0])), _qparams(model, int(sg.outputs[0]))
    return IntegerConvNet(input_shape[1:], perm, convs, layers, float(first_in[0][0]), int(first_in[1][0]),
                          float(last_out[0][0]), int(last_out[1][0]))


def c_float(v: float) -> str:
    """A float32 as a C literal that reads back to the same bits (shortest round-trip repr)."""
    text = repr(float(np.float32(v)))
    if "e" not in text and "." not in text and "inf" not in text:
        text += ".0"
    return text + "f"


def _c_ints(values: np.ndarray, per_row: int = 16) -> str:
    flat = [str(int(v)) for v in np.asarray(values).reshape(-1)]
    return "\n".join("  " + ", ".join(flat[i : i + per_row]) + "," for i in range(0, len(flat), per_row))


def c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_c_float, _c_string = c_float, c_string  # the names used throughout this module


def pack_weights(weights: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """A layer's int8 weights ``[out, in]`` as ``bits``-wide indices packed into bytes (row-major,
    the first index in the high bits, as TFLite Micro's LUT compression packs them) and the int8
    value table (2^bits entries, unused ones 0). Raises ValueError if the layer holds more values."""
    table = np.unique(np.asarray(weights, np.int8))
    if len(table) > 2 ** bits:
        raise ValueError(f"a layer holds {len(table)} distinct int8 weights, more than {2 ** bits} ({bits}-bit indices): "
                         f"quantize with --weight-bits {bits}")
    idx = np.searchsorted(table, np.asarray(weights, np.int8).ravel()).astype(np.uint8)
    per_byte = 8 // bits
    idx = np.concatenate([idx, np.zeros(-len(idx) % per_byte, np.uint8)]).reshape(-1, per_byte)
    shifts = (8 - bits * (1 + np.arange(per_byte))).astype(np.uint8)
    packed = np.bitwise_or.reduce(idx << shifts, axis=1).astype(np.uint8)
    return packed, np.concatenate([table, np.zeros(2 ** bits - len(table), np.int8)])


def unpack_weights(packed: np.ndarray, table: np.ndarray, shape: tuple[int, int], bits: int) -> np.ndarray:
    """The inverse of :func:`pack_weights` (what policy.c computes weight by weight)."""
    per_byte = 8 // bits
    shifts = (8 - bits * (1 + np.arange(per_byte))).astype(np.uint8)
    idx = ((np.asarray(packed, np.uint8)[:, None] >> shifts) & ((1 << bits) - 1)).ravel()[: shape[0] * shape[1]]
    return np.asarray(table, np.int8)[idx].reshape(shape)


# Per-form C snippets of policy.c: how the weights are declared, stored in a layer and read in the
# inner loop. int8 keeps one byte per weight; packed stores 4- or 2-bit indices into a layer table.
_INT8_FIELDS = "  const int8_t *w;       /* [out][in], symmetric int8 */"
_INT8_LOOP = """      const int8_t *w = L->w + (int32_t)o * L->in_n;
      int32_t acc = L->bias[o];
      for (i = 0; i < L->in_n; ++i) acc += (int32_t)w[i] * ((int32_t)x[i] + L->in_offset);"""
_PACKED_DEFINES = """/* Weights: ${bits}-bit indices into a per-layer int8 table of ${levels} values. */
#define DQNC_WEIGHT_BITS ${bits}
#define DQNC_PER_BYTE ${per_byte}
#define DQNC_INDEX_MASK ${mask}

"""
_PACKED_FIELDS = """  const uint8_t *w;      /* [out][in] packed indices into table */
  const int8_t *table;   /* the layer's int8 weight values */"""
_PACKED_LOOP = """      uint32_t j = (uint32_t)o * (uint32_t)L->in_n; /* unsigned: / and % by a power of two are a shift and a mask */
      int32_t acc = L->bias[o];
      for (i = 0; i < L->in_n; ++i, ++j) {
        int32_t w = L->table[(L->w[j / DQNC_PER_BYTE] >> (8 - DQNC_WEIGHT_BITS * (1 + j % DQNC_PER_BYTE))) & DQNC_INDEX_MASK];
        acc += w * ((int32_t)x[i] + L->in_offset);
      }"""


@functools.cache
def _template(name: str) -> string.Template:
    """A C template shipped in ``dqnc/templates`` (package data)."""
    return string.Template((resources.files("dqnc") / "templates" / name).read_text(encoding="utf-8"))


def scratch_width(mlp: IntegerMLP) -> int:
    """The widest layer output: each of policy.c's two static activation buffers holds this many int8."""
    return max(int(l.weights.shape[0]) for l in mlp.layers)


def _c_floats(values: Any) -> str:
    return ", ".join(_c_float(v) for v in np.ravel(values))


def _header(mlp: IntegerMLP) -> str:
    return _template("policy.h.tmpl").substitute(
        ram_bytes=2 * scratch_width(mlp), obs_dim=mlp.obs_dim, n_actions=mlp.n_actions,
        input_scale=_c_float(mlp.input_scale), input_zero_point=mlp.input_zero_point,
        output_scale=_c_float(mlp.output_scale), output_zero_point=mlp.output_zero_point)


def _weight_arrays(k: int, layer: Layer, weight_bits: int) -> str:
    """Layer ``k``'s weights as C arrays: int8 ``k_w``, or packed indices ``k_w`` and their table ``k_t``."""
    if weight_bits >= 8:
        return f"static const int8_t k_w{k}[{layer.weights.size}] = {{\n{_c_ints(layer.weights)}\n}};\n"
    packed, values = pack_weights(layer.weights, weight_bits)
    return (f"/* {weight_bits}-bit indices into k_t{k}, packed row-major, the first in the high bits */\n"
            f"static const uint8_t k_w{k}[{len(packed)}] = {{\n{_c_ints(packed)}\n}};\n"
            f"static const int8_t k_t{k}[{len(values)}] = {{\n{_c_ints(values)}\n}};\n")


def _layer_arrays(k: int, layer: Layer, weight_bits: int) -> str:
    """Layer ``k``'s constants: weights, bias and the per-channel multipliers and shifts."""
    out_n, in_n = (int(s) for s in layer.weights.shape)
    return (f"/* layer {k}: {in_n} -> {out_n} */\n"
            f"{_weight_arrays(k, layer, weight_bits)}"
            f"static const int32_t k_b{k}[{out_n}] = {{\n{_c_ints(layer.bias, 8)}\n}};\n"
            f"static const int32_t k_m{k}[{out_n}] = {{\n{_c_ints(layer.multiplier, 6)}\n}};\n"
            f"static const int8_t k_s{k}[{out_n}] = {{\n{_c_ints(layer.shift)}\n}};\n")


def _layer_row(k: int, layer: Layer, packed: bool) -> str:
    """Layer ``k``'s entry in ``k_layers`` (a ``dqnc_layer_t`` initializer)."""
    out_n, in_n = (int(s) for s in layer.weights.shape)
    return (f"  {{k_w{k}, {f'k_t{k}, ' if packed else ''}k_b{k}, k_m{k}, k_s{k}, {in_n}, {out_n}, {layer.input_offset}, "
            f"{layer.output_offset}, {layer.act_min}, {layer.act_max}}},")


def _obs_stats(obs_mean: Any, obs_std: Any) -> str:
    if obs_mean is None or obs_std is None:
        return ""
    return ("/* The observation statistics folded into k_in_a/k_in_c (for reference):\n"
            f" * mean = {{{_c_floats(obs_mean)}}}\n * std  = {{{_c_floats(obs_std)}}}\n */\n")


def _weight_form(weight_bits: int) -> dict[str, str]:
    """The C snippets of the weight storage: int8 (``weight_bits`` 8) or packed 4-/2-bit indices."""
    if weight_bits >= 8:
        return {"weight_defines": "", "weight_fields": _INT8_FIELDS, "inner_loop": _INT8_LOOP}
    defines = string.Template(_PACKED_DEFINES).substitute(
        bits=weight_bits, levels=2 ** weight_bits, per_byte=8 // weight_bits, mask=2 ** weight_bits - 1)
    return {"weight_defines": defines, "weight_fields": _PACKED_FIELDS, "inner_loop": _PACKED_LOOP}


def _source(mlp: IntegerMLP, scale_a: np.ndarray, offset_c: np.ndarray, action_names: list[str],
            obs_mean: Any, obs_std: Any, weight_bits: int) -> str:
    layers = list(enumerate(mlp.layers))
    return _template("policy.c.tmpl").substitute(
        action_names=", ".join(_c_string(n) for n in action_names), obs_stats=_obs_stats(obs_mean, obs_std),
        input_a=_c_floats(scale_a), input_c=_c_floats(offset_c), **_weight_form(weight_bits),
        layer_arrays="\n".join(_layer_arrays(k, l, weight_bits) for k, l in layers),
        layer_table="\n".join(_layer_row(k, l, weight_bits < 8) for k, l in layers),
        n_layers=len(mlp.layers), width=scratch_width(mlp))


def scratch_plan(net: IntegerConvNet) -> tuple[list[int], list[int], int]:
    """The conv policy's one static scratch buffer: each tensor's size and offset (the input, the
    transposed input if any, each layer's output) and the buffer's bytes. A layer writes at the
    other end of the buffer from its input, so the buffer holds the largest two adjacent tensors."""
    sizes = [net.obs_dim] + ([net.obs_dim] if net.perm is not None else [])
    sizes += [int(np.prod(c.out_shape)) for c in net.convs] + [int(l.weights.shape[0]) for l in net.layers]
    total = max(a + b for a, b in zip(sizes, sizes[1:]))
    return sizes, [0 if k % 2 == 0 else total - n for k, n in enumerate(sizes)], total


def _input_map(scale_a: np.ndarray, offset_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The input map as it is stored in the conv policy: one (a, c) pair where all are equal."""
    a, c = np.ravel(np.asarray(scale_a, np.float32)), np.ravel(np.asarray(offset_c, np.float32))
    if (a == a[0]).all() and (c == c[0]).all():
        return a[:1], c[:1]
    return a, c


def pixel_table(scale_a: np.ndarray, offset_c: np.ndarray) -> np.ndarray | None:
    """The int8 input of each byte value 0..255, quantized as the runner does (float32
    ``rint(v * a + c)``, clamped), where the input map is one (a, c) pair; else None."""
    a, c = _input_map(scale_a, offset_c)
    if len(a) != 1:
        return None
    x = np.arange(256, dtype=np.float32) * a[0]
    x += c[0]
    return np.clip(np.rint(x), -128, 127).astype(np.int8)


_PIXEL_DECL = """
/* Pixels in, greedy action out: each byte (a 0/1 or 0..255 pixel) through a 256-entry table that
 * holds exactly what dqnc_policy_quantize makes of it. No floating point at all. */
#define DQNC_PIXEL_INPUT 1
int dqnc_policy_act_u8(const uint8_t obs[DQNC_OBS_DIM], int8_t scores[DQNC_N_ACTIONS]);
"""
_PIXEL_FN = """
/* The int8 input of each byte value, as dqnc_policy_quantize computes it */
static const int8_t k_pixel_in[256] = {
${table}
};

int dqnc_policy_act_u8(const uint8_t obs[DQNC_OBS_DIM], int8_t scores[DQNC_N_ACTIONS]) {
  int32_t i;
  for (i = 0; i < DQNC_OBS_DIM; ++i) s_scratch[i] = k_pixel_in[obs[i]];
  return dqnc_policy_act_int8(s_scratch, scores);
}
"""


def _folded(layer: Any) -> Any:
    """``layer`` with its input offset folded into the bias (``bias + offset * weight sum`` per
    output channel, input offset 0): what policy_conv.c sums where every tap is inside the input.
    A convolution whose windows cross the border keeps its offset (they sum fewer taps)."""
    if isinstance(layer, ConvLayer) and not layer.taps_inside:
        return layer
    sums = layer.weights.reshape(len(layer.weights), -1).astype(np.int64).sum(axis=1)
    return dataclasses.replace(layer, bias=layer.bias + layer.input_offset * sums, input_offset=0)


def _conv_arrays(k: int, conv: ConvLayer) -> tuple[str, str]:
    """Conv layer ``k``'s constants and its ``dqnc_conv_t`` initializer (offset folded where it can be)."""
    conv = _folded(conv)
    oc, kh, kw, ic = (int(v) for v in conv.weights.shape)
    arrays = (f"/* conv {k}: {'x'.join(map(str, conv.in_shape))} -> {'x'.join(map(str, conv.out_shape))}, "
              f"{kh}x{kw} kernel, stride {conv.stride[0]}x{conv.stride[1]} */\n"
              f"static const int8_t k_cw{k}[{conv.weights.size}] = {{\n{_c_ints(conv.weights)}\n}};\n"
              f"static const int32_t k_cb{k}[{oc}] = {{\n{_c_ints(conv.bias, 8)}\n}};\n"
              f"static const int32_t k_cm{k}[{oc}] = {{\n{_c_ints(conv.multiplier, 6)}\n}};\n"
              f"static const int8_t k_cs{k}[{oc}] = {{\n{_c_ints(conv.shift)}\n}};\n")
    dims = [*conv.in_shape, *conv.out_shape, kh, kw, *conv.stride, *conv.pad,
            conv.input_offset, conv.output_offset, conv.act_min, conv.act_max]
    return arrays, f"  {{k_cw{k}, k_cb{k}, k_cm{k}, k_cs{k}, {', '.join(str(int(v)) for v in dims)}}},"


def _transpose_fn(net: IntegerConvNet) -> str:
    """The C of the input TRANSPOSE (empty without one): output axis ``d`` walks input axis ``perm[d]``."""
    if net.perm is None:
        return ""
    in_strides = [int(np.prod(net.input_shape[i + 1 :])) for i in range(3)]
    d = [net.input_shape[p] for p in net.perm]
    st = [in_strides[p] for p in net.perm]
    return f"""
/* TRANSPOSE of the input (permutation {list(net.perm)} of its {'x'.join(map(str, net.input_shape))} axes) */
static void transpose(const int8_t *x, int8_t *y) {{
  int32_t a, b, c;
  for (a = 0; a < {d[0]}; ++a)
    for (b = 0; b < {d[1]}; ++b)
      for (c = 0; c < {d[2]}; ++c) *y++ = x[a * {st[0]} + b * {st[1]} + c * {st[2]}];
}}
"""


def _conv_stages(net: IntegerConvNet) -> str:
    """The body of ``dqnc_policy_act_int8``: one call per layer, each tensor at its scratch offset."""
    _, offsets, _ = scratch_plan(net)
    calls = (["transpose"] if net.perm is not None else []) + [f"conv(&k_convs[{k}]" for k in range(len(net.convs))]
    calls += [f"dense(&k_layers[{k}]" for k in range(len(net.layers))]
    lines, source = [], "input"
    for call, offset in zip(calls, offsets[1:]):
        target = f"s_scratch + {offset}"
        lines.append(f"  {call}({source}, {target});" if call == "transpose" else f"  {call}, {source}, {target});")
        source = target
    return "\n".join(lines) + f"\n  q = {source};"


def _conv_header(net: IntegerConvNet, pixels: bool) -> str:
    stages = (["a TRANSPOSE of the input"] if net.perm is not None else []) + \
        [f"{len(net.convs)} CONV_2D", "a flatten (NHWC order)", f"{len(net.layers)} FULLY_CONNECTED"]
    return _template("policy_conv.h.tmpl").substitute(
        shape="x".join(map(str, net.input_shape)), stages=", ".join(stages), pixel_decl=_PIXEL_DECL if pixels else "",
        obs_dim=net.obs_dim, n_actions=net.n_actions, scratch_bytes=scratch_plan(net)[2],
        input_scale=_c_float(net.input_scale), input_zero_point=net.input_zero_point,
        output_scale=_c_float(net.output_scale), output_zero_point=net.output_zero_point)


def _conv_source(net: IntegerConvNet, scale_a: np.ndarray, offset_c: np.ndarray, action_names: list[str],
                 obs_mean: Any, obs_std: Any) -> str:
    a, c = _input_map(scale_a, offset_c)
    table = pixel_table(scale_a, offset_c)
    pixel_fn = "" if table is None else string.Template(_PIXEL_FN).substitute(table=_c_ints(table))
    convs = [_conv_arrays(k, conv) for k, conv in enumerate(net.convs)]
    layers = [(k, _folded(l)) for k, l in enumerate(net.layers)]
    return _template("policy_conv.c.tmpl").substitute(
        action_names=", ".join(_c_string(n) for n in action_names), obs_stats=_obs_stats(obs_mean, obs_std),
        in_map_step=int(len(a) > 1), in_map_n=len(a), input_a=_c_floats(a), input_c=_c_floats(c),
        conv_arrays="\n".join(arr for arr, _ in convs), n_convs=len(convs), conv_table="\n".join(row for _, row in convs),
        layer_arrays="\n".join(_layer_arrays(k, l, 8) for k, l in layers), n_layers=len(layers),
        layer_table="\n".join(_layer_row(k, l, False) for k, l in layers),
        transpose_fn=_transpose_fn(net), stages=_conv_stages(net), pixel_fn=pixel_fn)


def generate(net: IntegerMLP | IntegerConvNet, scale_a: np.ndarray, offset_c: np.ndarray, action_names: list[str],
             obs_mean: Any = None, obs_std: Any = None, weight_bits: int = 8) -> tuple[str, str]:
    """``policy.h`` and ``policy.c`` for ``net``, from the templates in ``dqnc/templates``.

    ``scale_a``/``offset_c`` are the float32 input map ``q = round_half_even(obs * a + c)`` (the
    observation standardization and the input quantization folded together, as the Python runner
    computes it), so C and Python quantize every observation to the same int8 values.
    ``weight_bits`` 4 or 2 stores each layer's weights as packed indices into a 16- or 4-entry
    int8 table (:func:`pack_weights`); the arithmetic, and so every output, stays the same.
    A conv net (int8 weights only) gets its own templates, ``policy_conv.{h,c}.tmpl``, and, where
    one (a, c) pair maps every pixel, ``dqnc_policy_act_u8`` for byte pixels (:func:`pixel_table`).
    """
    if isinstance(net, IntegerConvNet):
        if weight_bits < 8:
            raise ValueError("packed 4/2-bit weights are for fully connected models; a conv policy stores int8")
        pixels = pixel_table(scale_a, offset_c) is not None
        return _conv_header(net, pixels), _conv_source(net, scale_a, offset_c, action_names, obs_mean, obs_std)
    return _header(net), _source(net, scale_a, offset_c, action_names, obs_mean, obs_std, weight_bits)


def host_compiler() -> str | None:
    """The host C compiler (``$CC``, cc, gcc, clang), or None."""
    import os

    for name in [os.environ.get("CC", ""), "cc", "gcc", "clang"]:
        if name and shutil.which(name):
            return name
    return None


class CompileError(RuntimeError):
    """The generated C did not compile: a dqnc bug, reported with the compiler's words."""


def build_host(source_dir: Path, out_dir: Path | None = None) -> Path:
    """Compile ``policy.c`` in ``source_dir`` into a shared library (warnings are errors)."""
    cc = host_compiler()
    if cc is None:
        raise FileNotFoundError("no C compiler (cc, gcc or clang) on PATH")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="dqnc-cpolicy-"))
    lib = out_dir / "libdqnc_policy.so"
    proc = subprocess.run([cc, *HOST_CFLAGS, "-o", str(lib), str(Path(source_dir) / SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{cc} failed on the generated policy.c: {proc.stderr.strip()[:500]}")
    return lib


class CPolicy:
    """The host-compiled C policy behind the Q-function interface of ``runtime.Policy``.

    ``q_values`` returns the dequantized int8 scores, as the Python runner does.
    """

    runtime = C  # the registry's name (dqnc.runtimes.c)

    def __init__(self, lib_path: Path, obs_dim: int, n_actions: int, output_scale: float, output_zero_point: int) -> None:
        self._lib = ctypes.CDLL(str(lib_path))
        self.obs_dim, self.n_actions = obs_dim, n_actions
        self.output_scale, self.output_zero_point = output_scale, output_zero_point
        f32p, i8p = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int8)
        self._act = self._lib.dqnc_policy_act
        self._act.argtypes, self._act.restype = [f32p, i8p], ctypes.c_int
        self._act_int8 = self._lib.dqnc_policy_act_int8
        self._act_int8.argtypes, self._act_int8.restype = [i8p, i8p], ctypes.c_int
        self._quant = self._lib.dqnc_policy_quantize
        self._quant.argtypes, self._quant.restype = [f32p, i8p], None
        self._act_u8 = getattr(self._lib, "dqnc_policy_act_u8", None)  # conv policies with one input map pair
        if self._act_u8 is not None:
            self._act_u8.argtypes, self._act_u8.restype = [ctypes.POINTER(ctypes.c_uint8), i8p], ctypes.c_int
        self._scores = np.zeros(n_actions, np.int8)
        self._scores_p = self._scores.ctypes.data_as(i8p)
        self._f32p, self._i8p = f32p, i8p

    def quantize(self, obs: Any) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(obs, np.float32).reshape(-1, self.obs_dim))
        out = np.empty(x.shape, np.int8)
        for i in range(len(x)):
            self._quant(x[i].ctypes.data_as(self._f32p), out[i].ctypes.data_as(self._i8p))
        return out

    def scores_int8(self, xq: np.ndarray) -> np.ndarray:
        """Raw int8 scores for already-quantized inputs ``[N, obs_dim]``."""
        xq = np.ascontiguousarray(np.asarray(xq, np.int8).reshape(-1, self.obs_dim))
        out = np.empty((len(xq), self.n_actions), np.int8)
        for i in range(len(xq)):
            self._act_int8(xq[i].ctypes.data_as(self._i8p), out[i].ctypes.data_as(self._i8p))
        return out

    @property
    def takes_pixels(self) -> bool:
        """Whether the policy has ``dqnc_policy_act_u8`` (byte pixels in)."""
        return self._act_u8 is not None

    def scores_u8(self, pixels: np.ndarray) -> np.ndarray:
        """Raw int8 scores for byte pixels ``[N, obs_dim]`` through ``dqnc_policy_act_u8``."""
        if self._act_u8 is None:
            raise ValueError("this policy.c has no dqnc_policy_act_u8 (its input map differs between pixels)")
        x = np.ascontiguousarray(np.asarray(pixels, np.uint8).reshape(-1, self.obs_dim))
        out = np.empty((len(x), self.n_actions), np.int8)
        u8p = ctypes.POINTER(ctypes.c_uint8)
        for i in range(len(x)):
            self._act_u8(x[i].ctypes.data_as(u8p), out[i].ctypes.data_as(self._i8p))
        return out

    def q_values(self, obs: Any) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(obs, np.float32).reshape(-1, self.obs_dim))
        out = np.empty((len(x), self.n_actions), np.int8)
        for i in range(len(x)):
            self._act(x[i].ctypes.data_as(self._f32p), out[i].ctypes.data_as(self._i8p))
        return ((out.astype(np.float32) - self.output_zero_point) * self.output_scale).astype(np.float32)

    __call__ = q_values

    def act(self, obs: Any) -> int:
        x = np.ascontiguousarray(np.asarray(obs, np.float32).reshape(self.obs_dim))
        return int(self._act(x.ctypes.data_as(self._f32p), self._scores_p))


def write(net: IntegerMLP | IntegerConvNet, policy: Any, action_names: list[str], out_dir: Path,
          obs_mean: Any = None, obs_std: Any = None, weight_bits: int = 8) -> None:
    """Write policy.h/policy.c into ``out_dir``; ``policy`` is the runtime.Policy whose input map is used."""
    h, c = generate(net, *policy.input_map, action_names, obs_mean, obs_std, weight_bits)
    (Path(out_dir) / HEADER).write_text(h, encoding="utf-8")
    (Path(out_dir) / SOURCE).write_text(c, encoding="utf-8")


def weight_bytes(net: IntegerMLP | IntegerConvNet, weight_bits: int = 8) -> int:
    """Flash bytes of the weights in policy.c: int8, or packed indices plus each layer's table."""
    convs = int(sum(c.weights.size for c in net.convs)) if isinstance(net, IntegerConvNet) else 0
    if weight_bits >= 8:
        return convs + int(sum(l.weights.size for l in net.layers))
    return convs + int(sum(-(-l.weights.size * weight_bits // 8) + 2 ** weight_bits for l in net.layers))


def sizes(net: IntegerMLP | IntegerConvNet, weight_bits: int = 8, input_map: Any = None) -> dict[str, int]:
    """Bytes the C policy's data needs: constants (flash) and activations (RAM), code excluded.
    A conv policy's input map is one (a, c) pair where ``input_map`` (the policy's) is uniform."""
    layers: list[Any] = [*(net.convs if isinstance(net, IntegerConvNet) else []), *net.layers]
    flash = weight_bytes(net, weight_bits) + sum(4 * l.bias.size + 4 * l.multiplier.size + l.shift.size for l in layers)
    if isinstance(net, IntegerConvNet):
        pairs = len(_input_map(*input_map)[0]) if input_map is not None else net.obs_dim
        flash += 8 * pairs + (256 if pairs == 1 else 0)  # the input map (and the byte-pixel table)
        return {"const_data_bytes": int(flash), "weight_bytes": weight_bytes(net), "activation_ram_bytes": scratch_plan(net)[2]}
    flash += 8 * net.obs_dim  # the float input map
    return {"const_data_bytes": int(flash), "weight_bytes": weight_bytes(net, weight_bits),
            "activation_ram_bytes": 2 * scratch_width(net)}
