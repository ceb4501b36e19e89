"""Keras Q-networks: Keras 3 ``.keras``/``.h5``, tf_keras ``.h5`` and SavedModel, Keras 3 ``export()``.

``.keras`` and ``.h5`` files are read with ``zipfile``/``json``/``h5py`` only: the model config
names the layers, the weights file holds their variables, and nothing in the file is
deserialized into Python objects (so no ``Lambda`` bytecode can run, and TensorFlow is not
imported). Every size they declare (zip members, JSON, HDF5 datasets) is checked against
:mod:`dqnc.limits` before anything is allocated for it. SavedModels are read as data by
:mod:`dqnc.savedmodel` (never ``load_model`` / ``tf.saved_model.load``): a tf_keras SavedModel's
``keras_metadata.pb`` config is checked layer by layer (a ``Lambda`` is refused by name) and
rebuilt, its variables restored from the checkpoint; a Keras 3 ``export()`` SavedModel has no
layer config: its serving graph is read op by op from ``saved_model.pb`` (MatMul / BiasAdd /
AddV2 / activations) with the variables' values from the checkpoint, and never executed.

Supported layers: InputLayer, Dense (relu / tanh / elu / sigmoid / linear), Activation, ReLU,
ELU, Dropout, Flatten, Identity, and the preprocessing layers Normalization and Rescaling,
which are folded into the next Dense layer.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import limits
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


def _dataset(ds: Any, what: str, budget: limits.Budget) -> np.ndarray:
    """An HDF5 dataset's values, after its declared shape, chunk shape and dtype were checked:
    an 8 KB file can declare a terabyte-sized (empty, chunked or compressed) dataset."""
    import h5py

    name = limits.clip(getattr(ds, "name", "?"), 80)
    if not isinstance(ds, h5py.Dataset):
        raise ArtifactError(f"{what}: weight {name} is not a dataset; the file is damaged")
    try:
        dtype, shape, chunks = ds.dtype, ds.shape, ds.chunks
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{what}: weight {name} is unreadable ({str(e)[:120]}); the file is damaged") from None
    if dtype.kind not in "fiub" or dtype.itemsize > 8:
        raise ArtifactError(f"{what}: weight {name} holds {dtype}, not numbers; the file is damaged")
    if shape is None:
        raise ArtifactError(f"{what}: weight {name} has no data; the file is damaged")
    if chunks is not None:
        limits.check_elements(chunks, f"{what}: weight {name} (chunk shape)")
    budget.take(shape, name)
    try:
        return np.asarray(ds[()])
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{what}: weight {name} is unreadable ({str(e)[:120]}); the file is damaged") from None


def _attr(obj: Any, key: str, what: str, max_bytes: int = limits.MAX_JSON_BYTES) -> Any:
    """An HDF5 attribute, refused before reading if it declares more than ``max_bytes``."""
    if key not in obj.attrs:
        return None
    try:
        aid = obj.attrs.get_id(key)
        shape, itemsize = aid.shape, aid.dtype.itemsize
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ArtifactError(f"{what}: attribute {key!r} is unreadable ({str(e)[:120]}); the file is damaged") from None
    n = limits.check_elements(shape or (), f"{what}: attribute {key!r}")
    if n * itemsize > max_bytes:
        raise limits.LimitError(f"{what}: attribute {key!r} declares {n * itemsize:,} bytes, over dqnc's limit of "
                                f"{max_bytes:,} (dqnc.limits)")
    try:
        return obj.attrs[key]
    except (OSError, ValueError, TypeError) as e:
        raise ArtifactError(f"{what}: attribute {key!r} is unreadable ({str(e)[:120]}); the file is damaged") from None


def _keras3_weights(h5: Any, what: str) -> WeightsFn:
    """Layer name -> its variables in a Keras 3 ``model.weights.h5`` (``layers/KEY/vars/0..n``)."""
    by_name: dict[str, Any] = {}
    root = h5.get("layers") or h5.get("_layer_checkpoint_dependencies") or {}
    budget = limits.Budget(f"{what}: weights")
    for key in root:
        vars_ = root[key].get("vars") if hasattr(root[key], "get") else None
        if vars_ is None:
            continue
        name = _attr(vars_, "name", what, 4096)
        name = key if name is None else name
        by_name[name.decode() if isinstance(name, bytes) else str(name)] = vars_
        by_name.setdefault(str(key), vars_)

    def get(name: str) -> list[np.ndarray]:
        g = by_name.get(name)
        if g is None:
            return []
        return [_dataset(g[str(i)], what, budget) for i in range(len(g)) if str(i) in g]

    return get


def _json(data: bytes | str, what: str) -> Any:
    try:
        return limits.loads_json(data, what)
    except ValueError as e:
        raise ArtifactError(f"{what}: not valid JSON ({limits.clip(e, 120)}); the file is damaged") from None


def load_keras_zip(path: Path) -> Source:
    what = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            # limits read at call time (tests lower them)
            config = _json(limits.read_zip_member(zf, "config.json", what, limits.MAX_DECOMPRESSED_BYTES),
                           f"{what}: config.json")
            meta = _json(limits.read_zip_member(zf, "metadata.json", what, limits.MAX_DECOMPRESSED_BYTES),
                         f"{what}: metadata.json") if "metadata.json" in zf.namelist() else {}
            weights_raw = limits.read_zip_member(zf, "model.weights.h5", what, limits.MAX_DECOMPRESSED_BYTES)
    except (*limits.DAMAGED_ZIP, KeyError, RuntimeError) as e:  # zlib/zipfile errors on damaged members
        raise ArtifactError(f"{what}: damaged .keras file ({type(e).__name__}: {str(e)[:160]}); re-save the model") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{what}: config.json is not a JSON object; the file is damaged")
    if not isinstance(meta, dict):
        meta = {}
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
        raw = _attr(h5, "model_config", what)
        if raw is None:
            raise UnsupportedModelError(f"{what}: an HDF5 file without a model config (weights only?); save the whole "
                                        "model (model.save) rather than save_weights")
        if isinstance(raw, np.ndarray) and raw.shape == ():
            raw = raw[()]
        if not isinstance(raw, (bytes, str)):
            raise ArtifactError(f"{what}: the model config is not a string; the file is damaged")
        config = _json(raw, f"{what}: model config")
        if not isinstance(config, dict):
            raise ArtifactError(f"{what}: the model config is not a JSON object; the file is damaged")
        group = h5["model_weights"] if "model_weights" in h5 else h5
        budget = limits.Budget(f"{what}: weights")

        def weights(name: str) -> list[np.ndarray]:
            if name not in group:
                return []
            g = group[name]
            raw_names = _attr(g, "weight_names", what)
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in (raw_names if raw_names is not None else [])]
            out = []
            for n in names:
                if n not in g:
                    raise ArtifactError(f"{what}: layer {name!r} lists a missing weight {limits.clip(n, 80)!r}; "
                                        "the file is damaged")
                out.append(_dataset(g[n], what, budget))
            return out

        version = _attr(h5, "keras_version", what, 4096)
        version = version.decode() if isinstance(version, bytes) else version
        return _source("keras", what, config, weights, {"container": ".h5", "keras_version": version})


# --- SavedModel ---------------------------------------------------------------------------------

def _tf_keras_metadata(path: Path) -> dict[str, Any] | None:
    from dqnc.savedmodel import read_keras_metadata

    return read_keras_metadata(path)


def load_tf_keras_savedmodel(path: Path, metadata: dict[str, Any]) -> Source:
    """A tf_keras SavedModel: its config checked (every layer, nested models too) and the model
    rebuilt from it with the checkpoint's values, by :mod:`dqnc.savedmodel`; no stored code runs."""
    from dqnc.savedmodel import keras_config, load_keras_model

    what = str(path)
    config = keras_config(path, metadata)  # refuses a Lambda, custom classes, serialized functions by name
    layers = ordered_layers(config, what)
    for layer in layers:
        if layer.get("class_name") not in SUPPORTED_LAYERS and layer.get("class_name") not in _NOOP:
            name = layer.get("config", {}).get("name")
            raise UnsupportedModelError(f"{what}: layer {name!r} is a {layer.get('class_name')}, which is not supported; "
                                        f"supported layers: {', '.join(SUPPORTED_LAYERS)}")
    model = load_keras_model(path)

    def weights(name: str) -> list[np.ndarray]:
        try:
            return [np.asarray(w) for w in model.get_layer(name).get_weights()]
        except ValueError:
            return []

    return _source("keras", what, config, weights, {"container": "tf_keras SavedModel"})


def load_exported_savedmodel(path: Path) -> Source:
    """A Keras 3 ``model.export()`` SavedModel: its serving graph read op by op from the protobuf,
    variables from the checkpoint (:func:`dqnc.savedmodel.read_exported`); nothing is executed, so
    the import check's reference is the numpy forward of those ops."""
    from dqnc.savedmodel import read_exported

    graph = read_exported(path)
    return Source("keras", graph.obs_dim, graph.ops, graph.mapping,
                  details={"container": "Keras 3 export() SavedModel", "signature": graph.signature})


def load(path: Path, cfg: Any, spec: Any = None) -> Source:
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
