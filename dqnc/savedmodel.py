"""Read a SavedModel as data: no code stored in the directory ever runs.

``tf_keras.models.load_model`` revives whatever a SavedModel holds: a ``Lambda`` layer's
marshalled bytecode, custom classes, and the resource initializers of its restore graph
(``tf.saved_model.load`` runs those too). A dqnc artifact's checksums prove nothing against an
attacker who recomputes them, so dqnc never calls either on any directory. Instead:

- a tf_keras SavedModel (one with ``keras_metadata.pb``): the model config is parsed from the
  metadata protobuf, every layer (also inside nested models) is checked against
  :data:`SAFE_LAYERS` and every activation / initializer / regularizer / constraint against the
  built-in names, the config is rebuilt into a clean one (no ``module`` keys, no nested objects
  but those), tf_keras builds the model from it without custom objects, and the variables are
  restored from ``variables/variables`` as tensors, after their declared shapes were checked
  against :mod:`dqnc.limits`. See :func:`load_keras_model`.
- a SavedModel without Keras metadata (Keras 3 ``export()``, ``tf.saved_model.save``):
  ``saved_model.pb`` is parsed as a protobuf, the serving signature's function is walked op by
  op (MatMul / BiasAdd / Add / activations) without being executed, and the captured variables'
  values are read from the checkpoint through the object graph. See :func:`read_exported`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import limits
from dqnc.errors import ArtifactError
from dqnc.importers.common import Act, Affine, Op, ScaleShift, UnsupportedModelError

# Built-in layers dqnc's own models use (nets.py, nets_conv.py: InputLayer, Dense, Conv2D, Flatten,
# Permute) and those the Keras importer folds; none of them holds code.
SAFE_LAYERS = ("InputLayer", "Dense", "Conv2D", "Flatten", "Permute", "Activation", "ReLU", "ELU", "Dropout",
               "Identity", "Normalization", "Rescaling", "GaussianNoise", "GaussianDropout", "AlphaDropout")
MODELS = ("Sequential", "Functional", "Model")
# Layers whose config carries code (marshalled bytecode or a TF op looked up by name).
CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")
# tf_keras.activations by name: looked up in tf_keras, nothing taken from the file.
ACTIVATIONS = ("linear", "relu", "tanh", "elu", "sigmoid", "softmax", "softplus", "softsign", "selu", "exponential",
               "hard_sigmoid", "gelu", "swish", "silu", "relu6", "mish")
_OBJECTS = {  # config key suffix -> the built-in classes it may name
    "_initializer": ("GlorotUniform", "GlorotNormal", "HeNormal", "HeUniform", "LecunNormal", "LecunUniform",
                     "Zeros", "Ones", "Constant", "RandomNormal", "RandomUniform", "TruncatedNormal",
                     "VarianceScaling", "Orthogonal", "Identity"),
    "_regularizer": ("L1", "L2", "L1L2", "OrthogonalRegularizer"),
    "_constraint": ("MaxNorm", "NonNeg", "UnitNorm", "MinMaxNorm", "RadialConstraint"),
}
MAX_PROTO_BYTES = limits.MAX_JSON_BYTES  # keras_metadata.pb / saved_model.pb of a Q-network are KBs
MAX_CALL_DEPTH = 16  # functions calling functions in a serving graph
_VALUE = ".ATTRIBUTES/VARIABLE_VALUE"


def _supported() -> str:
    return ", ".join(SAFE_LAYERS)


# --- tf_keras SavedModel: metadata -> checked config -------------------------------------------

def _read_proto_file(path: Path, what: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_PROTO_BYTES:
            raise limits.LimitError(f"{what}: {path.name} is {size:,} bytes, over dqnc's limit of "
                                    f"{MAX_PROTO_BYTES:,} (dqnc.limits)")
        return path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{what}: cannot read {path.name} ({e.strerror}); re-save the model") from None


def read_keras_metadata(path: Path) -> dict[str, Any] | None:
    """The root object's JSON metadata from ``keras_metadata.pb`` (tuples decoded), or None without one."""
    meta = path / "keras_metadata.pb"
    if not meta.is_file():
        return None
    what = str(path)
    raw = _read_proto_file(meta, what)
    from dqnc.keras import keras

    keras()
    from tf_keras.protobuf import saved_metadata_pb2

    proto = saved_metadata_pb2.SavedMetadata()
    try:
        proto.ParseFromString(raw)
        root = next(n for n in proto.nodes if n.node_path == "root")
        text = root.metadata
    except Exception as e:  # protobuf's DecodeError (incl. nesting), StopIteration
        raise ArtifactError(f"{what}: unreadable keras_metadata.pb ({type(e).__name__}); re-save the model") from None
    try:
        data = limits.loads_json(text, f"{what}: keras_metadata.pb")
    except ValueError as e:
        raise ArtifactError(f"{what}: keras_metadata.pb holds invalid JSON ({str(e)[:120]}); re-save the model") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{what}: keras_metadata.pb does not describe a model; re-save the model")
    return data


def _decode(x: Any, tuples: bool) -> Any:
    """tf_keras metadata JSON -> plain values: ``__tuple__`` and ``TensorShape`` become tuples (or lists)."""
    if isinstance(x, dict):
        if x.get("class_name") in ("__tuple__", "TensorShape") and "items" in x:
            items = [_decode(v, tuples) for v in x["items"] or []]
            return tuple(items) if tuples else items
        return {k: _decode(v, tuples) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v, tuples) for v in x]
    return x


def _plain(value: Any, where: str) -> Any:
    """A config value made of numbers, strings, None and lists only (no objects to deserialize)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, where) for v in value)
    raise UnsupportedModelError(f"{where} holds a serialized object ({limits.clip(value, 80)}), which dqnc will not "
                                "load; re-save the model with built-in layers and settings")


def _clean_layer_config(cls: str, config: dict[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "activation":
            if not isinstance(value, str) or value not in ACTIVATIONS:
                raise UnsupportedModelError(f"{where}: activation {limits.clip(value, 80)} is not a built-in activation "
                                            f"name, which dqnc will not load (it could run code stored in the file); "
                                            f"supported: {', '.join(ACTIVATIONS)}")
            out[key] = value
        elif key == "dtype" and isinstance(value, dict):
            name = value.get("config", {}).get("name") if isinstance(value.get("config"), dict) else None
            if value.get("class_name") not in ("Policy", "DTypePolicy") or not isinstance(name, str):
                raise UnsupportedModelError(f"{where}: dtype {limits.clip(value, 80)} is not a dtype policy dqnc reads")
            out[key] = name
        elif isinstance(value, dict):
            suffix = next((s for s in _OBJECTS if key.endswith(s)), None)
            obj_cls = value.get("class_name")
            if suffix is None or obj_cls not in _OBJECTS[suffix] or not isinstance(value.get("config", {}), dict):
                raise UnsupportedModelError(f"{where}: {key} is a {limits.clip(obj_cls, 60)}, which dqnc will not load "
                                            "(only built-in initializers, regularizers and constraints are read)")
            out[key] = {"class_name": obj_cls, "config": {k: _plain(v, f"{where}: {key}")
                                                          for k, v in value.get("config", {}).items()}}
        else:
            out[key] = _plain(value, f"{where}: {key}")
    return out


def _inbound(value: Any, where: str) -> Any:
    """Functional ``inbound_nodes``: lists of [layer name, node index, tensor index, kwargs]."""
    if isinstance(value, dict):
        if any(isinstance(v, dict) for v in value.values()):
            raise UnsupportedModelError(f"{where}: call arguments hold objects, which dqnc will not load")
        return {k: _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_inbound(v, where) for v in value)
    return _plain(value, where)


def check_model_config(model: Any, what: str, *, tuples: bool = True) -> dict[str, Any]:
    """A clean copy of a Sequential/Functional config in which every layer is a built-in in
    :data:`SAFE_LAYERS` (nested models checked too); anything else is refused by name."""
    if not isinstance(model, dict):
        raise ArtifactError(f"{what}: the model config is not an object; the file is damaged")
    cls = model.get("class_name")
    config = model.get("config")
    if cls not in MODELS or not isinstance(config, dict) or not isinstance(config.get("layers"), list):
        raise UnsupportedModelError(f"{what}: a {limits.clip(cls, 60)} model is not supported; supported: Sequential "
                                    f"and Functional models of the layers {_supported()}")
    layers = []
    for layer in config["layers"]:
        if not isinstance(layer, dict) or not isinstance(layer.get("config"), dict):
            raise ArtifactError(f"{what}: a layer entry of the model config is malformed; the file is damaged")
        lcls = layer.get("class_name")
        name = layer["config"].get("name", layer.get("name"))
        where = f"{what}: layer {limits.clip(name, 60)!r}"
        if lcls in MODELS:
            inner = check_model_config({"class_name": lcls, "config": layer["config"]}, f"{what}: model {name!r}",
                                       tuples=tuples)
            entry = {"class_name": lcls, "config": inner["config"]}
        elif lcls in SAFE_LAYERS:
            entry = {"class_name": lcls, "config": _clean_layer_config(lcls, layer["config"], where)}
        elif lcls in CODE_LAYERS:
            raise UnsupportedModelError(f"{where} is a {lcls}, which dqnc will not load: it would run code stored in "
                                        f"the file; supported layers: {_supported()}")
        else:
            raise UnsupportedModelError(f"{where} is a {limits.clip(lcls, 60)}, which dqnc will not load (not a "
                                        f"built-in layer dqnc supports); supported layers: {_supported()}")
        if "name" in layer:
            entry["name"] = _plain(layer["name"], where)
        if "inbound_nodes" in layer:
            entry["inbound_nodes"] = _inbound(layer["inbound_nodes"], where)
        layers.append(entry)
    out: dict[str, Any] = {"name": _plain(config.get("name"), what), "layers": layers}
    for key in ("input_layers", "output_layers", "build_input_shape"):
        if key in config:
            out[key] = _plain(config[key], f"{what}: {key}")
    return {"class_name": cls, "config": out}


def keras_config(path: Path, metadata: dict[str, Any] | None = None, *, tuples: bool = False) -> dict[str, Any]:
    """The checked model config of a tf_keras SavedModel (``tuples=False``: tuples as lists)."""
    what = str(path)
    metadata = metadata if metadata is not None else read_keras_metadata(path)
    if metadata is None:
        raise UnsupportedModelError(f"{what}: a SavedModel without keras_metadata.pb is not a tf_keras model; "
                                    "import it with `dqnc import` (it is read as an exported serving graph)")
    meta = _decode(metadata, tuples)
    config = check_model_config({"class_name": meta.get("class_name"), "config": meta.get("config")}, what,
                                tuples=tuples)
    shape = meta.get("build_input_shape")
    if shape is not None and "build_input_shape" not in config["config"]:
        config["build_input_shape"] = _plain(shape, f"{what}: build_input_shape")
    return config


# --- checkpoints -------------------------------------------------------------------------------

def _reader(path: Path) -> Any:
    from dqnc.keras import tf

    t = tf()
    prefix = path / "variables" / "variables"
    if not Path(f"{prefix}.index").is_file():
        raise ArtifactError(f"{str(path)!r}: the SavedModel has no variables/variables.index; the model is incomplete")
    try:
        return t.train.load_checkpoint(str(prefix))
    except (t.errors.OpError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{str(path)!r}: unreadable variables checkpoint ({_first(e)}); re-save the model") from None


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return limits.clip(text.splitlines()[0] if text else type(e).__name__, 200)


_NUMERIC = ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")


def check_checkpoint(reader: Any, what: str) -> dict[str, list[int]]:
    """Every tensor the checkpoint declares, within dqnc's element limits (nothing read yet)."""
    shapes = reader.get_variable_to_shape_map()
    budget = limits.Budget(f"{what}: variables checkpoint")
    for key in sorted(shapes):
        budget.take(shapes[key], limits.clip(key, 80))
    return shapes


def _object_graph(reader: Any, what: str) -> Any:
    from dqnc.keras import tf

    tf()
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    try:
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except Exception as e:
        raise ArtifactError(f"{what}: the variables checkpoint has no readable object graph ({type(e).__name__}); "
                            "re-save the model") from None
    return graph


def _read_tensor(reader: Any, key: str, shapes: dict[str, list[int]], what: str) -> np.ndarray:
    if key not in shapes:
        raise ArtifactError(f"{what}: variable {key!r} is missing from the checkpoint; the model is incomplete")
    dtype = reader.get_variable_to_dtype_map()[key]
    if dtype.name not in _NUMERIC:
        raise UnsupportedModelError(f"{what}: variable {key!r} is {dtype.name}; a Q-network's variables are numbers")
    try:
        value = np.asarray(reader.get_tensor(key))
    except Exception as e:
        raise ArtifactError(f"{what}: variable {key!r} cannot be read ({_first(e)}); the checkpoint is damaged") from None
    if list(value.shape) != list(shapes[key]):
        raise ArtifactError(f"{what}: variable {key!r} has shape {value.shape}, not the declared {shapes[key]}")
    return value


# --- tf_keras SavedModel -> model --------------------------------------------------------------

def load_keras_model(path: Path) -> Any:
    """A tf_keras SavedModel as a tf_keras model, built from its checked config and given its
    weights from the checkpoint: no layer, function or initializer stored in the directory runs."""
    from dqnc.keras import keras, tf

    what = str(path)
    path = Path(path)
    if not path.is_dir() or not (path / "saved_model.pb").is_file():
        raise ArtifactError(f"{what!r} is not a SavedModel directory (no saved_model.pb); re-save the model")
    config = keras_config(path, tuples=True)
    reader = _reader(path)
    shapes = check_checkpoint(reader, what)
    k, t = keras(), tf()
    budget = limits.Budget(f"{what}: model config")

    def check_size(next_creator: Any, **kw: Any) -> Any:
        """Every variable the config asks for, refused before it is allocated (units=10**9 is one number)."""
        shape = kw.get("shape")
        if shape is not None:
            dims = t.TensorShape(shape)
            if dims.rank is not None and dims.is_fully_defined():
                budget.take(dims.as_list(), str(kw.get("name") or ""))
        return next_creator(**kw)

    try:
        with t.variable_creator_scope(check_size):
            model = k.models.model_from_config({"class_name": config["class_name"], "config": config["config"]},
                                               custom_objects={})
            if not model.built and config.get("build_input_shape") is not None:
                model.build(tuple(config["build_input_shape"]))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, NotImplementedError,
            OverflowError, t.errors.OpError) as e:
        raise ArtifactError(f"{what}: the model config cannot be built ({_first(e)}); re-save the model") from None
    _restore(model, reader, shapes, path)
    for layer in _all_layers(model):  # what load_model does after restoring (Normalization's mean/std)
        layer.finalize_state()
    return model


def _all_layers(model: Any) -> Iterator[Any]:
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)
        yield layer


def _restore(model: Any, reader: Any, shapes: dict[str, list[int]], path: Path) -> None:
    """Restore every variable of ``model`` from the SavedModel's checkpoint (declared shapes checked)."""
    from dqnc.keras import tf

    t = tf()
    what = str(path)
    if not model.weights:
        return
    want = {}
    for key, ref in _keras_variable_keys(model, _object_graph(reader, what), what):
        want[key] = ref
    missing = [v.name for v in model.weights if not any(v is r for r in want.values())]
    if missing:
        raise ArtifactError(f"{what}: the checkpoint holds no value for {', '.join(missing[:4])}; the model is "
                            "incomplete or its config does not match its variables")
    for key, var in want.items():
        declared = shapes.get(key)
        if declared is None:
            raise ArtifactError(f"{what}: variable {var.name} ({key}) is missing from the checkpoint; the model is incomplete")
        if tuple(declared) != tuple(var.shape):
            raise ArtifactError(f"{what}: variable {var.name} is {tuple(declared)} in the checkpoint but "
                                f"{tuple(var.shape)} in the model config; the file is damaged")
    for key, var in want.items():
        value = _read_tensor(reader, key, shapes, what)
        try:
            var.assign(value.astype(var.dtype.as_numpy_dtype))
        except (ValueError, t.errors.OpError) as e:
            raise ArtifactError(f"{what}: variable {var.name} cannot be restored ({_first(e)})") from None


def _keras_variable_keys(model: Any, graph: Any, what: str) -> Iterator[tuple[str, Any]]:
    """(checkpoint key, model variable) pairs, matched by walking the model's trackable children
    alongside the checkpoint's object graph (as ``tf.train.Checkpoint`` restores)."""
    from dqnc.keras import tf

    tf()
    from tensorflow.python.trackable import base as trackable_base

    nodes = graph.nodes
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(model, 0)]
    while stack:
        obj, node_id = stack.pop()
        if node_id in seen or node_id >= len(nodes):
            continue
        seen.add(node_id)
        node = nodes[node_id]
        if _is_variable(obj):
            key = next((a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"), None)
            if key is None:
                raise ArtifactError(f"{what}: the checkpoint's object for {obj.name} holds no value")
            yield key, obj
            continue
        if not isinstance(obj, trackable_base.Trackable):
            continue
        try:
            children = obj._trackable_children(save_type="checkpoint")  # noqa: SLF001 (what Checkpoint walks)
        except TypeError:
            children = obj._trackable_children()  # noqa: SLF001
        for ref in node.children:
            child = children.get(ref.local_name)
            if child is not None:
                stack.append((child, ref.node_id))


def _is_variable(obj: Any) -> bool:
    from dqnc.keras import tf

    return isinstance(obj, tf().Variable)


# --- SavedModel without Keras metadata: the serving graph as data ------------------------------

_GRAPH_ACTS = {"Relu": "relu", "Tanh": "tanh", "Elu": "elu", "Sigmoid": "sigmoid"}
_CALLS = ("StatefulPartitionedCall", "PartitionedCall")
_PASS = ("Identity", "StopGradient", "Snapshot")
GRAPH_OPS = ("MatMul", "BiasAdd", "AddV2", "Add", "ReadVariableOp", "Identity", "StopGradient", "Snapshot", "Const",
             "NoOp", "Relu", "Tanh", "Elu", "Sigmoid", "Reshape", "Cast", *_CALLS)


@dataclass
class Exported:
    """The serving graph of a SavedModel, as dqnc ops on a flat observation."""

    obs_dim: int
    ops: list[Op]
    mapping: list[dict[str, Any]] = field(default_factory=list)
    signature: str = "serving_default"


@dataclass
class _Chain:
    """A value computed from the observation: the ops applied so far."""

    ops: list[Op]


class _Graph:
    def __init__(self, path: Path) -> None:
        from dqnc.keras import tf

        t = tf()
        from tensorflow.core.protobuf import saved_model_pb2

        self.path, self.what, self.t = path, str(path), t
        raw = _read_proto_file(path / "saved_model.pb", self.what)
        sm = saved_model_pb2.SavedModel()
        try:
            sm.ParseFromString(raw)
        except Exception as e:  # DecodeError, nesting too deep
            raise ArtifactError(f"{self.what}: unreadable saved_model.pb ({type(e).__name__}); re-export the model") from None
        graphs = [m for m in sm.meta_graphs if "serve" in m.meta_info_def.tags] or list(sm.meta_graphs)
        if not graphs:
            raise ArtifactError(f"{self.what}: saved_model.pb holds no graph; re-export the model")
        self.meta = graphs[0]
        self.library = {f.signature.name: f for f in self.meta.graph_def.library.function}
        self.graph_nodes = {n.name: n for n in self.meta.graph_def.node}
        self.mapping: list[dict[str, Any]] = []
        self._reader: Any = None
        self._shapes: dict[str, list[int]] = {}
        self._ckpt_ids: dict[int, int] | None = None
        self._ckpt_graph: Any = None

    # checkpoint values of captured objects ------------------------------------------------------
    def reader(self) -> Any:
        if self._reader is None:
            self._reader = _reader(self.path)
            self._shapes = check_checkpoint(self._reader, self.what)
        return self._reader

    def checkpoint_graph(self) -> Any:
        if self._ckpt_graph is None:
            self._ckpt_graph = _object_graph(self.reader(), self.what)
        return self._ckpt_graph

    def checkpoint_ids(self) -> dict[int, int]:
        """SavedObjectGraph node id -> checkpoint object-graph node id, matched by child names from the root."""
        if self._ckpt_ids is None:
            saved = self.meta.object_graph_def.nodes
            ckpt = self.checkpoint_graph().nodes
            ids: dict[int, int] = {0: 0}
            stack = [(0, 0)]
            while stack:
                s, c = stack.pop()
                kids = {ref.local_name: ref.node_id for ref in ckpt[c].children} if c < len(ckpt) else {}
                for ref in saved[s].children if s < len(saved) else []:
                    cid = kids.get(ref.local_name)
                    if cid is not None and ref.node_id not in ids:
                        ids[ref.node_id] = cid
                        stack.append((ref.node_id, cid))
            self._ckpt_ids = ids
        return self._ckpt_ids

    def captured(self, node_id: int) -> Any:
        """The value of a concrete function's bound input: a variable (from the checkpoint) or a constant."""
        saved = self.meta.object_graph_def.nodes
        if node_id >= len(saved):
            raise ArtifactError(f"{self.what}: the serving function captures a missing object; the file is damaged")
        node = saved[node_id]
        kind = node.WhichOneof("kind")
        if kind == "variable":
            cid = self.checkpoint_ids().get(node_id)
            ckpt = self.checkpoint_graph().nodes
            key = None
            if cid is not None and cid < len(ckpt):
                key = next((a.checkpoint_key for a in ckpt[cid].attributes if a.name == "VARIABLE_VALUE"), None)
            if key is None:
                raise ArtifactError(f"{self.what}: variable {node.variable.name!r} has no value in the checkpoint; "
                                    "the model is incomplete")
            value = _read_tensor(self.reader(), key, self._shapes, self.what)
            return value
        if kind == "constant":
            op = self.graph_nodes.get(node.constant.operation)
            if op is None or op.op != "Const":
                raise ArtifactError(f"{self.what}: a captured constant is missing from the graph; the file is damaged")
            return self.const(op)
        raise UnsupportedModelError(f"{self.what}: the serving function captures a {kind}; only variables and "
                                    "constants are supported")

    def const(self, node: Any) -> np.ndarray:
        tensor = node.attr["value"].tensor
        shape = [d.size for d in tensor.tensor_shape.dim]
        limits.check_elements(shape, f"{self.what}: constant {limits.clip(node.name, 80)}")
        try:
            return np.asarray(self.t.make_ndarray(tensor))
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{self.what}: constant {node.name!r} is malformed ({_first(e)})") from None

    # the serving function --------------------------------------------------------------------------
    def signature_function(self, name: str) -> tuple[str, Any, Any]:
        sig = self.meta.signature_def.get(name)
        if sig is None:
            have = ", ".join(k for k in self.meta.signature_def if not k.startswith("__")) or "none"
            raise ArtifactError(f"{self.what}: the SavedModel has no {name!r} signature (it has: {have}); "
                                "export it with model.export()")
        og = self.meta.object_graph_def
        fn_name = None
        if og.nodes:
            root = og.nodes[0]
            sigs = next((r.node_id for r in root.children if r.local_name == "signatures"), None)
            if sigs is not None and sigs < len(og.nodes):
                ref = next((r.node_id for r in og.nodes[sigs].children if r.local_name == name), None)
                if ref is not None and ref < len(og.nodes) and og.nodes[ref].WhichOneof("kind") == "bare_concrete_function":
                    fn_name = og.nodes[ref].bare_concrete_function.concrete_function_name
        if fn_name is None or fn_name not in self.library:
            raise UnsupportedModelError(f"{self.what}: the {name!r} signature is not a saved function dqnc can read "
                                        "(a TF1 SavedModel?); export it with model.export()")
        return fn_name, sig, self.library[fn_name]

    def read(self, name: str = "serving_default") -> Exported:
        fn_name, sig, fn = self.signature_function(name)
        if len(sig.inputs) != 1 or len(sig.outputs) != 1:
            raise UnsupportedModelError(f"{self.what}: the serving signature has {len(sig.inputs)} inputs and "
                                        f"{len(sig.outputs)} outputs; a Q-network has one of each")
        spec = next(iter(sig.inputs.values()))
        dims = [d.size for d in spec.tensor_shape.dim]
        if spec.tensor_shape.unknown_rank or len(dims) < 2 or any(d < 0 for d in dims[1:]):
            raise UnsupportedModelError(f"{self.what}: the serving input has shape {dims}; dqnc needs a batch of "
                                        "fixed-size observations")
        obs_dim = limits.check_elements(dims[1:], f"{self.what}: serving input")
        bound = list(self.meta.object_graph_def.concrete_functions[fn_name].bound_inputs) \
            if fn_name in self.meta.object_graph_def.concrete_functions else []
        args = [a.name for a in fn.signature.input_arg]
        n_inputs = len(args) - len(bound)
        if n_inputs != 1 or len(fn.signature.output_arg) != 1:
            raise UnsupportedModelError(f"{self.what}: the serving function takes {n_inputs} inputs and gives "
                                        f"{len(fn.signature.output_arg)} outputs; a Q-network has one of each")
        env: dict[str, Any] = {args[0]: _Chain([])}
        for arg, node_id in zip(args[1:], bound):
            env[arg] = ("capture", node_id)
        out = self.call(fn, env, 0)[0]
        if not isinstance(out, _Chain):
            raise UnsupportedModelError(f"{self.what}: the serving output does not depend on the observation")
        if not any(isinstance(op, Affine) for op in out.ops):
            raise UnsupportedModelError(f"{self.what}: no Dense layers found in the serving graph")
        return Exported(obs_dim, out.ops, self.mapping, name)

    def call(self, fn: Any, env: dict[str, Any], depth: int) -> list[Any]:
        """The outputs of function ``fn`` given its arguments' values, evaluated symbolically."""
        if depth > MAX_CALL_DEPTH:
            raise UnsupportedModelError(f"{self.what}: the serving graph nests functions over {MAX_CALL_DEPTH} deep")
        for n in fn.node_def:
            if n.op not in GRAPH_OPS:
                raise UnsupportedModelError(f"{self.what}: graph op {n.op!r} ({limits.clip(n.name, 80)}) is not "
                                            "supported in an exported SavedModel; supported: MatMul, BiasAdd, AddV2, "
                                            "Relu, Tanh, Elu, Sigmoid")
        nodes = {n.name: n for n in fn.node_def}
        memo: dict[str, list[Any]] = {}
        outputs = []
        for arg in fn.signature.output_arg:
            ref = fn.ret.get(arg.name)
            if ref is None:
                raise ArtifactError(f"{self.what}: function {fn.signature.name!r} does not return {arg.name!r}")
            outputs.append(self.value(ref, fn, nodes, env, memo, depth))
        return outputs

    def value(self, ref: str, fn: Any, nodes: dict[str, Any], env: dict[str, Any], memo: dict[str, list[Any]],
              depth: int, _seen: frozenset[str] = frozenset()) -> Any:
        if ref.startswith("^"):
            raise ArtifactError(f"{self.what}: a control input is used as a value; the file is damaged")
        parts = ref.split(":")
        name = parts[0]
        if name in env:
            v = env[name]
            if isinstance(v, tuple) and v[0] == "capture":
                v = env[name] = self.captured(v[1])
            return v
        node = nodes.get(name)
        if node is None:
            raise ArtifactError(f"{self.what}: function {fn.signature.name!r} refers to a missing node {name!r}")
        index = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else 0
        if name in _seen:
            raise ArtifactError(f"{self.what}: the serving graph has a cycle at {name!r}; the file is damaged")
        if name not in memo:
            memo[name] = self.node(node, fn, nodes, env, memo, depth, _seen | {name})
        outs = memo[name]
        if index >= len(outs):
            raise ArtifactError(f"{self.what}: {name!r} has no output {index}; the file is damaged")
        return outs[index]

    def node(self, n: Any, fn: Any, nodes: dict[str, Any], env: dict[str, Any], memo: dict[str, list[Any]],
             depth: int, seen: frozenset[str]) -> list[Any]:
        data = [i for i in n.input if not i.startswith("^")]

        def arg(i: int) -> Any:
            if i >= len(data):
                raise ArtifactError(f"{self.what}: {n.op} {n.name!r} lacks input {i}; the file is damaged")
            return self.value(data[i], fn, nodes, env, memo, depth, seen)

        where = f"{self.what}: {n.op} {limits.clip(n.name, 80)}"
        if n.op == "Const":
            return [self.const(n)]
        if n.op in ("ReadVariableOp", *_PASS):
            return [arg(0)]
        if n.op in _CALLS:
            callee = self.library.get(n.attr["f"].func.name)
            if callee is None:
                raise ArtifactError(f"{where} calls a missing function; the file is damaged")
            names = [a.name for a in callee.signature.input_arg]
            if len(names) != len(data):
                raise ArtifactError(f"{where} passes {len(data)} arguments to a function of {len(names)}")
            inner = {a: arg(i) for i, a in enumerate(names)}
            return self.call(callee, inner, depth + 1)
        if n.op == "Cast":
            if n.attr["DstT"].type != 1:  # DT_FLOAT
                raise UnsupportedModelError(f"{where}: only casts to float32 are supported")
            return [arg(0)]
        x = arg(0)
        if n.op in _GRAPH_ACTS:
            return [_Chain([*self.chain(x, where).ops, Act(_GRAPH_ACTS[n.op])])]
        if n.op == "Reshape":
            shape = np.asarray(arg(1)).ravel()
            if len(shape) != 2:
                raise UnsupportedModelError(f"{where}: only reshapes to a batch of flat vectors are supported")
            return [self.chain(x, where)]
        if n.op == "MatMul":
            w = arg(1)
            if n.attr["transpose_a"].b or n.attr["transpose_b"].b or not isinstance(w, np.ndarray) or w.ndim != 2:
                raise UnsupportedModelError(f"{where} is not x @ kernel")
            self.mapping.append({"source": n.name, "op": "MatMul", "shape": list(w.shape)})
            return [_Chain([*self.chain(x, where).ops,
                            Affine(w.astype(np.float32), np.zeros(w.shape[1], np.float32))])]
        if n.op in ("BiasAdd", "AddV2", "Add"):
            y = arg(1)
            if isinstance(x, np.ndarray) and isinstance(y, _Chain):
                x, y = y, x
            if not isinstance(x, _Chain) or not isinstance(y, np.ndarray) or y.size == 0:
                raise UnsupportedModelError(f"{where} is not a bias added to the network's activations")
            b = y.astype(np.float32)
            if b.ndim > 1 and all(d == 1 for d in b.shape[:-1]):
                b = b.reshape(-1)
            if b.ndim != 1:
                raise UnsupportedModelError(f"{where}: a bias of shape {y.shape} is not supported")
            ops = list(x.ops)
            if ops and isinstance(ops[-1], Affine) and b.shape[0] in (1, ops[-1].w.shape[1]):
                ops[-1] = Affine(ops[-1].w, ops[-1].b + b)
            else:
                ops.append(ScaleShift(np.ones_like(b), b))
            return [_Chain(ops)]
        raise UnsupportedModelError(f"{where}: graph op {n.op!r} is not supported")

    def chain(self, x: Any, where: str) -> _Chain:
        if not isinstance(x, _Chain):
            raise UnsupportedModelError(f"{where}: computes on constants only; dqnc reads one chain of layers")
        return x


def read_exported(path: Path, signature: str = "serving_default") -> Exported:
    """The serving graph of a SavedModel without Keras metadata, read from its protobuf and its
    checkpoint: never loaded with ``tf.saved_model.load``, never executed."""
    path = Path(path)
    if not (path / "saved_model.pb").is_file():
        raise ArtifactError(f"{str(path)!r} is not a SavedModel directory (no saved_model.pb)")
    return _Graph(path).read(signature)

