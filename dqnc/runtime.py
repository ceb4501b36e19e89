"""TFLite inference with numpy and a TFLite runtime only: LiteRT, else tflite-runtime.

This module imports nothing from dqnc or TensorFlow. ``dqnc export`` copies it verbatim into
every bundle as ``run_policy.py``, so the code that dqnc evaluates is the code a device runs.

    python run_policy.py --obs 0.01,-0.02,0.03,0.04      # prints the action index
    echo '[0.01, -0.02, 0.03, 0.04]' | python run_policy.py   # one JSON observation per line
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Any

import numpy as np

RUNTIMES = ("ai_edge_litert", "tflite_runtime")


class quiet_stderr:
    """Keep C++ chatter written straight to fd 2 (e.g. "Created TensorFlow Lite XNNPACK delegate")
    off the terminal; what was captured is replayed if the block raises. DQNC_TF_LOGS=1 shows all."""

    def __init__(self, replay_on_error: bool = True) -> None:
        self.replay_on_error = replay_on_error

    def __enter__(self) -> quiet_stderr:
        self.saved = None
        if os.environ.get("DQNC_TF_LOGS"):
            return self
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
        except (OSError, ValueError):
            return self
        import tempfile

        self.capture = tempfile.TemporaryFile()
        os.dup2(self.capture.fileno(), 2)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.saved is None:
            return
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if exc_type is not None and self.replay_on_error:
            self.capture.seek(0)
            sys.stderr.write(self.capture.read().decode(errors="replace"))
        self.capture.close()


def interpreter_class(prefer: str | None = None) -> tuple[Any, str]:
    """The interpreter module of the first runtime that imports (LiteRT first), and its name."""
    order = [prefer] if prefer else list(RUNTIMES)
    errors = []
    for name in order:
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert import interpreter as module
            elif name == "tflite_runtime":
                from tflite_runtime import interpreter as module
            else:
                raise ImportError(f"unknown runtime {name!r}")
            return module, name
        except ImportError as e:  # also numpy-ABI failures of old wheels
            errors.append(f"{name}: {e}")
    raise ImportError("no TFLite runtime could be imported (" + "; ".join(errors) + "): pip install ai-edge-litert")


# --- a structural check of the flatbuffer, before any runtime parses it ------------------------
#
# Neither TFLite Micro (which verifies nothing: it runs on microcontrollers) nor a runtime's
# allocator guards against a damaged or hostile file: out-of-range indices crash TFLM, and a
# tensor that declares 4 TB is allocated, or tried. check_model() walks every table, vector and
# string the runtimes read, with every read bounds-checked, and refuses what would make them read
# out of bounds or allocate without bound. It is pure Python and linear in the file size.
# The one deliberate second .tflite reader: dqnc's own code reads models through dqnc.tflite_model
# (tflite-micro's schema), but this file ships as the bundle's run_policy.py, which a device runs
# with numpy and a TFLite interpreter only, so it walks the flatbuffer itself.

# Element limits: the same figures as dqnc.limits (this file imports nothing from dqnc).
MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024  # one tensor
MAX_TOTAL_ELEMENTS = 256 * 1024 * 1024  # all tensors of the model
# TensorType -> bits per element (None: no fixed size: STRING, RESOURCE, VARIANT)
_TYPE_BITS = {0: 32, 1: 16, 2: 32, 3: 8, 4: 64, 5: None, 6: 8, 7: 16, 8: 64, 9: 8, 10: 64, 11: 128, 12: 64,
              13: None, 14: None, 15: 32, 16: 16, 17: 4, 18: 16, 19: 2, 20: 4, 21: 8, 22: 8}
_TFLM_DECODE = b"TFLM_DECODE"  # TFLM's custom op that expands LUT-compressed tensors
# zero points a quantized type can hold (XNNPACK indexes tables with them: one out of range crashed LiteRT)
_ZERO_POINTS = {9: (-128, 127), 3: (0, 255), 7: (-32768, 32767), 16: (0, 65535), 17: (-8, 7), 20: (0, 15), 19: (-2, 1)}
_RESHAPE_OPTIONS = 17  # BuiltinOptions.ReshapeOptions: its new_shape vector is read by the kernels
_CUSTOM = 32
_MAX_BUILTIN = 1023  # BuiltinOperator codes run to ~210; a runtime refuses codes it does not know
# BuiltinOperator codes whose kernels (TFLM's above all) trust the shapes they are given: a divisor
# of 0, or channels that do not divide, crash the process (SIGFPE/SIGSEGV) instead of failing Prepare.
_FULLY_CONNECTED, _CONV_2D, _DEPTHWISE_CONV_2D, _AVERAGE_POOL_2D, _MAX_POOL_2D = 9, 3, 4, 1, 17
_OPTIONS = {_FULLY_CONNECTED: 8, _CONV_2D: 1, _DEPTHWISE_CONV_2D: 2, _AVERAGE_POOL_2D: 5, _MAX_POOL_2D: 5}
# ops that map each input element to one output element: the kernels size the loop by one of them
_ELEMENTWISE = {6: "DEQUANTIZE", 114: "QUANTIZE", 19: "RELU", 21: "RELU6", 20: "RELU_N1_TO_1", 28: "TANH",
                14: "LOGISTIC", 111: "ELU", 98: "LEAKY_RELU", 117: "HARD_SWISH"}
_OP_NAMES = {**_ELEMENTWISE, _FULLY_CONNECTED: "FULLY_CONNECTED", _CONV_2D: "CONV_2D", _DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D",
             _AVERAGE_POOL_2D: "AVERAGE_POOL_2D", _MAX_POOL_2D: "MAX_POOL_2D", 22: "RESHAPE", 0: "ADD", 41: "SUB",
             18: "MUL", 42: "DIV", 55: "MAXIMUM", 57: "MINIMUM", _CUSTOM: "CUSTOM"}
# inputs that must be present (not the optional -1) for the kernel not to dereference null
_REQUIRED_INPUTS = {_FULLY_CONNECTED: 2, _CONV_2D: 2, _DEPTHWISE_CONV_2D: 2, 0: 2, 41: 2, 18: 2, 42: 2, 55: 2, 57: 2}
_INDEX_VECTOR_BYTES = {1: 4, 2: 2, 3: 1}  # SparseIndexVector: Int32Vector, Uint16Vector, Uint8Vector


class ModelCheckError(ValueError):
    """The bytes are not a well-formed TFLite model (refused before a runtime reads them)."""


class ModelLimitError(ModelCheckError):
    """A tensor declares more elements than dqnc allocates for a Q-network."""


class _Buf:
    def __init__(self, data: bytes) -> None:
        self.d, self.n = data, len(data)

    def get(self, fmt: str, pos: int, what: str) -> Any:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > self.n:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {what} at byte {pos:,} lies outside the "
                                  f"{self.n:,}-byte file (truncated or corrupted)")
        if pos % size:  # the runtimes' own flatbuffer verifier requires aligned scalars too
            raise ModelCheckError(f"damaged TFLite flatbuffer: {what} at byte {pos:,} is misaligned (corrupted)")
        return struct.unpack_from(fmt, self.d, pos)[0]

    def ref(self, pos: int, what: str) -> int:
        offset = self.get("<I", pos, what)
        if not 0 < offset < 1 << 31:  # what the flatbuffers verifier accepts
            raise ModelCheckError(f"damaged TFLite flatbuffer: {what} at byte {pos:,} has offset {offset} (corrupted)")
        return pos + offset

    def table(self, pos: int, what: str) -> _Table:
        return _Table(self, pos, what)


class _Table:
    """One flatbuffer table, every field read bounds-checked against the file and the table."""

    def __init__(self, buf: _Buf, pos: int, what: str) -> None:
        self.b, self.pos, self.what = buf, pos, what
        self.vt = pos - buf.get("<i", pos, what)
        self.vsize = buf.get("<H", self.vt, f"{what} (vtable)")
        self.tsize = buf.get("<H", self.vt + 2, f"{what} (vtable)")
        if self.vsize < 4 or self.vsize % 2 or self.vt + self.vsize > buf.n or self.tsize < 4 or pos + self.tsize > buf.n:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {what} has a malformed table layout (truncated or corrupted)")

    def _field(self, i: int, size: int) -> int | None:
        slot = 4 + 2 * i
        if slot + 2 > self.vsize:
            return None
        off = self.b.get("<H", self.vt + slot, self.what)
        if off == 0:
            return None
        if off + size > self.tsize:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {self.what} field {i} lies outside its table")
        return self.pos + off

    def scalar(self, i: int, fmt: str, default: Any = 0) -> Any:
        p = self._field(i, struct.calcsize(fmt))
        return default if p is None else self.b.get(fmt, p, f"{self.what} field {i}")

    def _vector(self, i: int, elem: int, what: str) -> tuple[int, int]:
        p = self._field(i, 4)
        if p is None:
            return 0, 0
        at = self.b.ref(p, what)
        length = self.b.get("<I", at, what)
        if at + 4 + length * elem > self.b.n:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {what} declares {length:,} entries, which do not fit in "
                                  f"the {self.b.n:,}-byte file (truncated or corrupted)")
        if (at + 4) % elem:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {what} at byte {at:,} is misaligned (corrupted)")
        return at + 4, length

    def numbers(self, i: int, fmt: str, what: str) -> tuple:
        start, length = self._vector(i, struct.calcsize(fmt), f"{self.what}: {what}")
        return struct.unpack_from(f"<{length}{fmt}", self.b.d, start) if length else ()

    def nbytes(self, i: int, what: str) -> int:
        return self._vector(i, 1, f"{self.what}: {what}")[1]

    def string(self, i: int, what: str) -> bytes:
        start, length = self._vector(i, 1, f"{self.what}: {what}")
        if start and (start + length >= self.b.n or self.b.d[start + length] != 0):
            raise ModelCheckError(f"damaged TFLite flatbuffer: {self.what}: {what} is not a terminated string")
        text = self.b.d[start:start + length]
        try:
            text.decode("utf-8")  # the runtimes' Python APIs decode names
        except UnicodeDecodeError:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {self.what}: {what} is not UTF-8 text") from None
        return text

    def table(self, i: int, what: str) -> _Table | None:
        p = self._field(i, 4)
        return None if p is None else _Table(self.b, self.b.ref(p, f"{self.what}: {what}"), f"{self.what}: {what}")

    def tables(self, i: int, what: str) -> list[_Table]:
        start, length = self._vector(i, 4, f"{self.what}: {what}s")
        name = f"{self.what} {what}" if self.what != "the model" else what
        return [_Table(self.b, self.b.ref(start + 4 * k, f"{name} {k}"), f"{name} {k}") for k in range(length)]


def _shape_text(shape: Any) -> str:
    text = str(tuple(shape))
    return text if len(text) <= 80 else text[:80] + "...)"


def _check_quantization(q: _Table, shape: tuple, ttype: int, where: str, encoded: bool) -> None:
    scale = q.numbers(2, "f", "scale")
    zero = q.numbers(3, "q", "zero_point")
    q.numbers(0, "f", "min")
    q.numbers(1, "f", "max")
    axis = q.scalar(6, "<i")
    q.table(5, "details")
    if scale and len(scale) != len(zero):
        raise ModelCheckError(f"{where}: {len(scale)} quantization scales but {len(zero)} zero points")
    # A tensor TFLM's DECODE op expands keeps the parameters of the tensor it encodes.
    if len(scale) > 1 and not encoded and not (0 <= axis < len(shape) and shape[axis] == len(scale)):
        raise ModelCheckError(f"{where}: {len(scale)} per-channel scales do not match axis {axis} of shape "
                              f"{_shape_text(shape)}")
    if any(not s >= 0 or s == float("inf") for s in scale):  # also NaN
        raise ModelCheckError(f"{where}: a quantization scale is negative or not finite")
    lo, hi = _ZERO_POINTS.get(ttype, (-(1 << 63), (1 << 63) - 1))
    if not encoded and any(not lo <= z <= hi for z in zero):
        raise ModelCheckError(f"{where}: a zero point lies outside the range of the tensor's type")


def _check_sparsity(sp: _Table) -> None:
    sp.numbers(0, "i", "traversal_order")
    sp.numbers(1, "i", "block_map")
    for dim in sp.tables(2, "dim_metadata"):
        for kind_field, table_field, what in ((2, 3, "array_segments"), (4, 5, "array_indices")):
            kind = dim.scalar(kind_field, "<B")
            vec = dim.table(table_field, what)
            if vec is None:
                continue
            if kind not in _INDEX_VECTOR_BYTES:
                raise ModelCheckError(f"damaged TFLite flatbuffer: {dim.what}: {what} has unknown type {kind}")
            vec._vector(0, _INDEX_VECTOR_BYTES[kind], f"{dim.what}: {what}")


def _elements(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_op(where: str, code: int, decode: bool, inputs: tuple, outputs: tuple, options: _Table | None,
              option_type: int, shapes: list[tuple], constant: list[bool]) -> None:
    """What the kernels of the ops dqnc deploys take on trust: inputs present, shapes that agree."""
    def bad(why: str) -> ModelCheckError:
        return ModelCheckError(f"{where} ({_OP_NAMES.get(code, f'builtin op {code}')}): {why} (damaged file)")

    if any(o < 0 or constant[o] for o in outputs):
        raise bad("an output is missing or is a constant tensor")
    if decode:  # TFLM's DECODE: (encoded, ancillary) input pairs, one output per pair
        if not inputs or len(inputs) % 2 or len(outputs) * 2 != len(inputs) or min(inputs) < 0:
            raise bad(f"DECODE with {len(inputs)} inputs and {len(outputs)} outputs")
        return
    if code == _CUSTOM:
        return
    need = _REQUIRED_INPUTS.get(code, 1)
    if len(inputs) < need or min(inputs[:need]) < 0 or not outputs:
        raise bad(f"needs {need} input(s) and an output, has inputs {list(inputs)[:8]} and outputs {list(outputs)[:8]}")
    if code in _ELEMENTWISE and _elements(shapes[inputs[0]]) != _elements(shapes[outputs[0]]):
        raise bad(f"input shape {_shape_text(shapes[inputs[0]])} and output shape {_shape_text(shapes[outputs[0]])} "
                  "differ in size")
    if code not in _OPTIONS:
        return
    used = [shapes[i] for i in (*inputs, *outputs) if i >= 0]
    if any(0 in shape for shape in used):
        raise bad("a tensor of the op has a zero-sized dimension")
    if options is not None and option_type != _OPTIONS[code]:
        raise bad(f"options of type {option_type}, not {_OPTIONS[code]}")
    x, w, y = shapes[inputs[0]], shapes[inputs[1]] if len(inputs) > 1 else (), shapes[outputs[0]]
    bias = shapes[inputs[2]] if len(inputs) > 2 and inputs[2] >= 0 else None
    if code == _FULLY_CONNECTED:
        if options is not None and options.scalar(1, "<b") != 0:
            return  # a shuffled weights format: the runtimes check it themselves
        if len(w) != 2 or _elements(x) % w[1] or not y or y[-1] != w[0] or _elements(x) // w[1] * w[0] != _elements(y) \
                or (bias is not None and _elements(bias) != w[0]):
            raise bad(f"input {_shape_text(x)}, weights {_shape_text(w)}, bias {bias and _shape_text(bias)} and output "
                      f"{_shape_text(y)} do not agree")
        return
    if options is None:
        raise bad("no options (strides, filter size)")
    strides = (options.scalar(1, "<i"), options.scalar(2, "<i"))
    if code in (_AVERAGE_POOL_2D, _MAX_POOL_2D):
        filter_size = (options.scalar(3, "<i"), options.scalar(4, "<i"))
        if len(x) != 4 or len(y) != 4 or x[3] != y[3] or min(strides) < 1 or min(filter_size) < 1:
            raise bad(f"input {_shape_text(x)}, output {_shape_text(y)}, strides {strides} or filter size do not agree")
        return
    dilations = (options.scalar(4, "<i", 1), options.scalar(5, "<i", 1)) if code == _CONV_2D else \
        (options.scalar(5, "<i", 1), options.scalar(6, "<i", 1))
    if len(x) != 4 or len(w) != 4 or len(y) != 4 or min(strides) < 1 or min(dilations) < 1:
        raise bad(f"input {_shape_text(x)}, filter {_shape_text(w)}, output {_shape_text(y)}, strides {strides}, "
                  f"dilations {dilations}: not a 2-D convolution")
    out = w[0] if code == _CONV_2D else w[3]
    if code == _CONV_2D:
        agree = x[3] % w[3] == 0 and w[0] % (x[3] // w[3]) == 0
    else:
        agree = w[0] == 1 and w[3] % x[3] == 0
    if not agree or y[3] != out or (bias is not None and _elements(bias) != out):
        raise bad(f"input {_shape_text(x)}, filter {_shape_text(w)}, bias {bias and _shape_text(bias)} and output "
                  f"{_shape_text(y)} channels do not agree")


def _operator_codes(model: _Table) -> tuple[list[int], set[int]]:
    """Each operator code's builtin operator, and which codes are TFLM's DECODE custom op."""
    codes = model.tables(1, "operator code")
    decode = {k for k, code in enumerate(codes) if code.string(1, "custom_code") == _TFLM_DECODE}
    builtin = []
    for code in codes:
        old, new, version = code.scalar(0, "<b"), code.scalar(3, "<i"), code.scalar(2, "<i", 1)
        if old < 0 or not 0 <= new <= _MAX_BUILTIN or not 0 < version < 1000:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {code.what} has builtin code {new} ({old}), "
                                  f"version {version}")
        builtin.append(max(old, new))
    return builtin, decode


def _buffer_sizes(model: _Table, file_size: int) -> list[int]:
    """Each buffer's bytes (inside the flatbuffer, or after it); the metadata's buffer indices checked."""
    buffer_bytes = []
    for buf in model.tables(4, "buffer"):
        size = buf.nbytes(0, "data")
        offset, outside = buf.scalar(1, "<Q"), buf.scalar(2, "<Q")
        if offset > 1:  # data stored after the flatbuffer (models over 2 GB)
            if offset + outside > file_size:
                raise ModelCheckError(f"damaged TFLite flatbuffer: {buf.what} points past the end of the file")
            size = outside
        buffer_bytes.append(size)
    n_buffers = len(buffer_bytes)
    for k in model.numbers(5, "i", "metadata_buffer"):
        if not 0 <= k < n_buffers:
            raise ModelCheckError(f"damaged TFLite flatbuffer: metadata buffer {k} out of range ({n_buffers} buffers)")
    for meta in model.tables(6, "metadata"):
        meta.string(0, "name")
        if meta.scalar(1, "<I") >= n_buffers:
            raise ModelCheckError(f"damaged TFLite flatbuffer: {meta.what} names buffer {meta.scalar(1, '<I')} of {n_buffers}")
    return buffer_bytes


def _operators(sg: _Table, nt: int, builtin: list[int], decode: set[int], file_size: int) -> tuple[list[tuple], set[int]]:
    """A subgraph's operators as :func:`_check_op` records (indices and vectors checked), and the
    tensors DECODE ops read (encoded)."""
    encoded: set[int] = set()
    ops = []
    for op in sg.tables(3, "operator"):
        where = f"TFLite {op.what}"
        code = op.scalar(0, "<I")
        if code >= len(builtin):
            raise ModelCheckError(f"{where}: operator code {code} out of range ({len(builtin)} codes; damaged file)")
        for what, field in (("input", 1), ("output", 2), ("intermediate", 8)):
            for i in op.numbers(field, "i", f"{what}s"):
                if not -1 <= i < nt:
                    raise ModelCheckError(f"{where}: {what} tensor {i} out of range ({nt} tensors; damaged file)")
        inputs, outputs = op.numbers(1, "i", "inputs"), op.numbers(2, "i", "outputs")
        if code in decode:
            encoded.update(inputs)
        options = op.table(4, "builtin_options")
        option_type = op.scalar(3, "<B")
        if options is not None and option_type == _RESHAPE_OPTIONS:
            options.numbers(0, "i", "new_shape")
        ops.append((where, builtin[code], code in decode, inputs, outputs, options, option_type))
        op.nbytes(5, "custom_options")
        op.nbytes(7, "mutating_variable_inputs")
        start, size = op.scalar(9, "<Q"), op.scalar(10, "<Q")
        if size and start + size > file_size:
            raise ModelCheckError(f"{where}: custom options point past the end of the file (damaged file)")
        op.table(12, "builtin_options_2")
    return ops, encoded


def _tensor_elements(where: str, shape: tuple, total: int, max_tensor_elements: int, max_total_elements: int) -> int:
    """The elements ``shape`` declares, refused when negative or over the limits (``total``: so far)."""
    if any(d < 0 for d in shape):
        raise ModelCheckError(f"{where}: shape {_shape_text(shape)} has a negative dimension (damaged file)")
    count = _elements(shape)
    if count > max_tensor_elements:
        raise ModelLimitError(f"{where}: shape {_shape_text(shape)} declares {count:,} elements, over the limit "
                              f"of {max_tensor_elements:,} per tensor (MAX_TENSOR_ELEMENTS in dqnc.limits); "
                              "this is not a Q-network to deploy: re-create the model")
    if total + count > max_total_elements:
        raise ModelLimitError(f"TFLite model: its tensors declare over {max_total_elements:,} elements in all "
                              "(MAX_TOTAL_ELEMENTS in dqnc.limits); this is not a Q-network to deploy")
    return count


def _check_tensor(t: _Table, where: str, shape: tuple, count: int, encoded: bool, buffer_bytes: list[int]) -> bool:
    """A tensor's type, buffer, quantization and sparsity; returns whether it is a constant."""
    ttype = t.scalar(1, "<b")
    if ttype not in _TYPE_BITS:
        raise ModelCheckError(f"{where}: unknown tensor type {ttype} (damaged file)")
    k = t.scalar(2, "<I")
    if k >= len(buffer_bytes):
        raise ModelCheckError(f"{where}: buffer {k} out of range ({len(buffer_bytes)} buffers; damaged file)")
    t.string(3, "name")
    q = t.table(4, "quantization")
    if q is not None:
        _check_quantization(q, shape, ttype, where, encoded)
    sparsity = t.table(6, "sparsity")
    if sparsity is not None:
        _check_sparsity(sparsity)
    if any(d < -1 for d in t.numbers(7, "i", "shape_signature")):
        raise ModelCheckError(f"{where}: shape_signature has a dimension below -1 (damaged file)")
    t.tables(9, "variant_tensors")
    bits = _TYPE_BITS[ttype]
    need = (count * bits + 7) // 8 if bits else 0
    sizes = (need, count if bits and bits < 8 else need)  # 4- and 2-bit values: packed or a byte each
    have = buffer_bytes[k]
    if k and have and bits and (have not in sizes if sparsity is None else have > max(sizes)):
        raise ModelCheckError(f"{where}: shape {_shape_text(shape)} of {bits}-bit values needs "
                              f"{need:,} bytes but its buffer {k} holds {have:,} (damaged file)")
    return bool(k and buffer_bytes[k])


def _check_subgraph(s: int, sg: _Table, builtin: list[int], decode: set[int], buffer_bytes: list[int],
                    file_size: int, total: int, limits: tuple[int, int]) -> tuple[int, int]:
    """Subgraph ``s``: operators, tensors (``total``: elements declared before it), then each op's
    shapes; returns its tensor count and the new total."""
    tensors = sg.tables(0, "tensor")
    nt = len(tensors)
    ops, encoded = _operators(sg, nt, builtin, decode, file_size)
    shapes: list[tuple] = []
    constant: list[bool] = []
    for index, t in enumerate(tensors):
        where = f"TFLite {t.what}"
        shape = t.numbers(0, "i", "shape")
        count = _tensor_elements(where, shape, total, *limits)
        total += count
        shapes.append(shape)
        constant.append(_check_tensor(t, where, shape, count, index in encoded, buffer_bytes))
    for op_record in ops:
        _check_op(*op_record, shapes, constant)
    for what, field in (("input", 1), ("output", 2)):
        for i in sg.numbers(field, "i", f"{what}s"):
            if not 0 <= i < nt:
                raise ModelCheckError(f"TFLite subgraph {s}: {what} tensor {i} out of range ({nt} tensors; damaged file)")
    sg.string(4, "name")
    return nt, total


def _check_signatures(model: _Table, n_tensors: list[int]) -> None:
    """Signatures name a subgraph and tensors of it that exist."""
    for sig in model.tables(7, "signature"):
        s = sig.scalar(4, "<I")
        if s >= len(n_tensors):
            raise ModelCheckError(f"TFLite {sig.what}: subgraph {s} out of range (damaged file)")
        sig.string(2, "signature_key")
        for field, what in ((0, "input"), (1, "output")):
            for tm in sig.tables(field, what):
                tm.string(0, "name")
                if tm.scalar(1, "<I") >= n_tensors[s]:
                    raise ModelCheckError(f"TFLite {tm.what}: tensor {tm.scalar(1, '<I')} out of range (damaged file)")


def check_model(content: bytes, max_tensor_elements: int = MAX_TENSOR_ELEMENTS,
                max_total_elements: int = MAX_TOTAL_ELEMENTS) -> None:
    """Refuse (``ModelCheckError``, a ValueError) a .tflite that is damaged or declares tensors over
    the limits: every offset, vector and string in range, operator codes, tensor and buffer
    indices in range, shapes non-negative and within the element limits, constant buffers as large
    as their tensors' shapes need, quantization parameters consistent with the shapes."""
    b = _Buf(bytes(content))
    if b.n < 8 or b.d[4:8] != b"TFL3":
        raise ModelCheckError("not a TFLite flatbuffer (missing the 'TFL3' identifier)")
    model = b.table(b.ref(0, "the root offset"), "the model")
    version = model.scalar(0, "<I")
    if version != 3:
        raise ModelCheckError(f"TFLite schema version {version}, not 3 (damaged, or not a TFLite model)")
    builtin, decode = _operator_codes(model)
    model.string(3, "description")
    buffer_bytes = _buffer_sizes(model, b.n)
    subgraphs = model.tables(2, "subgraph")
    if not subgraphs:
        raise ModelCheckError("damaged TFLite flatbuffer: the model has no subgraph")
    total = 0
    n_tensors = []
    for s, sg in enumerate(subgraphs):
        nt, total = _check_subgraph(s, sg, builtin, decode, buffer_bytes, b.n, total,
                                    (max_tensor_elements, max_total_elements))
        n_tensors.append(nt)
    _check_signatures(model, n_tensors)


class Policy:
    """A Q-network in a .tflite file: float observations in, float Q-values or an action out.

    Integer (int8/int16) inputs and outputs are quantized/dequantized with the tensors' own
    scale and zero point, so callers never see the model's precision.
    """

    def __init__(self, model_path: str | None = None, model_content: bytes | None = None,
                 runtime: str | None = None, num_threads: int = 1,
                 obs_mean: Any = None, obs_std: Any = None, interpreter: Any = None) -> None:
        if interpreter is not None:
            # Another runtime behind the tf.lite.Interpreter calls used here (dqnc.tflm).
            self.interpreter, self.delegate, self.runtime = interpreter, "none", interpreter.runtime
        else:
            module, self.runtime = interpreter_class(runtime)
            if model_path is not None and model_content is None:
                with open(model_path, "rb") as f:
                    model_content = f.read()
            if not model_content:
                raise ValueError("empty model: the .tflite file holds no bytes")
            check_model(model_content)  # before the runtime reads any offset or allocates any tensor
            self.interpreter, self.delegate = _allocate(module, model_content, num_threads)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected 1 input and 1 output, found {len(inputs)} and {len(outputs)}")
        self._in, self._out = inputs[0], outputs[0]
        self.obs_dim = int(np.prod(self._in["shape"][1:]))
        self.n_actions = int(np.prod(self._out["shape"][1:]))
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        self.input_scale, self.input_zero_point = _qparams(self._in)
        self.output_scale, self.output_zero_point = _qparams(self._out)
        self.input_shape = tuple(int(s) for s in self._in["shape"])  # with the batch dimension (1)
        self._in_shape = self.input_shape  # the name before 0.3, for callers outside dqnc
        self._in_index, self._out_index = self._in["index"], self._out["index"]
        self._set = self.interpreter.set_tensor
        self._get = self.interpreter.get_tensor
        self._invoke = self.interpreter.invoke
        # Observations are standardized per feature before the model's own (per-tensor) input
        # quantization; both are folded into one affine map, x * a + c, applied in numpy.
        mean = np.zeros(self.obs_dim) if obs_mean is None else np.asarray(obs_mean, np.float64).reshape(-1)
        std = np.ones(self.obs_dim) if obs_std is None else np.asarray(obs_std, np.float64).reshape(-1)
        if mean.shape != (self.obs_dim,) or std.shape != (self.obs_dim,) or (std <= 0).any():
            raise ValueError(f"obs_mean/obs_std must hold {self.obs_dim} values (std > 0)")
        if self.input_dtype.kind == "f":
            self._a, self._c = 1.0 / std, -mean / std
        else:
            self._a = 1.0 / (std * self.input_scale)
            self._c = -mean / (std * self.input_scale) + self.input_zero_point
        self._a, self._c = np.asarray(self._a, np.float32), np.asarray(self._c, np.float32)
        if self.input_dtype.kind != "f":
            info = np.iinfo(self.input_dtype)
            self._lo, self._hi = np.float32(info.min), np.float32(info.max)
        self._identity = self.input_dtype.kind == "f" and obs_mean is None and obs_std is None

    @classmethod
    def from_manifest(cls, model_path: str, manifest: dict[str, Any] | None, **kwargs: Any) -> Policy:
        """A Policy with the observation preprocessing recorded in a dqnc manifest (if any)."""
        pre = (manifest or {}).get("preprocess") or {}
        return cls(model_path, obs_mean=pre.get("obs_mean"), obs_std=pre.get("obs_std"), **kwargs)

    @property
    def input_map(self) -> tuple[np.ndarray, np.ndarray]:
        """The float32 map ``q = round_half_even(obs * a + c)`` (clamped to the input type): the
        observation standardization and the input quantization folded together, as ``(a, c)``."""
        return self._a, self._c

    def quantize_input(self, obs: np.ndarray) -> np.ndarray:
        """Float observations ``[N, ...]`` as the model's input values ``[N, obs_dim]`` (flat rows)."""
        if obs.shape[-1:] != (self.obs_dim,):  # images (HWC): the per-feature map is over the flat order
            obs = obs.reshape(-1, self.obs_dim)
        if self._identity:
            return obs.astype(self.input_dtype, copy=False)
        x = obs * self._a
        x += self._c
        if self.input_dtype.kind == "f":
            return x.astype(self.input_dtype)
        np.rint(x, out=x)
        np.maximum(x, self._lo, out=x)  # ufuncs: np.clip's Python wrapper costs ~1 us per call
        np.minimum(x, self._hi, out=x)
        return x.astype(self.input_dtype)

    _quantize = quantize_input  # the name before 0.3, for callers outside dqnc

    def _dequantize(self, q: np.ndarray) -> np.ndarray:
        if self.output_dtype.kind == "f":
            return q.astype(np.float32)
        return ((q.astype(np.float32) - self.output_zero_point) * self.output_scale).astype(np.float32)

    def q_values(self, obs: Any) -> np.ndarray:
        """Q-values for a batch ``[N, obs_dim]`` (or one observation), as float32 ``[N, n_actions]``."""
        rows = np.asarray(obs).reshape(-1, self.obs_dim)
        out = np.empty((len(rows), self.n_actions), np.float32)
        for start in range(0, len(rows), 1024):  # chunks: 10,000 Atari states are 1.1 GB as float32
            xq = self.quantize_input(rows[start:start + 1024].astype(np.float32))
            for i in range(len(xq)):
                self._set(self._in_index, xq[i].reshape(self.input_shape))
                self._invoke()
                out[start + i] = self._dequantize(self._get(self._out_index).reshape(-1))
        return out

    __call__ = q_values

    def io(self) -> dict[str, Any]:
        """Input/output dtype, shape, scale and zero point, as manifests record them."""
        def one(detail: dict[str, Any], dtype: np.dtype, scale: float, zero: int) -> dict[str, Any]:
            return {"dtype": dtype.name, "shape": [int(s) for s in detail["shape"]], "scale": scale, "zero_point": zero}

        return {"input": one(self._in, self.input_dtype, self.input_scale, self.input_zero_point),
                "output": one(self._out, self.output_dtype, self.output_scale, self.output_zero_point)}

    @property
    def has_sparse_tensors(self) -> bool:
        return any(d.get("sparsity_parameters") for d in self.interpreter.get_tensor_details())

    def act(self, obs: Any) -> int:
        """The greedy action for one observation (the per-step path of a control loop).

        Dequantizing is monotonic (scale > 0), so the argmax is taken on the raw output.
        """
        self._set(self._in_index, self.quantize_input(np.asarray(obs, np.float32)).reshape(self.input_shape))
        self._invoke()
        return int(self._get(self._out_index).argmax())

    def invoke_quantized(self, xq: np.ndarray) -> np.ndarray:
        """Set an already-quantized input, invoke, return the raw output: the interpreter's own cost."""
        self._set(self._in_index, xq)
        self._invoke()
        return self._get(self._out_index)


def _allocate(module: Any, content: bytes, num_threads: int) -> tuple[Any, str]:
    """An allocated interpreter: the runtime's default delegates (XNNPACK) first, plain builtin
    kernels where a delegate refuses the graph (XNNPACK rejects some sparse int8 layers)."""
    resolver = getattr(module, "OpResolverType", None)
    try:
        with quiet_stderr(replay_on_error=resolver is None):  # a refused delegate is not news
            it = module.Interpreter(model_content=content, num_threads=num_threads)
            it.allocate_tensors()
            it.invoke()  # some runtimes apply delegates (and announce them) on the first invoke
        return it, "default"
    except RuntimeError:
        if resolver is None:
            raise
    with quiet_stderr():
        it = module.Interpreter(model_content=content, num_threads=num_threads,
                                experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        it.invoke()
    return it, "builtin"


def _qparams(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="Map observations to actions with a TFLite Q-network.")
    p.add_argument("--model", default=os.path.join(here, "model.tflite"), help="path of the .tflite file")
    p.add_argument("--obs", help="one observation as comma-separated floats; else JSON lines on stdin")
    p.add_argument("--runtime", choices=RUNTIMES, help="force a runtime (default: first that imports)")
    p.add_argument("--q", action="store_true", help="print Q-values too, as JSON")
    args = p.parse_args(argv)
    manifest = None
    manifest_path = os.path.join(os.path.dirname(os.path.abspath(args.model)), "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    try:
        policy = Policy.from_manifest(args.model, manifest, runtime=args.runtime)
    except (ImportError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [args.obs] if args.obs is not None else sys.stdin
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obs = json.loads(line) if line.startswith("[") else [float(v) for v in line.split(",")]
            x = np.asarray(obs, np.float32).reshape(-1, policy.obs_dim)
        except ValueError as e:
            print(f"error: bad observation {line!r} ({e}); expected {policy.obs_dim} numbers", file=sys.stderr)
            return 2
        q = policy.q_values(x)
        for row in q:
            print(json.dumps({"action": int(row.argmax()), "q": [round(float(v), 6) for v in row]}) if args.q
                  else int(row.argmax()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
