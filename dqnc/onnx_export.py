"""The deployed policy as ONNX, rebuilt op by op from its ``.tflite`` (read with :mod:`dqnc.tflite_model`).

What the file holds follows the .tflite, so ONNX Runtime reproduces the policy LiteRT runs:

- an int8 (or int16x8) model becomes a QDQ graph: every quantized tensor is an integer value
  between a ``QuantizeLinear`` and a ``DequantizeLinear`` carrying the .tflite's exact scales and
  zero points (per channel where the .tflite is: kernels on their output channel, biases as int32
  with scale input_scale x weight_scale), around float ``Gemm``/``Conv`` and their activations;
  the input and output stay integer as in the .tflite, so the runner's input quantization and
  output scale apply unchanged;
- an fp32 model is the same graph in float32 (float16 weights are cast up, as LiteRT does).

Layouts: TFLite holds images NHWC, ONNX's ``Conv`` reads NCHW: each convolution is wrapped in two
``Transpose`` nodes (on the integer values where the tensors are quantized), so every other
tensor keeps the .tflite's layout and a ``Reshape`` flattens in the same (HWC) order.
The batch dimension is symbolic (``N``): a batch of states is one call.

Supported: FULLY_CONNECTED, CONV_2D (VALID or SAME padding, strides, dilations), RESHAPE, QUANTIZE,
DEQUANTIZE, RELU, RELU6, TANH, LOGISTIC, ELU and the fused activations NONE, RELU, RELU_N1_TO_1,
RELU6, TANH. :func:`refusal` words what is not (LUT compression, sparse tensors, dynamic-range
models, other ops).
The ``onnx`` package builds and checks the graph; nothing here needs onnxruntime.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

ONNX_FILE = "model.onnx"
OPSET = 21  # QuantizeLinear/DequantizeLinear with int16 and per-axis scales; ONNX Runtime >= 1.18, OpenVINO 2024
IR_VERSION = 10
BATCH = "N"

_ACTIVATION_OPS = {"RELU": "Relu", "RELU6": "Relu6", "TANH": "Tanh", "LOGISTIC": "Sigmoid", "ELU": "Elu"}
SUPPORTED_OPS = ("FULLY_CONNECTED", "CONV_2D", "RESHAPE", "QUANTIZE", "DEQUANTIZE", *_ACTIVATION_OPS)
# TFLite's ActivationFunctionType -> what follows the op in float (None: nothing)
_FUSED = {0: None, 1: "Relu", 2: "Relu1", 3: "Relu6", 4: "Tanh"}
_INT_TYPES = ("int8", "int16", "int32", "int64")
_VALUE_TYPES = ("float32", "float16", "int8", "int16", "int32", "int64")


def refusal(content: bytes) -> str | None:
    """Why this .tflite cannot be written as ONNX by dqnc, or None."""
    from dqnc.errors import DqncError
    from dqnc.tflite_model import Model

    try:
        model = Model(content)
    except DqncError as e:
        return str(e)
    if len(model.raw.subgraphs or []) != 1:
        return "the model has several subgraphs: dqnc writes single-graph Q-networks as ONNX"
    if model.uses_decode():
        return "the model is LUT-compressed (TFLite Micro's DECODE op): export its uncompressed int8 parent"
    sg = model.subgraph
    if len(sg.inputs if sg.inputs is not None else ()) != 1 or len(sg.outputs if sg.outputs is not None else ()) != 1:
        return "the model needs one input and one output tensor"
    for i in range(len(sg.tensors or [])):
        t = model.tensor(i)
        if t.sparse:
            return "the model stores sparse tensors: export the dense model (quantize --target mcu)"
        if t.dtype not in _VALUE_TYPES:
            return f"tensor {i} has type {t.dtype}, which dqnc does not write as ONNX"
    for op in model.ops():
        if op.name not in SUPPORTED_OPS:
            return f"op {op.name} has no ONNX form in dqnc (supported: {', '.join(SUPPORTED_OPS)})"
        act = getattr(op.options, "fusedActivationFunction", 0)
        if act not in _FUSED:
            return f"op {op.name} fuses activation {act}, which dqnc does not write as ONNX"
        if op.name == "CONV_2D" and len(model.tensor(op.inputs[1]).scales) > 1 \
                and model.subgraph.tensors[op.inputs[1]].quantization.quantizedDimension != 0:
            return "a conv kernel is quantized on another axis than its output channels"
    if form_of(model) == "hybrid":
        return ("a dynamic-range (hybrid) model quantizes its activations at run time in LiteRT's own way, which "
                "dqnc does not reproduce in ONNX: export the int8 or fp32 model")
    return None


def form(content: bytes) -> str:
    """What the ONNX file of this .tflite holds: ``qdq-int8`` or ``qdq-int16x8`` (integer
    activations), ``fp32-weights-fp16`` or ``fp32``."""
    from dqnc.tflite_model import Model

    return form_of(Model(content))


def form_of(model: Any) -> str:
    """:func:`form` of a read model; ``hybrid`` for int8 weights with float activations."""
    activations = {model.tensor(i).dtype for op in model.ops() for i in op.outputs}
    weights = {model.tensor(w).dtype for _, w, _ in model.weighted_layers()}
    if "int16" in activations:
        return "qdq-int16x8"
    if "int8" in activations:
        return "qdq-int8"
    if "int8" in weights:
        return "hybrid"
    stored = {model.tensor(i).dtype for i in range(len(model.subgraph.tensors or []))}
    return "fp32-weights-fp16" if "float16" in stored else "fp32"


def to_onnx(content: bytes) -> bytes:
    """The ONNX model of a .tflite policy, checked by ``onnx.checker`` (full check, shapes inferred).
    Raises UsageError (exit 2) with :func:`refusal`'s reason where there is one."""
    import onnx

    from dqnc import __version__
    from dqnc.errors import UsageError
    from dqnc.tflite_model import Model

    why = refusal(content)
    if why:
        raise UsageError(f"cannot write this model as ONNX: {why}")
    builder = _Builder(Model(content))
    graph = builder.build()
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="dqnc", producer_version=__version__,
                                   doc_string="A dqnc policy: integer (or float) observations in, action scores out; "
                                   "the greedy action is the first maximum.")
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(model, {"dqnc.form": form(content),
                                        "dqnc.tflite_sha256": hashlib.sha256(content).hexdigest()})
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def io_of(content: bytes) -> dict[str, dict[str, Any]]:
    """The .tflite's input and output as ``runtime.Policy`` reads an interpreter's details
    (shape with the batch of 1, numpy dtype, (scale, zero point)): the ONNX model shares them."""
    from dqnc.tflite_model import Model

    model = Model(content)
    sg = model.subgraph

    def one(index: int) -> dict[str, Any]:
        t = model.tensor(int(index))
        quant = (t.scales[0], t.zero_points[0] if t.zero_points else 0) if t.scales and t.dtype in _INT_TYPES else (0.0, 0)
        return {"shape": np.asarray(t.shape), "dtype": np.dtype(t.dtype), "quantization": (float(quant[0]), int(quant[1]))}

    return {"input": one(sg.inputs[0]), "output": one(sg.outputs[0])}


class _Builder:
    """One pass over the .tflite's ops in execution order, emitting ONNX nodes.

    ``value(i)`` is tensor i as the .tflite holds it (an integer value for a quantized tensor);
    ``real(i)`` its float view (a DequantizeLinear of the value, made once)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.names: dict[int, str] = {}
        self.reals: dict[int, str] = {}
        self.count = 0

    # --- names, constants, views ---------------------------------------------------------------

    def fresh(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def node(self, op: str, inputs: list[str], stem: str, **attrs: Any) -> str:
        from onnx import helper

        out = self.fresh(stem)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, array: np.ndarray, stem: str) -> str:
        from onnx import numpy_helper

        name = self.fresh(stem)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def quantized(self, i: int) -> bool:
        t = self.model.tensor(i)
        return bool(t.scales) and t.dtype in _INT_TYPES

    def qparams(self, i: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(scale, zero point, axis): 0-D for a per-tensor quantized tensor, 1-D per channel."""
        t = self.model.tensor(i)
        zero_dtype = np.int32 if t.dtype == "int64" else np.dtype(t.dtype)
        scales = np.asarray(t.scales, np.float32)
        zeros = np.asarray(t.zero_points or [0] * len(scales), np.int64).astype(zero_dtype)
        if len(scales) == 1:
            return scales.reshape(()), zeros.reshape(()), 0
        return scales, zeros, int(self.model.subgraph.tensors[i].quantization.quantizedDimension)

    def value(self, i: int) -> str:
        if i not in self.names:
            data = self.model.data(i)
            if data is None:
                raise ValueError(f"tensor {i} is used before an op writes it")
            self.names[i] = self.const(data, f"t{i}")
        return self.names[i]

    def real(self, i: int, data: np.ndarray | None = None) -> str:
        """Tensor ``i`` in float32 (``data``: its constant values in another layout)."""
        if i in self.reals and data is None:
            return self.reals[i]
        t = self.model.tensor(i)
        if data is not None or (t.dtype == "int64" and self.quantized(i)):
            values = self.model.data(i) if data is None else data
            if t.dtype == "int64":  # int16x8 biases: DequantizeLinear has no int64, the product is exact enough
                scale, zero, axis = self.qparams(i)
                values = ((values.astype(np.float64) - zero) * scale).astype(np.float32)
            name = self.const(values, f"t{i}")
            if self.quantized(i) and t.dtype != "int64":
                scale, zero, axis = self.qparams(i)
                name = self.node("DequantizeLinear", [name, self.const(scale, "scale"), self.const(zero, "zero")],
                                 f"t{i}_real", axis=axis)
        elif self.quantized(i):
            scale, zero, axis = self.qparams(i)
            name = self.node("DequantizeLinear", [self.value(i), self.const(scale, "scale"), self.const(zero, "zero")],
                             f"t{i}_real", axis=axis)
        elif t.dtype == "float16":
            name = self.node("Cast", [self.value(i)], f"t{i}_real", to=1)
        else:
            name = self.value(i)
        if data is None:
            self.reals[i] = name
        return name

    def write(self, i: int, real: str) -> None:
        """Tensor ``i`` computed in float as ``real``: quantized to its own parameters if it is."""
        if self.quantized(i):
            scale, zero, _ = self.qparams(i)
            self.names[i] = self.node("QuantizeLinear", [real, self.const(scale, "scale"), self.const(zero, "zero")], f"t{i}")
        else:
            self.names[i] = self.reals[i] = real

    def activation(self, name: str, kind: str | None) -> str:
        if kind is None:
            return name
        if kind in ("Relu1", "Relu6"):
            low, high = (-1.0, 1.0) if kind == "Relu1" else (0.0, 6.0)
            return self.node("Clip", [name, self.const(np.float32(low), "low"), self.const(np.float32(high), "high")], "act")
        return self.node(kind, [name], "act")

    # --- ops ---------------------------------------------------------------------------------

    def fully_connected(self, op: Any) -> None:
        x = self.real(op.inputs[0])
        if len(self.model.tensor(op.inputs[0]).shape) > 2:
            x = self.node("Flatten", [x], "flat", axis=1)
        inputs = [x, self.real(op.inputs[1])]
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            inputs.append(self.real(op.inputs[2]))
        y = self.node("Gemm", inputs, "fc", transB=1)
        self.write(op.outputs[0], self.activation(y, _FUSED[op.options.fusedActivationFunction]))

    def conv_2d(self, op: Any) -> None:
        o = op.options
        x_t, w_t = self.model.tensor(op.inputs[0]), self.model.tensor(op.inputs[1])
        _, kh, kw, _ = w_t.shape
        kernel = np.transpose(self.model.data(op.inputs[1]), (0, 3, 1, 2))  # OHWI -> OIHW
        strides, dilations = [o.strideH, o.strideW], [o.dilationHFactor, o.dilationWFactor]
        pads = [0, 0, 0, 0]
        if o.padding == 0:  # SAME: TFLite puts the odd pixel at the end
            total = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                     for n, s, k, d in zip(x_t.shape[1:3], strides, (kh, kw), dilations)]
            pads = [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2]
        nchw = self.node("Transpose", [self.value(op.inputs[0])], "nchw", perm=[0, 3, 1, 2])
        x = self.real_of(op.inputs[0], nchw)
        inputs = [x, self.real(op.inputs[1], kernel)]
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            inputs.append(self.real(op.inputs[2]))
        y = self.node("Conv", inputs, "conv", kernel_shape=[kh, kw], strides=strides, dilations=dilations, pads=pads)
        y = self.activation(y, _FUSED[o.fusedActivationFunction])
        out = op.outputs[0]
        if self.quantized(out):
            self.write(out, y)
            self.names[out] = self.node("Transpose", [self.names[out]], "nhwc", perm=[0, 2, 3, 1])
        else:
            self.write(out, self.node("Transpose", [y], "nhwc", perm=[0, 2, 3, 1]))

    def real_of(self, i: int, value: str) -> str:
        """``value`` (tensor i's value in another layout) in float32."""
        if not self.quantized(i):
            return value
        scale, zero, axis = self.qparams(i)
        return self.node("DequantizeLinear", [value, self.const(scale, "scale"), self.const(zero, "zero")], "real", axis=axis)

    def reshape(self, op: Any) -> None:
        src, out = op.inputs[0], op.outputs[0]
        shape = self.const(np.asarray([-1, *self.model.tensor(out).shape[1:]], np.int64), "shape")
        t_src, t_out = self.model.tensor(src), self.model.tensor(out)
        same_q = self.quantized(src) and self.quantized(out) and (t_src.dtype, t_src.scales, t_src.zero_points) == \
            (t_out.dtype, t_out.scales, t_out.zero_points)
        if same_q or not (self.quantized(src) or self.quantized(out)):
            self.names[out] = self.node("Reshape", [self.value(src), shape], f"t{out}")
        else:
            self.write(out, self.node("Reshape", [self.real(src), shape], "reshape"))

    def convert(self, op: Any) -> None:  # QUANTIZE, DEQUANTIZE: the output's own type and parameters
        self.write(op.outputs[0], self.real(op.inputs[0]))

    def elementwise(self, op: Any) -> None:
        kind = _ACTIVATION_OPS[op.name]
        self.write(op.outputs[0], self.activation(self.real(op.inputs[0]), kind))

    # --- the graph -----------------------------------------------------------------------------

    def build(self) -> Any:
        from onnx import helper

        sg = self.model.subgraph
        i_in, i_out = int(sg.inputs[0]), int(sg.outputs[0])
        t_in, t_out = self.model.tensor(i_in), self.model.tensor(i_out)
        self.names[i_in] = "observation"
        handlers = {"FULLY_CONNECTED": self.fully_connected, "CONV_2D": self.conv_2d, "RESHAPE": self.reshape,
                    "QUANTIZE": self.convert, "DEQUANTIZE": self.convert}
        for op in self.model.ops():
            handlers.get(op.name, self.elementwise)(op)
        self.nodes.append(helper.make_node("Identity", [self.names[i_out]], ["scores"], name="scores"))
        return helper.make_graph(
            self.nodes, "dqnc_policy",
            [helper.make_tensor_value_info("observation", _elem(t_in.dtype), [BATCH, *t_in.shape[1:]])],
            [helper.make_tensor_value_info("scores", _elem(t_out.dtype), [BATCH, *t_out.shape[1:]])],
            self.inits)


def _elem(dtype: str) -> int:
    from onnx import helper

    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

