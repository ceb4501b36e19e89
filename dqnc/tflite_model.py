"""The one ``.tflite`` reader (and writer) of dqnc's own code, on tflite-micro's generated schema.

No TensorFlow and no LiteRT: the flatbuffer is checked (:func:`check`, bounds and element limits)
and then read into the schema's object API, which callers may change and write back
(:meth:`Model.to_bytes`). Everything dqnc asks of a model file goes through here: its ops
(:mod:`dqnc.tflm`, export's op resolver), weighted layers (``dqnc inspect``), tensors with shape,
dtype and quantization, constant buffers (:mod:`dqnc.cpolicy`, :mod:`dqnc.lowbit`), and the output
scale quantize narrows (:mod:`dqnc.quantize`).

The one deliberate exception is ``check_model`` in :mod:`dqnc.runtime`: that module is shipped
verbatim into every bundle as ``run_policy.py``, which must run with numpy and a TFLite
interpreter only (no tflite-micro on a device), so it walks the flatbuffer with its own
dependency-free reader before any runtime parses it. :func:`check` calls it with dqnc's limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# TensorType -> numpy dtype name (the types dqnc's models hold; others read as raw bytes)
_DTYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 8: "complex64",
           9: "int8", 10: "float64", 12: "uint64", 15: "uint32", 16: "uint16"}
WEIGHTED_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")
DECODE = "TFLM_DECODE"  # TFLM's custom op that expands LUT-compressed tensors


def schema() -> Any:
    """The TFLite flatbuffer schema module shipped with tflite-micro (no TensorFlow import)."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


def check(content: bytes) -> None:
    """Refuse (exit 2) a .tflite whose flatbuffer is damaged or declares tensors over dqnc.limits,
    before TFLM (which verifies nothing) or the schema's Python reader touches it."""
    from dqnc import limits
    from dqnc.errors import ArtifactError
    from dqnc.runtime import ModelCheckError, ModelLimitError, check_model

    try:
        check_model(content, limits.MAX_TENSOR_ELEMENTS, limits.MAX_TOTAL_ELEMENTS)
    except ModelLimitError as e:
        raise limits.LimitError(str(e)) from None
    except ModelCheckError as e:
        raise ArtifactError(f"not a valid TFLite model: {e}; re-create it with dqnc quantize or export") from None


def read_model(content: bytes) -> Any:
    """The checked model in the schema's object API (``ModelT``), to read or to change."""
    check(content)
    fb = schema()
    return fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(bytearray(content), 0))


def write_model(model: Any) -> bytes:
    """``ModelT`` -> flatbuffer bytes (file identifier TFL3), as TensorFlow's flatbuffer_utils writes them."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def op_names(model: Any) -> list[str]:
    """The builtin operator name of each operator of subgraph 0, in execution order."""
    fb = schema()
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for op in model.subgraphs[0].operators or []:
        code = model.operatorCodes[op.opcodeIndex]
        out.append(names.get(max(int(code.builtinCode), int(code.deprecatedBuiltinCode)), "CUSTOM"))
    return out


@dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy name, or "type N" for a type dqnc does not read
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    buffer: int
    sparse: bool


@dataclass(frozen=True)
class Op:
    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: Any


class Model:
    """A checked .tflite file: ops, tensors, constant data and weighted layers of subgraph 0.

    ``raw`` is the schema's mutable ``ModelT``; :meth:`to_bytes` writes it back.
    """

    def __init__(self, content: bytes) -> None:
        self.raw = read_model(content)
        self.subgraph = self.raw.subgraphs[0]

    def ops(self) -> list[Op]:
        return [Op(name, tuple(int(i) for i in (op.inputs if op.inputs is not None else ())),
                   tuple(int(i) for i in (op.outputs if op.outputs is not None else ())), op.builtinOptions)
                for op, name in zip(self.subgraph.operators or [], op_names(self.raw))]

    def op_names(self) -> list[str]:
        return op_names(self.raw)

    def custom_codes(self) -> list[str]:
        codes = [getattr(c, "customCode", None) for c in self.raw.operatorCodes or []]
        return [c.decode(errors="replace") if isinstance(c, bytes) else c for c in codes if c]

    def uses_decode(self) -> bool:
        """True for a LUT-compressed model (TFLM's DECODE custom op), which only TFLM runs."""
        return DECODE in self.custom_codes()

    def tensor(self, index: int) -> Tensor:
        t = self.subgraph.tensors[index]
        q = t.quantization
        scales = () if q is None or q.scale is None else tuple(float(s) for s in q.scale)
        zeros = () if q is None or q.zeroPoint is None else tuple(int(z) for z in q.zeroPoint)
        name = t.name.decode(errors="replace") if isinstance(t.name, bytes) else (t.name or "")
        return Tensor(index, name, tuple(int(d) for d in (t.shape if t.shape is not None else ())),
                      _DTYPES.get(int(t.type), f"type {int(t.type)}"), scales, zeros, int(t.buffer),
                      t.sparsity is not None)

    def buffer_bytes(self, index: int) -> bytes | None:
        """The constant bytes of tensor ``index``, or None where it has none (an activation)."""
        data = self.raw.buffers[self.subgraph.tensors[index].buffer].data
        return None if data is None or not len(data) else bytes(np.asarray(data, np.uint8))

    def data(self, index: int, dtype: Any = None, shaped: bool = True) -> np.ndarray | None:
        """Tensor ``index``'s constant values (in its own dtype unless ``dtype``), or None.
        A sparse tensor's buffer holds its stored values only: they come back flat."""
        raw = self.buffer_bytes(index)
        if raw is None:
            return None
        t = self.tensor(index)
        if dtype is None and t.dtype not in _DTYPES.values():
            return np.frombuffer(raw, np.uint8)  # a type numpy has no dtype for (int4, ...): its bytes
        values = np.frombuffer(raw, np.dtype(dtype or t.dtype))
        return values.reshape(t.shape) if shaped and not t.sparse and values.size == int(np.prod(t.shape)) else values

    def weighted_layers(self) -> list[tuple[Op, int, int | None]]:
        """(op, weight tensor, bias tensor or None) of every FULLY_CONNECTED/CONV_2D/DEPTHWISE_CONV_2D."""
        out = []
        for op in self.ops():
            if op.name in WEIGHTED_OPS and len(op.inputs) >= 2:
                bias = op.inputs[2] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
                out.append((op, op.inputs[1], bias))
        return out

    def to_bytes(self) -> bytes:
        return write_model(self.raw)


def model_ops(content: bytes) -> list[str]:
    """The distinct ops a model uses, in order of first use."""
    return list(dict.fromkeys(op_names(read_model(content))))


def uses_decode(content: bytes) -> bool:
    """True for a LUT-compressed model (TFLM's DECODE custom op), which only TFLM runs."""
    return Model(content).uses_decode()
