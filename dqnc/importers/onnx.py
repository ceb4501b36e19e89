"""ONNX Q-networks, read with the ``onnx`` package; no onnxruntime, nothing in the file executed.

Two independent readings of one graph: a forward of the graph as ONNX defines it (the reference
the import is checked against: dqnc's own node-by-node numpy :func:`evaluate` for MLP graphs,
``onnx.reference.ReferenceEvaluator`` for conv graphs), and :func:`chain_ops`, which turns the
same graph into dqnc's op chain by following the one tensor that flows from the observation to
the Q-values, tracking its shape. Supported: Gemm (any alpha/beta/transB), MatMul, Add/Sub/Mul/Div
by constants (scalar, per feature, or per channel on images), Relu, Tanh, Sigmoid, Elu (alpha 1),
Clip, Flatten, Identity, Dropout, Cast to float32, Reshape to ``[batch, n]``, Constant, and for
pixel inputs Conv (square kernel, no padding, no dilation, one group) and the Transpose
``[0, 3, 1, 2]`` an NHWC input starts with: what torch.onnx exports (TorchScript opset 17, dynamo
opset 18) for SB3 and CleanRL MLP and CNN Q-networks (``[batch, ...]`` or fixed batch-1 inputs,
any names). A graph's ``[N, C, H, W]`` input is read as CHW images; ``[N, H, W, C]`` then that
Transpose as HWC images.

A graph's sizes are declarations checked before anything is allocated (:mod:`dqnc.limits`): every
initializer's and Constant's dims (and their raw bytes), the observation size, and the shape of
every node's result, computed from its inputs' shapes before the node runs (a 185 KB file adding a
[N, 1] to a [1, N] constant once asked for 2 GB). Batches of states are evaluated in chunks small
enough that one chunk's intermediate results stay within ``MAX_ACTIVATION_ELEMENTS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import limits
from dqnc.errors import ArtifactError
from dqnc.importers.common import Act, Affine, Clip, Conv, Flatten, Op, ScaleShift, Source, UnsupportedModelError

SUPPORTED_OPS = ("Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Tanh", "Sigmoid", "Elu", "Clip",
                 "Flatten", "Identity", "Dropout", "Reshape", "Constant", "Cast", "Conv", "Transpose")
# Ops a conv Q-network may hold that dqnc's conv family cannot express (yet): said so by name.
_POOLING = "pooling layers are not in dqnc's conv family"
_NOT_IN_FAMILY = {"MaxPool": _POOLING, "AveragePool": _POOLING, "GlobalAveragePool": _POOLING, "GlobalMaxPool": _POOLING,
                  "BatchNormalization": "batch normalization is not in dqnc's conv family: fold it into the conv "
                  "before export", "Pad": "padding is not in dqnc's conv family",
                  "ConvTranspose": "transposed convolutions are not in dqnc's conv family"}
NHWC_TO_NCHW = [0, 3, 1, 2]  # the Transpose torch exports for an input permuted channels-first
ONNX_FLOAT = 1  # TensorProto.FLOAT: the only Cast target that leaves float32 values unchanged
_ACTS = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "Elu": "elu"}


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _array(tensor: Any, what: str, budget: limits.Budget | None = None) -> np.ndarray:
    """A TensorProto as an array, its declared dims and bytes checked before numpy allocates them."""
    from onnx import helper, numpy_helper

    name = limits.clip(tensor.name, 80)
    if tensor.data_location == 1:  # EXTERNAL: the weights live in another file dqnc was not given
        raise UnsupportedModelError(f"{what}: tensor {name!r} is stored in an external data file; re-export "
                                    "with the weights inside the .onnx file (torch.onnx.export(..., external_data=False))")
    n = budget.take(tensor.dims, f"tensor {name!r}") if budget is not None else \
        limits.check_elements(tensor.dims, f"{what}: tensor {name!r}", name="MAX_TENSOR_ELEMENTS")
    if tensor.raw_data:
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{what}: tensor {name!r} has unknown data type {tensor.data_type}; re-export it") from None
        if len(tensor.raw_data) != n * itemsize and tensor.data_type not in _PACKED_TYPES:
            raise ArtifactError(f"{what}: tensor {name!r} declares dims {limits.clip(tuple(tensor.dims))} ({n:,} values, "
                                f"{n * itemsize:,} bytes) but holds {len(tensor.raw_data):,} bytes; the file is damaged")
    return np.asarray(numpy_helper.to_array(tensor))


# ONNX types stored packed (2 or 4 values a byte): raw_data is shorter than values x itemsize
_PACKED_TYPES = (21, 22, 25, 26)  # UINT4, INT4, UINT2, INT2


def _matmul_shape(a: tuple, b: tuple) -> tuple:
    """The shape np.matmul gives for operands of shapes ``a`` and ``b`` (ValueError if they do not fit)."""
    if not a or not b:
        raise ValueError(f"matmul of a scalar ({a} @ {b})")
    a2, b2 = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
    if a2[-1] != b2[-2]:
        raise ValueError(f"matmul shapes {a} and {b} do not fit")
    out = (*np.broadcast_shapes(a2[:-2], b2[:-2]), a2[-2], b2[-1])
    if len(b) == 1:
        out = out[:-1]
    if len(a) == 1:
        out = out[:-2] + out[-1:] if len(b) > 1 else out[:-1]
    return tuple(out)


def _result_shape(op: str, at: dict[str, Any], args: list[np.ndarray | None]) -> tuple:
    """The shape of a node's result, from its inputs' shapes, before it is computed."""
    x = args[0] if args else None
    if op == "Constant":
        return tuple(at["value"].dims) if "value" in at else ()  # value_floats etc. are already in memory
    if x is None:
        raise ValueError(f"{op} without an input")
    shape = tuple(x.shape)
    if op == "Gemm":
        a = shape[::-1] if at.get("transA", 0) else shape
        b = tuple(args[1].shape)[::-1] if at.get("transB", 0) else tuple(args[1].shape)
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise ValueError(f"Gemm of shapes {shape} and {tuple(args[1].shape)}")
        out = (a[0], b[1])
        return tuple(np.broadcast_shapes(out, args[2].shape)) if len(args) > 2 and args[2] is not None else out
    if op == "MatMul":
        return _matmul_shape(shape, tuple(args[1].shape))
    if op in ("Add", "Sub", "Mul", "Div"):
        return tuple(np.broadcast_shapes(shape, args[1].shape))
    if op == "Transpose":
        perm = list(at.get("perm", range(len(shape) - 1, -1, -1)))
        if sorted(perm) != list(range(len(shape))):
            raise ValueError(f"Transpose perm {perm} for a {len(shape)}-D tensor")
        return tuple(shape[i] for i in perm)
    if op == "Clip":
        return tuple(np.broadcast_shapes(shape, *[np.shape(a) for a in args[1:] if a is not None]))
    return shape  # unary ops, Cast, Flatten, Reshape: as many values as the input


def read_model(path: Path) -> Any:
    import onnx
    from google.protobuf.message import DecodeError

    from dqnc.importers.torchzip import read_file

    data = read_file(path)  # refused past limits.MAX_DECOMPRESSED_BYTES before reading
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError, TypeError) as e:
        raise ArtifactError(f"{str(path)!r}: not a readable ONNX model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else 'truncated or damaged'}); re-export it") from None
    if not model.graph.node or not model.graph.output:
        raise ArtifactError(f"{str(path)!r}: not an ONNX model (no graph nodes or outputs); truncated or damaged: re-export it")
    return model


class Graph:
    """The parts of an ONNX graph dqnc uses: constants, one input, one output, the nodes."""

    def __init__(self, model: Any, what: str) -> None:
        g = model.graph
        self.what = what
        budget = limits.Budget(f"{what}: initializers")
        self.consts: dict[str, np.ndarray] = {t.name: _array(t, what, budget) for t in g.initializer}
        self.row_elements: int | None = None  # intermediate values per observation, measured on first use
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1 or len(g.output) != 1:
            raise UnsupportedModelError(f"{what}: the graph has {len(inputs)} inputs and {len(g.output)} outputs; "
                                        "a Q-network has one observation input and one Q-value output")
        self.input, self.output = inputs[0].name, g.output[0].name
        self.input_type = int(inputs[0].type.tensor_type.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) < 2 or any(d is None or d < 1 for d in dims[1:]):
            raise UnsupportedModelError(f"{what}: input {self.input!r} has shape {dims}; expected [batch, n] "
                                        "(a flat observation with a batch axis)")
        self.obs_dim = limits.check_elements(dims[1:], f"{what}: input {limits.clip(self.input, 80)!r}",
                                             limits.MAX_ACTIVATION_ELEMENTS, "MAX_ACTIVATION_ELEMENTS")
        self.obs_shape: tuple[int, ...] = tuple(int(d) for d in dims[1:])
        self.fixed_batch = dims[0]  # None when dynamic
        if self.fixed_batch not in (None, 1):
            raise UnsupportedModelError(f"{what}: input batch size is fixed to {self.fixed_batch}; export with a "
                                        "dynamic batch axis or batch 1")
        self.nodes = list(g.node)
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED_OPS:
                why = _NOT_IN_FAMILY.get(node.op_type)
                why = f" ({why})" if why else ""
                raise UnsupportedModelError(
                    f"{what}: ONNX op {limits.clip(node.op_type, 60)!r} (node "
                    f"{limits.clip(node.name or node.output[0], 80)!r}) is not supported{why}; "
                    f"supported: {', '.join(SUPPORTED_OPS)}")
        # Constant subgraphs (a Constant shape, a weight computed from initializers) are folded once
        # here, within a budget: evaluate() then runs only the nodes that depend on the observation.
        folded = limits.Budget(f"{what}: constants folded from the graph")
        for node in self.nodes:
            if node.output and all(n in self.consts for n in node.input if n) and node.output[0] not in self.consts:
                out = _run_node(node, [self.consts[n] if n else None for n in node.input], what)
                folded.take(np.shape(out), limits.clip(node.name or node.output[0], 80))
                self.consts[node.output[0]] = out


def _run_node(node: Any, args: list[np.ndarray | None], what: str) -> np.ndarray:
    """One node with numpy, following the ONNX operator definitions; its result's size is checked
    against ``MAX_ACTIVATION_ELEMENTS`` before it is computed."""
    op, at = node.op_type, _attrs(node)
    limits.check_elements(_result_shape(op, at, args), f"{what}: the result of {op} node "
                          f"{limits.clip(node.name or node.output[0], 80)!r}", limits.MAX_ACTIVATION_ELEMENTS,
                          "MAX_ACTIVATION_ELEMENTS")
    x = args[0] if args else None  # a Constant has no inputs
    if op == "Gemm":
        a = x.T if at.get("transA", 0) else x
        b = args[1].T if at.get("transB", 0) else args[1]
        y = np.float32(at.get("alpha", 1.0)) * (a @ b)
        if len(args) > 2 and args[2] is not None:
            y = y + np.float32(at.get("beta", 1.0)) * args[2]
        return y
    if op == "MatMul":
        return np.matmul(x, args[1])
    if op in ("Add", "Sub", "Mul", "Div"):
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op](x, args[1])
    if op == "Relu":
        return np.maximum(x, np.float32(0))
    if op == "Tanh":
        return np.tanh(x)
    if op == "Sigmoid":
        return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(x.dtype)
    if op == "Elu":
        alpha = np.float32(at.get("alpha", 1.0))
        return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, np.float32(0)))).astype(x.dtype)
    if op == "Clip":
        lo = args[1] if len(args) > 1 and args[1] is not None else at.get("min", -np.inf)
        hi = args[2] if len(args) > 2 and args[2] is not None else at.get("max", np.inf)
        return np.clip(x, lo, hi).astype(x.dtype)
    if op == "Flatten":
        axis = at.get("axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op in ("Identity", "Dropout"):
        return x
    if op == "Transpose":  # of a constant (a weight); on the observation only in conv graphs
        return np.transpose(x, at.get("perm"))
    if op == "Cast":
        # SB3's q_net, exported by torch.onnx, casts the observation to float32 first.
        if int(at.get("to", 0)) != ONNX_FLOAT:
            raise UnsupportedModelError(f"{what}: Cast {node.name!r} to ONNX type {at.get('to')} is not supported "
                                        "(only a cast to float32, which changes no value)")
        return np.asarray(x, np.float32)
    if op == "Reshape":
        shape = [int(s) for s in np.asarray(args[1]).ravel()]
        if not at.get("allowzero", 0):
            shape = [x.shape[i] if s == 0 and i < x.ndim else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Constant":
        from onnx import numpy_helper

        for key in ("value",):
            if key in at:
                return _array(at[key], what)
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in at:
                return np.asarray(at[key], dtype)
        raise UnsupportedModelError(f"{what}: Constant node {node.name!r} without a numeric value")
    raise UnsupportedModelError(f"{what}: ONNX op {op!r} on constants only is not supported (it is not a layer on the "
                                f"observation); supported: {', '.join(SUPPORTED_OPS)}")


def evaluate(graph: Graph, obs: np.ndarray) -> np.ndarray:
    """The graph's output for a batch of observations, node by node in numpy float32, in chunks of
    rows small enough that one chunk's intermediate results hold at most MAX_ACTIVATION_ELEMENTS."""
    x = np.asarray(obs, np.float32).reshape(len(obs), graph.obs_dim)
    if graph.fixed_batch == 1:  # a [1, n] graph may reshape to [1, ...]: run it one row at a time
        return np.concatenate([_evaluate(graph, x[i:i + 1]) for i in range(len(x))]) if len(x) else x
    if graph.row_elements is None:
        if len(x) <= 1:
            return _evaluate(graph, x)
        first = _evaluate(graph, x[:1])  # measures the intermediate values one observation needs
        return np.concatenate([first, evaluate(graph, x[1:])])
    rows = max(1, limits.MAX_ACTIVATION_ELEMENTS // max(1, graph.row_elements))
    if len(x) <= rows:
        return _evaluate(graph, x)
    return np.concatenate([_evaluate(graph, x[i:i + rows]) for i in range(0, len(x), rows)])


def _evaluate(graph: Graph, x: np.ndarray) -> np.ndarray:
    env: dict[str, np.ndarray] = dict(graph.consts)
    env[graph.input] = x
    held = 0
    for node in graph.nodes:
        if node.output[0] in graph.consts:  # folded when the graph was read
            continue
        args = [env[n] if n else None for n in node.input]
        out = env[node.output[0]] = _run_node(node, args, graph.what)
        held += int(np.size(out))
        if held > limits.MAX_TOTAL_ELEMENTS:
            raise limits.LimitError(f"{graph.what}: the graph's intermediate results hold over "
                                    f"{limits.MAX_TOTAL_ELEMENTS:,} values (dqnc.limits.MAX_TOTAL_ELEMENTS); "
                                    "this is not a Q-network dqnc can deploy")
    if len(x) == 1 and graph.row_elements is None:
        graph.row_elements = held  # sizes the chunks of later batches
    return np.asarray(env[graph.output], np.float32).reshape(len(x), -1)


def _vector(c: np.ndarray, width: int, what: str, node: Any) -> np.ndarray:
    c = np.asarray(c, np.float64)
    if c.size == 1:
        return np.full(width, float(c.ravel()[0]))
    if c.size == width and (c.ndim == 1 or (c.ndim == 2 and c.shape[0] == 1)):
        return c.ravel()
    raise UnsupportedModelError(f"{what}: {node.op_type} node {node.name or node.output[0]!r} combines the features "
                                f"with a constant of shape {c.shape}; only per-feature constants are supported")


def _per_channel(c: np.ndarray, shape: tuple[int, ...], axis: int, what: str, node: Any) -> np.ndarray:
    """A constant combined with images of per-sample ``shape``: one value, or one per channel
    (channels on ``axis``), as a vector over the channels."""
    c = np.asarray(c, np.float64)
    if c.size == 1:
        return c.ravel()
    full = (1, *shape)
    if c.ndim <= len(full):
        padded = (1,) * (len(full) - c.ndim) + tuple(c.shape)
        if padded[axis + 1] == shape[axis] and all(d == 1 for i, d in enumerate(padded) if i != axis + 1):
            return c.ravel()
    raise UnsupportedModelError(f"{what}: {node.op_type} node {node.name or node.output[0]!r} combines the image with a "
                                f"constant of shape {c.shape}; supported: one value, or one per channel")


@dataclass
class _Chain:
    """What :func:`chain_ops` knows of the observation's tensor at the current node."""

    shape: tuple[int, ...]  # per observation, in the graph's axis order
    layout: str  # "flat", or how the graph reads its images: "CHW" or "HWC" (then transposed to CHW)
    channel_axis: int | None  # the axis of ``shape`` holding channels; None once flat
    convs: int = 0
    transposed: bool = False
    batch_one: bool = False  # a Reshape to [1, n]: the graph runs one observation at a time

    @property
    def width(self) -> int:
        return int(np.prod(self.shape))

    def flat(self, width: int) -> None:
        self.shape, self.channel_axis = (width,), None


@dataclass
class _Step:
    """One node on the observation's chain, as its handler sees it."""

    node: Any
    name: str
    at: dict[str, Any]
    on_stream: list[int]
    chain: _Chain
    what: str
    consts: dict[str, np.ndarray]

    def arg(self, i: int) -> np.ndarray | None:
        return self.consts[self.node.input[i]] if len(self.node.input) > i and self.node.input[i] else None

    def refuse(self, problem: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.what}: {self.node.op_type} {limits.clip(self.name, 80)!r} {problem}")


# A handler returns the dqnc ops for its node and the mapping entry (or None); it updates s.chain.
_Result = tuple[list[Op], dict[str, Any] | None]


def _dense_input(s: _Step, rows: int) -> None:
    if len(s.chain.shape) != 1:
        raise s.refuse(f"reads a {s.chain.shape} image without a Flatten first; supported: Flatten (or a Reshape to "
                       "[batch, -1]) between the last Conv and the first Gemm/MatMul")
    if rows != s.chain.width:
        raise s.refuse(f"takes {rows} features but the previous layer gives {s.chain.width}")


def _gemm(s: _Step) -> _Result:
    if s.on_stream != [0] or s.at.get("transA", 0):
        raise UnsupportedModelError(f"{s.what}: Gemm {s.name!r} multiplies the observation from the right or "
                                    "transposed; only x @ W (+ b) layers are supported")
    w = s.arg(1).astype(np.float64)
    w = (w.T if s.at.get("transB", 0) else w) * float(s.at.get("alpha", 1.0))
    _dense_input(s, w.shape[0])
    c = s.arg(2)
    b = (_vector(c, w.shape[1], s.what, s.node) * float(s.at.get("beta", 1.0))) if c is not None else np.zeros(w.shape[1])
    s.chain.flat(w.shape[1])
    return [Affine(w, b)], {"source": s.name, "op": "Gemm", "shape": list(w.shape), "transB": int(s.at.get("transB", 0))}


def _matmul(s: _Step) -> _Result:
    w = s.arg(1)
    if s.on_stream != [0] or w is None or w.ndim != 2:
        raise UnsupportedModelError(f"{s.what}: MatMul {s.name!r} is not observation @ 2-D constant")
    _dense_input(s, w.shape[0])
    s.chain.flat(w.shape[1])
    return [Affine(w.astype(np.float64), np.zeros(w.shape[1]))], {"source": s.name, "op": "MatMul", "shape": list(w.shape)}


def _elementwise(s: _Step) -> _Result:
    op = s.node.op_type
    if len(s.on_stream) != 1:
        raise UnsupportedModelError(f"{s.what}: {op} {s.name!r} combines the observation with itself")
    const = s.arg(1 - s.on_stream[0])
    if s.chain.channel_axis is None:
        c = _vector(const, s.chain.width, s.what, s.node)
    else:
        c = _per_channel(const, s.chain.shape, s.chain.channel_axis, s.what, s.node)
    n = len(c)
    first = s.on_stream[0] == 0
    if op == "Div" and not first:
        raise UnsupportedModelError(f"{s.what}: Div {s.name!r} divides a constant by the observation")
    if op == "Div" and np.any(c == 0):
        raise UnsupportedModelError(f"{s.what}: Div {s.name!r} divides by zero")
    scale, shift = {
        "Add": lambda: (np.ones(n), c),
        "Sub": lambda: (np.ones(n), -c) if first else (-np.ones(n), c),
        "Mul": lambda: (c, np.zeros(n)),
        "Div": lambda: (1.0 / c, np.zeros(n)),
    }[op]()
    return [ScaleShift(scale, shift)], {"source": s.name, "op": op, "folded": True}


def _activation(s: _Step) -> _Result:
    op = s.node.op_type
    if op == "Elu" and float(s.at.get("alpha", 1.0)) != 1.0:
        raise UnsupportedModelError(f"{s.what}: Elu {s.name!r} has alpha {s.at['alpha']}; only alpha 1 is supported")
    return [Act(_ACTS[op])], {"source": s.name, "op": op}


def _clip(s: _Step) -> _Result:
    lo, hi = s.arg(1), s.arg(2)
    lo = float(lo) if lo is not None else float(s.at.get("min", -np.inf))
    hi = float(hi) if hi is not None else float(s.at.get("max", np.inf))
    if lo == 0.0 and hi == np.inf:
        ops: list[Op] = [Act("relu")]
    elif np.isfinite(lo) and np.isfinite(hi) and lo < hi:
        ops = [Clip(lo, hi)]
    else:
        raise UnsupportedModelError(f"{s.what}: Clip {s.name!r} with one open bound ({lo}, {hi}) is not supported")
    return ops, {"source": s.name, "op": "Clip", "range": [lo, hi]}


def _flatten_chain(s: _Step) -> _Result:
    """The observation's tensor made flat: after convs, torch's CHW order (dqnc permutes the next
    Dense layer's rows); before any conv, the observation as the graph reads it (an MLP)."""
    chain = s.chain
    if len(chain.shape) == 1:
        return [], None
    if chain.convs == 0:
        if chain.transposed:
            raise s.refuse("flattens a transposed input; supported: the NHWC Transpose only in front of a Conv")
        chain.flat(chain.width)
        return [], None
    chain.flat(chain.width)
    return [Flatten("CHW")], {"source": s.name, "op": s.node.op_type, "order": "CHW"}


def _reshape(s: _Step) -> _Result:
    shape = [int(v) for v in np.asarray(s.arg(1)).ravel()]
    width = s.chain.width
    if len(shape) != 2 or shape[0] not in (-1, 0, 1) or shape[1] not in (-1, width) or shape == [-1, -1]:
        raise UnsupportedModelError(f"{s.what}: Reshape {s.name!r} to {limits.clip(shape, 60)} is not a flatten to "
                                    f"[batch, {width}]")
    s.chain.batch_one = s.chain.batch_one or shape[0] == 1
    return _flatten_chain(s)


def _cast(s: _Step) -> _Result:
    if int(s.at.get("to", 0)) != ONNX_FLOAT:
        raise UnsupportedModelError(f"{s.what}: Cast {s.name!r} to ONNX type {s.at.get('to')} is not supported "
                                    "(only a cast to float32, which changes no value)")
    return [], None


def _flatten(s: _Step) -> _Result:
    if s.at.get("axis", 1) != 1:
        raise UnsupportedModelError(f"{s.what}: Flatten {s.name!r} with axis {s.at.get('axis')} is not supported (axis 1 is)")
    return _flatten_chain(s)


def _transpose(s: _Step) -> _Result:
    perm = [int(v) for v in s.at.get("perm", [])]
    chain = s.chain
    if perm != NHWC_TO_NCHW or chain.layout != "HWC" or chain.transposed or chain.convs:
        raise s.refuse(f"with perm {limits.clip(perm, 60)} is not supported; supported: one Transpose "
                       f"{NHWC_TO_NCHW} from an [N, H, W, C] input to the first Conv")
    h, w, c = chain.shape
    chain.shape, chain.channel_axis, chain.transposed = (c, h, w), 0, True
    return [], {"source": s.name, "op": "Transpose", "perm": perm, "folded": "the input is read as HWC images"}


def _ints(value: Any, n: int, default: int) -> list[int]:
    return [int(v) for v in value] if value is not None else [default] * n


def _conv(s: _Step) -> _Result:
    chain, at = s.chain, s.at
    w, b = s.arg(1), s.arg(2)
    if s.on_stream != [0] or w is None or w.ndim != 4:
        raise s.refuse("is not image * 4-D constant kernel; supported: Conv layers with weights in the file")
    if len(chain.shape) != 3 or chain.channel_axis != 0:
        raise s.refuse(f"reads a tensor of shape {chain.shape} that is not an NCHW image; supported: Conv on "
                       "[N, C, H, W] inputs, or [N, H, W, C] inputs after a Transpose [0, 3, 1, 2]")
    o, i, kh, kw = (int(d) for d in w.shape)
    c, h, wd = chain.shape
    strides, pads = _ints(at.get("strides"), 2, 1), _ints(at.get("pads"), 4, 0)
    dilations, group = _ints(at.get("dilations"), 2, 1), int(at.get("group", 1))
    auto_pad = at.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    problems = [p for p, bad in (
        (f"group {group}", group != 1), (f"dilations {dilations}", any(d != 1 for d in dilations)),
        (f"pads {pads}", any(p != 0 for p in pads)), (f"auto_pad {auto_pad}", auto_pad not in ("NOTSET", "VALID")),
        (f"a {kh}x{kw} kernel", kh != kw), (f"strides {strides}", len(strides) != 2 or strides[0] != strides[1]),
        (f"kernel_shape {at.get('kernel_shape')}", list(at.get("kernel_shape", [kh, kw])) != [kh, kw]),
        (f"{i} input channels for a {c}-channel image", i != c)) if bad]
    if problems:
        raise s.refuse(f"has {', '.join(problems)}, which is not supported; supported: Conv with a square kernel, equal "
                       "strides, no padding (pads 0), dilations 1, group 1")
    bias = np.zeros(o) if b is None else np.asarray(b, np.float64)
    if bias.shape != (o,):
        raise s.refuse(f"has a bias of shape {bias.shape} for {o} filters")
    stride = strides[0]
    oh, ow = (h - kh) // stride + 1, (wd - kw) // stride + 1
    if stride < 1 or oh < 1 or ow < 1:
        raise s.refuse(f"with a {kh}x{kw} kernel and stride {stride} leaves no pixels of a {h}x{wd} image")
    chain.shape, chain.convs = (o, oh, ow), chain.convs + 1
    return [Conv(np.asarray(w, np.float32).transpose(2, 3, 1, 0), bias.astype(np.float32), stride)], {
        "source": s.name, "op": "Conv", "shape": [o, i, kh, kw], "stride": stride, "padding": "valid"}


_HANDLERS: dict[str, Callable[[_Step], _Result]] = {
    "Gemm": _gemm, "MatMul": _matmul, "Add": _elementwise, "Sub": _elementwise, "Mul": _elementwise,
    "Div": _elementwise, "Clip": _clip, "Reshape": _reshape, "Cast": _cast, "Flatten": _flatten,
    "Conv": _conv, "Transpose": _transpose, **{op: _activation for op in _ACTS},
}


def _start(graph: Graph) -> _Chain:
    """The chain at the observation: images read CHW (a Conv first) or HWC (a Transpose first) in a
    graph with convolutions, else flat (an MLP reads any input as one vector)."""
    if len(graph.obs_shape) != 3 or not any(n.op_type == "Conv" for n in graph.nodes):
        return _Chain((graph.obs_dim,), "flat", None)
    first = next((n.op_type for n in graph.nodes if n.op_type in ("Conv", "Transpose")), None)
    hwc = first == "Transpose"
    return _Chain(graph.obs_shape, "HWC" if hwc else "CHW", 2 if hwc else 0)


def chain_ops(graph: Graph) -> tuple[list[Op], list[dict[str, Any]], _Chain]:
    """Follow the observation through the graph and return it as dqnc ops (one chain, no branches),
    the mapping, and the chain's end state (its layout). Every intermediate size is checked."""
    what = graph.what
    consts = dict(graph.consts)  # initializers and the constant subgraphs Graph() folded
    stream, chain = graph.input, _start(graph)
    ops: list[Op] = []
    mapping: list[dict[str, Any]] = []
    row_elements = chain.width
    for node in graph.nodes:
        name = node.name or node.output[0]
        if node.output[0] in consts:  # a constant subgraph, folded by Graph()
            continue
        on_stream = [i for i, n in enumerate(node.input) if n == stream]
        others = [n for n in node.input if n and n != stream and n not in consts]
        if not on_stream or others:
            raise UnsupportedModelError(f"{what}: node {limits.clip(name, 80)!r} ({node.op_type}) does not continue the "
                                        "single chain from the observation (the graph branches or merges): only layer "
                                        "chains are supported")
        handler = _HANDLERS.get(node.op_type)
        if handler is not None:  # Identity, Dropout (inference): nothing to do
            new_ops, entry = handler(_Step(node, name, _attrs(node), on_stream, chain, what, consts))
            ops += new_ops
            if entry is not None:
                mapping.append(entry)
        row_elements += limits.check_elements(chain.shape, f"{what}: the result of {node.op_type} node "
                                              f"{limits.clip(name, 80)!r}", limits.MAX_ACTIVATION_ELEMENTS,
                                              "MAX_ACTIVATION_ELEMENTS")
        stream = node.output[0]
    if stream != graph.output:
        raise UnsupportedModelError(f"{what}: the output {graph.output!r} is not the end of the chain from the observation")
    if chain.layout != "flat" and chain.convs == 0 and chain.transposed:
        raise UnsupportedModelError(f"{what}: a Transpose with no Conv after it; supported: the NHWC Transpose in front "
                                    "of the first Conv")
    if chain.convs:
        graph.row_elements = row_elements
    return ops, mapping, chain


def _any_batch(model: Any, graph: Graph) -> Any:
    """A copy of ``model`` whose observation input and Q-value output declare a free batch axis: a
    torch export's fixed batch of 1 then runs batches of states (an Atari net runs about 6x faster
    per state), with the same per-row arithmetic as when states are fed one by one."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for vi in [*(i for i in copy.graph.input if i.name == graph.input), *copy.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    return copy


def _reference(graph: Graph, model: Any, chain: _Chain) -> Callable[[np.ndarray], np.ndarray]:
    """A conv graph's forward by ``onnx.reference.ReferenceEvaluator`` (ONNX's own reading of its
    operators), fed the input's declared dtype, in chunks within ``MAX_ACTIVATION_ELEMENTS`` (one
    observation at a time for a batch-1 graph). Only after :func:`chain_ops` accepted every node
    and checked every intermediate size; the evaluator is third-party code on an untrusted graph,
    so any failure of it is one line."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    what = graph.what
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(graph.input_type))
    except (KeyError, TypeError, ValueError):
        dtype = np.dtype(object)
    if dtype.kind not in "fiu":
        raise UnsupportedModelError(f"{what}: input {limits.clip(graph.input, 80)!r} has ONNX type {graph.input_type}; "
                                    "supported: float or integer (e.g. uint8) images")
    one = chain.batch_one  # a Reshape to [1, n]: one observation a run
    if graph.fixed_batch == 1 and not one:  # nothing in the graph needs the batch of 1 its input declares
        model = _any_batch(model, graph)
    rows = 1 if one else max(1, limits.MAX_ACTIVATION_ELEMENTS // max(1, graph.row_elements or 1))

    def failed(e: Exception) -> ArtifactError:
        return ArtifactError(f"{what}: onnx's ReferenceEvaluator cannot run the graph ({type(e).__name__}: "
                             f"{limits.clip(str(e).splitlines()[0] if str(e) else '', 160)}); the file is damaged: "
                             "re-export it")

    try:
        evaluator = ReferenceEvaluator(model)
    except Exception as e:  # noqa: BLE001 -- see the docstring
        raise failed(e) from None

    def forward(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs)
        if x.size != len(x) * graph.obs_dim:
            raise ArtifactError(f"{what}: the graph reads observations of shape {graph.obs_shape}, not "
                                f"{limits.clip(x.shape[1:], 60)}: use the env it was trained on")
        x = x.reshape(len(x), *graph.obs_shape).astype(dtype)
        out = []
        try:
            for i in range(0, len(x), rows):
                q = evaluator.run([graph.output], {graph.input: x[i:i + rows]})[0]
                out.append(np.asarray(q, np.float32).reshape(len(x[i:i + rows]), -1))
        except Exception as e:  # noqa: BLE001 -- see the docstring
            raise failed(e) from None
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return forward


def load(path: Path, cfg: Any, spec: Any = None) -> Source:
    what = str(path)
    model = read_model(path)
    try:
        graph = Graph(model, what)
        ops, mapping, chain = chain_ops(graph)
        reference = _reference(graph, model, chain) if chain.convs else (lambda obs: evaluate(graph, obs))
        reference(np.zeros((2, graph.obs_dim), np.float32))  # a damaged graph fails here, not mid-check
    except ArtifactError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise ArtifactError(f"{what}: malformed ONNX graph ({type(e).__name__}: {str(e)[:160]}); re-export it") from None
    opset = {o.domain or "ai.onnx": int(o.version) for o in model.opset_import}
    details = {"producer": f"{model.producer_name} {model.producer_version}".strip(), "opset": opset,
               "input": graph.input, "output": graph.output,
               "batch": "fixed 1" if graph.fixed_batch == 1 else "dynamic"}
    if not chain.convs:
        return Source("onnx", graph.obs_dim, ops, mapping, reference=reference, details=details)
    details |= {"architecture": "conv", "conv_input": f"{chain.layout} ({'NHWC' if chain.layout == 'HWC' else 'NCHW'} "
                "graph input)", "reference": "onnx.reference.ReferenceEvaluator"}
    return Source("onnx", graph.obs_dim, ops, mapping, reference=reference, details=details,
                  obs_shape=graph.obs_shape, layout=chain.layout)
