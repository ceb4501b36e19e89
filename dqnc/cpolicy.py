"""A dependency-free C99 policy for int8 models made of fully connected layers.

``policy.c``/``policy.h`` hold the weights as ``const`` arrays (flash) and the inference as plain
integer code: no TFLM, no malloc, no floating point after the input is quantized. The integer
arithmetic is TFLite's own (``QuantizeMultiplier`` at export time; ``MultiplyByQuantizedMultiplier``
= ``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT`` at run time, per output
channel where the converter quantized per channel), so its int8 outputs equal those of TFLM's
reference kernels bit for bit; export checks that on its verification states.

This module also builds the C policy for the host (a shared library driven through ctypes) and for
a Cortex-M4 run on QEMU (see :mod:`dqnc.mcu`).
"""

from __future__ import annotations

import ctypes
import functools
import math
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
        h = np.asarray(xq, np.int64).reshape(-1, self.obs_dim)
        for layer in self.layers:
            acc = (h + layer.input_offset) @ layer.weights.astype(np.int64).T + layer.bias
            acc = requantize(acc, layer.multiplier, layer.shift) + layer.output_offset
            h = np.clip(acc, layer.act_min, layer.act_max)
        return h.astype(np.int8)


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


def extract(content: bytes) -> IntegerMLP | str:
    """The model as an :class:`IntegerMLP`, or why it is not one (a reason string)."""
    from dqnc.tflite_model import Model

    model = Model(content)
    if len(model.raw.subgraphs) != 1:
        return "the model has several subgraphs"
    sg = model.subgraph
    ops = model.op_names()
    if not ops or set(ops) != {"FULLY_CONNECTED"}:
        return f"the C policy covers chains of FULLY_CONNECTED layers; this model uses {', '.join(dict.fromkeys(ops))}"

    def buffer(i: int, dtype: Any) -> np.ndarray | None:
        return model.data(i, dtype, shaped=False)

    def qparams(i: int) -> tuple[np.ndarray, np.ndarray]:
        t = model.tensor(i)
        if not t.scales:
            raise ValueError
        return np.asarray(t.scales, np.float32), np.asarray(t.zero_points, np.int64)

    layers = []
    previous = int(sg.inputs[0])
    for op in sg.operators:
        x_i, w_i = int(op.inputs[0]), int(op.inputs[1])
        b_i = int(op.inputs[2]) if len(op.inputs) > 2 else -1
        y_i = int(op.outputs[0])
        if x_i != previous:
            return "the layers do not form a chain"
        if any(model.tensor(i).dtype != "int8" for i in (x_i, w_i, y_i)):
            return "the C policy needs int8 activations, weights, input and output (float_io off, mode int8)"
        if model.tensor(w_i).sparse:
            return "the model stores sparse weights (quantize for target mcu)"
        opts = op.builtinOptions
        act = int(getattr(opts, "fusedActivationFunction", 0))
        if act not in (_ACT_NONE, _ACT_RELU, _ACT_RELU6) or getattr(opts, "keepNumDims", False):
            return f"fused activation {act} or keep_num_dims is not supported by the C policy"
        try:
            (x_scale, x_zero), (w_scale, w_zero), (y_scale, y_zero) = qparams(x_i), qparams(w_i), qparams(y_i)
        except ValueError:
            return "a tensor has no quantization parameters"
        weights = buffer(w_i, np.int8)
        if weights is None or (w_zero != 0).any():
            return "weights must be constant and symmetrically quantized"
        shape = list(model.tensor(w_i).shape)
        weights = weights.reshape(shape)
        bias = buffer(b_i, np.int32) if b_i >= 0 else None
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
        act_min, act_max = -128, 127
        if act in (_ACT_RELU, _ACT_RELU6):
            act_min = max(act_min, zero)
        if act == _ACT_RELU6:
            act_max = min(act_max, zero + int(math.copysign(math.floor(abs(6.0 / float(y_scale[0])) + 0.5), 1)))
        layers.append(Layer(weights, np.zeros(shape[0], np.int64) if bias is None else bias.astype(np.int64),
                            mult, shift, -int(x_zero[0]), zero, act_min, act_max))
        previous = y_i
    if previous != int(sg.outputs[0]) or len(sg.inputs) != 1 or len(sg.outputs) != 1:
        return "the last layer's output is not the model's only output"
    first_in, last_out = qparams(int(sg.inputs[0])), qparams(int(sg.outputs[0]))
    return IntegerMLP(layers, float(first_in[0][0]), int(first_in[1][0]), float(last_out[0][0]), int(last_out[1][0]))


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


def generate(mlp: IntegerMLP, scale_a: np.ndarray, offset_c: np.ndarray, action_names: list[str],
             obs_mean: Any = None, obs_std: Any = None, weight_bits: int = 8) -> tuple[str, str]:
    """``policy.h`` and ``policy.c`` for ``mlp``, from the templates in ``dqnc/templates``.

    ``scale_a``/``offset_c`` are the float32 input map ``q = round_half_even(obs * a + c)`` (the
    observation standardization and the input quantization folded together, as the Python runner
    computes it), so C and Python quantize every observation to the same int8 values.
    ``weight_bits`` 4 or 2 stores each layer's weights as packed indices into a 16- or 4-entry
    int8 table (:func:`pack_weights`); the arithmetic, and so every output, stays the same.
    """
    return _header(mlp), _source(mlp, scale_a, offset_c, action_names, obs_mean, obs_std, weight_bits)


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


def write(mlp: IntegerMLP, policy: Any, action_names: list[str], out_dir: Path,
          obs_mean: Any = None, obs_std: Any = None, weight_bits: int = 8) -> None:
    """Write policy.h/policy.c into ``out_dir``; ``policy`` is the runtime.Policy whose input map is used."""
    h, c = generate(mlp, *policy.input_map, action_names, obs_mean, obs_std, weight_bits)
    (Path(out_dir) / HEADER).write_text(h, encoding="utf-8")
    (Path(out_dir) / SOURCE).write_text(c, encoding="utf-8")


def weight_bytes(mlp: IntegerMLP, weight_bits: int = 8) -> int:
    """Flash bytes of the weights in policy.c: int8, or packed indices plus each layer's table."""
    if weight_bits >= 8:
        return int(sum(l.weights.size for l in mlp.layers))
    return int(sum(-(-l.weights.size * weight_bits // 8) + 2 ** weight_bits for l in mlp.layers))


def sizes(mlp: IntegerMLP, weight_bits: int = 8) -> dict[str, int]:
    """Bytes the C policy's data needs: constants (flash) and activations (RAM), code excluded."""
    flash = weight_bytes(mlp, weight_bits) + sum(4 * l.bias.size + 4 * l.multiplier.size + l.shift.size for l in mlp.layers)
    flash += 8 * mlp.obs_dim  # the float input map
    return {"const_data_bytes": int(flash), "weight_bytes": weight_bytes(mlp, weight_bits),
            "activation_ram_bytes": 2 * scratch_width(mlp)}
