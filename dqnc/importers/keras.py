"""Keras Q-networks: Keras 3 ``.keras``/``.h5``, tf_keras ``.h5`` and SavedModel, Keras 3 ``export()``.

``.keras`` and ``.h5`` files are read with ``zipfile``/``json``/``h5py`` only: the model config
names the layers, the weights file holds their variables, and nothing in the file is
deserialized into Python objects (so no ``Lambda`` bytecode can run, and TensorFlow is not
imported). A tf_keras SavedModel's ``keras_metadata.pb`` is checked against the supported
layers before tf_keras loads it. A Keras 3 ``export()`` SavedModel has no layer config: its
serving graph is read op by op (MatMul / BiasAdd / AddV2 / activations) with the variables'
values from the checkpoint.

Supported layers: InputLayer, Dense (relu / tanh / elu / sigmoid / linear), Activation, ReLU,
ELU, Dropout, Flatten, Identity, and the preprocessing layers Normalization and Rescaling,
which are folded into the next Dense layer.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dqnc.errors import ArtifactError
from dqnc.importers.common import Act, Affine, Op, ScaleShift, Source, UnsupportedModelError, check_activation

SUPPORTED_LAYERS = ("InputLayer", "Dense", "Activation", "ReLU", "ELU", "Dropout", "Flatten", "Identity",
                    "Normalization", "Rescaling")
_NOOP = ("InputLayer", "Dropout", "Flatten", "Identity", "GaussianNoise", "GaussianDropout", "AlphaDropout")
_EPSILON = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(variance), epsilon)
_HDF5 = b"\x89HDF\r\n\x1a\n"
WeightsFn = Callable[[str], list[np.ndarray]]


def _activation_name(value: Any, where: str) -> str:
    if isinstance(value, dict):  # Keras 3 may serialize a built-in activation as a small dict
        value = value.get("config", value.get("class_name"))
    if value is None:
        return "linear"
    return check_activation(str(value), where)


def _inbound(layer: dict[str, Any]) -> list[str]:
    """Names of the layers feeding ``layer`` (Keras 3 and tf_keras config formats)."""
    names: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            hist = x.get("config", {}).get("keras_history") if isinstance(x.get("config"), dict) else None
            if hist:
                names.append(str(hist[0]))
                return
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            if len(x) >= 3 and isinstance(x[0], str) and isinstance(x[1], int):  # tf_keras [name, node, tensor, kw]
                names.append(x[0])
                return
            for v in x:
                walk(v)

    walk(layer.get("inbound_nodes", []))
    return names


def ordered_layers(model_config: dict[str, Any], what: str) -> list[dict[str, Any]]:
    """A Sequential's layers, or a Functional model's layers along its single input->output chain."""
    cls = model_config.get("class_name")
    cfg = model_config.get("config", {})
    layers = cfg.get("layers") if isinstance(cfg, dict) else None
    if cls not in ("Sequential", "Functional", "Model") or not isinstance(layers, list):
        raise UnsupportedModelError(f"{what}: a {cls} model is not supported; supported: Sequential and Functional "
                                    "models that are one chain of layers")
    if cls == "Sequential":
        return layers
    by_name = {l.get("config", {}).get("name", l.get("name")): l for l in layers}
    outputs = cfg.get("output_layers", [])
    out_names = _inbound({"inbound_nodes": [outputs]}) if outputs else []
    if len(out_names) != 1 or len(cfg.get("input_layers", [])) not in (1, 3):
        raise UnsupportedModelError(f"{what}: the model has several inputs or outputs; a Q-network has one of each")
    chain: list[dict[str, Any]] = []
    name: str | None = out_names[0]
    while name is not None:
        layer = by_name.get(name)
        if layer is None:
            raise ArtifactError(f"{what}: the model config names a missing layer {name!r}; the file is damaged")
        chain.append(layer)
        parents = _inbound(layer)
        if len(parents) > 1:
            raise UnsupportedModelError(f"{what}: layer {name!r} ({layer.get('class_name')}) merges {len(parents)} "
                                        "inputs; only chains of layers are supported")
        name = parents[0] if parents else None
        if len(chain) > len(layers):
            raise ArtifactError(f"{what}: the model config has a cycle; the file is damaged")
    return chain[::-1]


def _input_dim(layers: list[dict[str, Any]], model_config: dict[str, Any], first_kernel: np.ndarray | None) -> int:
    for layer in layers:
        c = layer.get("config", {})
        shape = c.get("batch_shape") or c.get("batch_input_shape")
        if shape:
            return int(np.prod([d for d in shape[1:]]))
    if first_kernel is not None:
        return int(first_kernel.shape[0])
    raise UnsupportedModelError("the model records no input shape")


def layer_ops(layers: list[dict[str, Any]], weights: WeightsFn, what: str) -> tuple[list[Op], list[dict[str, Any]], list[dict[str, Any]]]:
    """dqnc ops for Keras layer configs, plus the mapping and the folded preprocessing."""
    ops: list[Op] = []
    mapping: list[dict[str, Any]] = []
    pre: list[dict[str, Any]] = []
    for layer in layers:
        cls = layer.get("class_name")
        c = layer.get("config", {})
        name = c.get("name", cls)
        where = f"{what}: layer {name!r}"
        if cls in _NOOP:
            if cls == "Flatten" and mapping:
                pass  # features are already flat in a Dense chain
            continue
        if cls == "Dense":
            w = weights(name)
            if not w or w[0].ndim != 2:
                raise ArtifactError(f"{where}: Dense weights missing or malformed in the file")
            kernel = w[0].astype(np.float32)
            bias = w[1].astype(np.float32) if c.get("use_bias", True) and len(w) > 1 else np.zeros(kernel.shape[1], np.float32)
            ops.append(Affine(kernel, bias))
            act = _activation_name(c.get("activation"), where)
            if act != "linear":
                ops.append(Act(act))
            mapping.append({"source": name, "layer": "Dense", "shape": list(kernel.shape), "activation": act})
        elif cls == "Activation":
            ops.append(Act(_activation_name(c.get("activation"), where)))
        elif cls == "ReLU":
            if c.get("max_value") is not None or float(c.get("negative_slope", 0) or 0) != 0 or float(c.get("threshold", 0) or 0) != 0:
                raise UnsupportedModelError(f"{where}: ReLU with max_value/negative_slope/threshold is not supported")
            ops.append(Act("relu"))
        elif cls == "ELU":
            if float(c.get("alpha", 1.0)) != 1.0:
                raise UnsupportedModelError(f"{where}: ELU alpha {c.get('alpha')} is not supported (alpha 1 is)")
            ops.append(Act("elu"))
        elif cls == "Normalization":
            axis = c.get("axis", -1)
            if axis not in (-1, [-1], (-1,), None) and not (isinstance(axis, list) and len(axis) == 1):
                raise UnsupportedModelError(f"{where}: Normalization over axis {axis} is not supported (the last axis is)")
            if c.get("mean") is not None and c.get("variance") is not None:
                mean, var = np.asarray(c["mean"], np.float64), np.asarray(c["variance"], np.float64)
            else:
                w = weights(name)
                if len(w) < 2:
                    raise ArtifactError(f"{where}: Normalization statistics are missing (the layer was never adapted)")
                mean, var = w[0].astype(np.float64), w[1].astype(np.float64)
            std = np.maximum(np.sqrt(var.ravel()), _EPSILON)
            if c.get("invert"):
                ops.append(ScaleShift(std, mean.ravel()))
            else:
                ops.append(ScaleShift(1.0 / std, -mean.ravel() / std))
            pre.append({"kind": "Normalization", "layer": name, "invert": bool(c.get("invert")),
                        "folded": "into the next Dense layer"})
        elif cls == "Rescaling":
            scale, offset = c.get("scale", 1.0), c.get("offset", 0.0)
            if isinstance(scale, dict) or isinstance(offset, dict):
                raise UnsupportedModelError(f"{where}: Rescaling with tensor-valued scale/offset is not supported")
            ops.append(ScaleShift(np.asarray(scale, np.float64).ravel(), np.asarray(offset, np.float64).ravel()))
            pre.append({"kind": "Rescaling", "layer": name, "scale": scale, "offset": offset,
                        "folded": "into the next Dense layer"})
        else:
            raise UnsupportedModelError(f"{where} is a {cls}, which is not supported; supported layers: "
                                        f"{', '.join(SUPPORTED_LAYERS)}")
    return ops, mapping, pre


def _source(fmt: str, what: str, model_config: dict[str, Any], weights: WeightsFn, details: dict[str, Any]) -> Source:
    layers = ordered_layers(model_config, what)
    ops, mapping, pre = layer_ops(layers, weights, what)
    first = next((op.w for op in ops if isinstance(op, Affine)), None)
    if first is None:
        raise UnsupportedModelError(f"{what}: the model has no Dense layer")
    obs_dim = _input_dim(layers, model_config, first)
    return Source(fmt, obs_dim, ops, mapping, pre, details)


# --- .keras (Keras 3) --------------------------------------------------------------------------

def _h5_file(data: bytes, what: str) -> Any:
    import h5py

    try:
        return h5py.File(io.BytesIO(data), "r")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{what}: the weights are not a readable HDF5 file ({str(e)[:120]}); the file is damaged") from None


def _keras3_weights(h5: Any, what: str) -> WeightsFn:
    """Layer name -> its variables in a Keras 3 ``model.weights.h5`` (``layers/KEY/vars/0..n``)."""
    by_name: dict[str, Any] = {}
    root = h5.get("layers") or h5.get("_layer_checkpoint_dependencies") or {}
    for key in root:
        vars_ = root[key].get("vars") if hasattr(root[key], "get") else None
        if vars_ is None:
            continue
        name = vars_.attrs.get("name", key)
        by_name[name.decode() if isinstance(name, bytes) else str(name)] = vars_
        by_name.setdefault(str(key), vars_)

    def get(name: str) -> list[np.ndarray]:
        g = by_name.get(name)
        if g is None:
            return []
        return [np.asarray(g[str(i)]) for i in range(len(g)) if str(i) in g]

    return get


def load_keras_zip(path: Path) -> Source:
    what = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json"))
            meta = json.loads(zf.read("metadata.json")) if "metadata.json" in zf.namelist() else {}
            weights_raw = zf.read("model.weights.h5")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError, NotImplementedError) as e:
        raise ArtifactError(f"{what}: damaged .keras file ({type(e).__name__}: {str(e)[:160]}); re-save the model") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{what}: config.json is not a JSON object; the file is damaged")
    with _h5_file(weights_raw, what) as h5:
        return _source("keras", what, config, _keras3_weights(h5, what),
                       {"container": ".keras", "keras_version": meta.get("keras_version")})


# --- legacy .h5 (tf_keras, or Keras 3's model.save("x.h5")) -------------------------------------

def load_h5(path: Path) -> Source:
    import h5py

    what = str(path)
    try:
        h5 = h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{what}: not a readable HDF5 file ({str(e)[:120]}); re-save the model") from None
    with h5:
        raw = h5.attrs.get("model_config")
        if raw is None:
            raise UnsupportedModelError(f"{what}: an HDF5 file without a model config (weights only?); save the whole "
                                        "model (model.save) rather than save_weights")
        try:
            config = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        except ValueError as e:
            raise ArtifactError(f"{what}: the model config is not valid JSON ({e}); the file is damaged") from None
        group = h5["model_weights"] if "model_weights" in h5 else h5

        def weights(name: str) -> list[np.ndarray]:
            if name not in group:
                return []
            g = group[name]
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in g.attrs.get("weight_names", [])]
            return [np.asarray(g[n]) for n in names]

        version = h5.attrs.get("keras_version")
        version = version.decode() if isinstance(version, bytes) else version
        return _source("keras", what, config, weights, {"container": ".h5", "keras_version": version})


# --- SavedModel ---------------------------------------------------------------------------------

def _tf_keras_metadata(path: Path) -> dict[str, Any] | None:
    meta = path / "keras_metadata.pb"
    if not meta.is_file():
        return None
    from dqnc.keras import keras

    keras()
    from tf_keras.protobuf import saved_metadata_pb2

    proto = saved_metadata_pb2.SavedMetadata()
    try:
        proto.ParseFromString(meta.read_bytes())
        root = next(n for n in proto.nodes if n.node_path == "root")
        return json.loads(root.metadata)
    except (StopIteration, ValueError, Exception) as e:  # protobuf raises its own DecodeError
        raise ArtifactError(f"{str(path)!r}: unreadable keras_metadata.pb ({type(e).__name__}); re-save the model") from None


def _untuple(x: Any) -> Any:
    """tf_keras SavedModel metadata spells tuples as ``{"class_name": "__tuple__", "items": [...]}``."""
    if isinstance(x, dict):
        if x.get("class_name") == "__tuple__" and "items" in x:
            return [_untuple(v) for v in x["items"]]
        return {k: _untuple(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_untuple(v) for v in x]
    return x


def load_tf_keras_savedmodel(path: Path, metadata: dict[str, Any]) -> Source:
    """A tf_keras SavedModel: layer classes checked from its metadata first, then loaded by tf_keras."""
    what = str(path)
    metadata = _untuple(metadata)
    config = {"class_name": metadata.get("class_name"), "config": metadata.get("config")}
    layers = ordered_layers(config, what)
    for layer in layers:  # refuse before tf_keras revives anything
        if layer.get("class_name") not in SUPPORTED_LAYERS and layer.get("class_name") not in _NOOP:
            name = layer.get("config", {}).get("name")
            raise UnsupportedModelError(f"{what}: layer {name!r} is a {layer.get('class_name')}, which is not supported; "
                                        f"supported layers: {', '.join(SUPPORTED_LAYERS)}")
    from dqnc.policy import load_keras_model

    model = load_keras_model(path)

    def weights(name: str) -> list[np.ndarray]:
        try:
            return [np.asarray(w) for w in model.get_layer(name).get_weights()]
        except ValueError:
            return []

    return _source("keras", what, config, weights, {"container": "tf_keras SavedModel"})


_GRAPH_ACTS = {"Relu": "relu", "Tanh": "tanh", "Elu": "elu", "Sigmoid": "sigmoid"}


def load_exported_savedmodel(path: Path) -> Source:
    """A Keras 3 ``model.export()`` SavedModel: its serving graph, read op by op."""
    from dqnc.keras import tf

    t = tf()
    what = str(path)
    try:
        loaded = t.saved_model.load(str(path))
        fn = loaded.signatures["serving_default"]
    except (KeyError, ValueError, OSError, t.errors.OpError) as e:
        raise ArtifactError(f"{what}: cannot read the SavedModel's serving signature ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); export it with model.export()") from None
    specs = [s for s in fn.structured_input_signature[1].values()]
    if len(specs) != 1 or len(fn.structured_outputs) != 1:
        raise UnsupportedModelError(f"{what}: the serving signature has {len(specs)} inputs and "
                                    f"{len(fn.structured_outputs)} outputs; a Q-network has one of each")
    obs_dim = int(np.prod(specs[0].shape[1:]))
    ops, mapping = _graph_chain(fn, loaded, what)
    if not ops:
        raise UnsupportedModelError(f"{what}: no Dense layers found in the serving graph")

    def reference(obs: np.ndarray) -> np.ndarray:
        out = fn(t.constant(np.asarray(obs, np.float32).reshape(len(obs), obs_dim)))
        return np.asarray(next(iter(out.values())))

    return Source("keras", obs_dim, ops, mapping, details={"container": "Keras 3 export() SavedModel"},
                  reference=reference)


def _graph_chain(fn: Any, loaded: Any, what: str) -> tuple[list[Op], list[dict[str, Any]]]:
    """Walk the serving function's innermost graph: MatMul/BiasAdd/Add with variables, activations."""
    from tensorflow.python.framework import tensor_util

    graph_def = fn.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    by_capture: dict[str, np.ndarray] = {}
    captured = {id(h): v for v in loaded.variables for h in [v.handle]}
    # Map captured placeholders of the outer graph to variable values.
    for ext, internal in fn.graph.captures:
        v = captured.get(id(ext))
        if v is not None:
            by_capture[internal.op.name] = v.numpy()
    # The body is the function called by the outer graph's (Stateful)PartitionedCall.
    calls = [n for n in graph_def.node if n.op in ("StatefulPartitionedCall", "PartitionedCall")]
    if len(calls) != 1:
        raise UnsupportedModelError(f"{what}: the serving graph is not one call of the model function")
    call = calls[0]
    body = library.get(call.attr["f"].func.name)
    while body is not None:
        inner = [n for n in body.node_def if n.op in ("StatefulPartitionedCall", "PartitionedCall")]
        if len(inner) != 1 or len(body.node_def) > 4:
            break
        body = library.get(inner[0].attr["f"].func.name)
    if body is None:
        raise UnsupportedModelError(f"{what}: the serving function body is missing")
    # Function args follow the call's inputs: arg i <- call.input[i] (outer placeholders).
    arg_names = [a.name for a in body.signature.input_arg]
    arg_value: dict[str, np.ndarray] = {}
    for i, inp in enumerate(call.input):
        src = inp.split(":")[0].lstrip("^")
        if i < len(arg_names) and src in by_capture:
            arg_value[arg_names[i]] = by_capture[src]
    nodes = {n.name: n for n in body.node_def}

    def const_of(ref: str) -> np.ndarray | None:
        name = ref.split(":")[0].lstrip("^")
        if name in arg_value:
            return arg_value[name]
        n = nodes.get(name)
        if n is None:
            return None
        if n.op == "ReadVariableOp":
            return const_of(n.input[0])
        if n.op == "Identity":
            return const_of(n.input[0])
        if n.op == "Const":
            return tensor_util.MakeNdarray(n.attr["value"].tensor)
        return None

    ops: list[Op] = []
    mapping: list[dict[str, Any]] = []
    allowed = {"MatMul", "BiasAdd", "AddV2", "Add", "ReadVariableOp", "Identity", "Const", "NoOp", "Relu", "Tanh",
               "Elu", "Sigmoid", "Reshape", "Cast"}
    for n in body.node_def:  # node_def is in topological order for Keras-exported functions
        if n.op not in allowed:
            raise UnsupportedModelError(f"{what}: graph op {n.op!r} ({n.name}) is not supported in an exported "
                                        "SavedModel; supported: MatMul, BiasAdd, AddV2, Relu, Tanh, Elu, Sigmoid")
        if n.op == "MatMul":
            w = const_of(n.input[1])
            if w is None or n.attr["transpose_a"].b or n.attr["transpose_b"].b:
                raise UnsupportedModelError(f"{what}: MatMul {n.name} is not x @ kernel")
            ops.append(Affine(w.astype(np.float32), np.zeros(w.shape[1], np.float32)))
            mapping.append({"source": n.name, "op": "MatMul", "shape": list(w.shape)})
        elif n.op in ("BiasAdd", "AddV2", "Add"):
            b = const_of(n.input[1])
            if b is None or not ops or not isinstance(ops[-1], Affine):
                raise UnsupportedModelError(f"{what}: {n.op} {n.name} is not a bias after a MatMul")
            ops[-1] = Affine(ops[-1].w, ops[-1].b + b.astype(np.float32))
        elif n.op in _GRAPH_ACTS:
            ops.append(Act(_GRAPH_ACTS[n.op]))
    return ops, mapping


def load(path: Path, cfg: Any) -> Source:
    if path.is_dir():
        metadata = _tf_keras_metadata(path)
        if metadata is not None:
            return load_tf_keras_savedmodel(path, metadata)
        return load_exported_savedmodel(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ArtifactError(f"cannot read {str(path)!r}: {e.strerror}") from None
    if head.startswith(_HDF5):
        return load_h5(path)
    if head.startswith(b"PK"):
        return load_keras_zip(path)
    raise ArtifactError(f"{str(path)!r}: neither a .keras zip nor an HDF5 file (truncated or damaged?); re-save the model")
