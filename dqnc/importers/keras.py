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
ELU, Dropout, Flatten, Identity, the preprocessing layers Normalization and Rescaling, which are
folded into the next layer's weights, and for pixel inputs Conv2D (padding 'valid', square
kernel, equal strides, no dilation or groups; channels_last images read HWC, channels_first
CHW) with one Flatten before the Dense layers. Keras 3 stores a ``.keras`` file's weights under
names made from the layer classes (``conv2d``, ``conv2d_1``, ...), not the layer names: a weights
group without a recorded layer name is matched to its layer by that naming, in the config's
layer order.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import limits
from dqnc.errors import ArtifactError
from dqnc.importers.common import (Act, Affine, Conv, Flatten, Op, ScaleShift, Source, UnsupportedModelError,
                                   check_activation)

SUPPORTED_LAYERS = ("InputLayer", "Dense", "Conv2D", "Activation", "ReLU", "ELU", "Dropout", "Flatten", "Identity",
                    "Normalization", "Rescaling")
_NOOP = ("InputLayer", "Dropout", "Identity", "GaussianNoise", "GaussianDropout", "AlphaDropout")
_CONV = ("Conv2D (padding 'valid', a square kernel, equal strides, dilation_rate 1, groups 1; channels_last or "
         "channels_first), then Flatten and Dense layers")
# Layers a Keras conv Q-network may hold that dqnc's conv family cannot express (yet): said so by name.
_POOLING = "pooling layers are not in dqnc's conv family"
_NOT_IN_FAMILY = {"MaxPooling2D": _POOLING, "AveragePooling2D": _POOLING, "GlobalAveragePooling2D": _POOLING,
                  "GlobalMaxPooling2D": _POOLING, "ZeroPadding2D": "padding layers are not in dqnc's conv family",
                  "BatchNormalization": "batch normalization is not in dqnc's conv family"}
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
    image_format = _image_format(layers, what)
    for layer in layers:
        cls = layer.get("class_name")
        c = layer.get("config", {})
        name = c.get("name", cls)
        where = f"{what}: layer {name!r}"
        if cls in _NOOP:
            continue
        if cls == "Flatten":
            ops += _flatten(c, ops, where, image_format)
        elif cls == "Conv2D":
            conv_ops, entry = _conv2d(c, weights(name), where)
            ops += conv_ops
            mapping.append(entry)
        elif cls == "Dense":
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
                        "folded": "into the next layer's weights"})
        elif cls == "Rescaling":
            scale, offset = c.get("scale", 1.0), c.get("offset", 0.0)
            if isinstance(scale, dict) or isinstance(offset, dict):
                raise UnsupportedModelError(f"{where}: Rescaling with tensor-valued scale/offset is not supported")
            ops.append(ScaleShift(np.asarray(scale, np.float64).ravel(), np.asarray(offset, np.float64).ravel()))
            pre.append({"kind": "Rescaling", "layer": name, "scale": scale, "offset": offset,
                        "folded": "into the next layer's weights"})
        else:
            why = f" ({_NOT_IN_FAMILY[cls]})" if cls in _NOT_IN_FAMILY else ""
            raise UnsupportedModelError(f"{where} is a {limits.clip(cls, 60)}, which is not supported{why}; supported "
                                        f"layers: {', '.join(SUPPORTED_LAYERS)}; for pixels: {_CONV}")
    return ops, mapping, pre


def _pair(value: Any, where: str, key: str) -> list[int]:
    """A Keras (h, w) option given as one int or a pair."""
    items = value if isinstance(value, (list, tuple)) else [value, value]
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise ArtifactError(f"{where}: {key} {limits.clip(value, 60)} is not a pair of integers; the file is damaged") from None


def _conv2d(c: dict[str, Any], w: list[np.ndarray], where: str) -> tuple[list[Op], dict[str, Any]]:
    """A Conv2D layer's ops (its kernel is HWIO, dqnc's own layout), after its options were checked."""
    kernel, strides = _pair(c.get("kernel_size"), where, "kernel_size"), _pair(c.get("strides", 1), where, "strides")
    dilation, groups = _pair(c.get("dilation_rate", 1), where, "dilation_rate"), c.get("groups", 1)
    padding = str(c.get("padding", "valid")).lower()
    problems = [p for p, bad in (
        (f"padding {padding!r}", padding != "valid"), (f"dilation_rate {dilation}", any(d != 1 for d in dilation)),
        (f"groups {groups}", groups not in (1, None)),
        (f"kernel_size {kernel}", len(kernel) != 2 or kernel[0] != kernel[1]),
        (f"strides {strides}", len(strides) != 2 or strides[0] != strides[1] or strides[0] < 1)) if bad]
    if problems:
        raise UnsupportedModelError(f"{where} is a Conv2D with {', '.join(problems)}, which is not supported; "
                                    f"supported: {_CONV}")
    if len(w) < 1 or w[0].ndim != 4 or list(w[0].shape[:2]) != kernel:
        raise ArtifactError(f"{where}: Conv2D kernel missing or not {kernel[0]}x{kernel[1]} in the file; the file is damaged")
    k = w[0].astype(np.float32)
    use_bias = c.get("use_bias", True)
    bias = w[1].astype(np.float32) if use_bias and len(w) > 1 else np.zeros(k.shape[3], np.float32)
    if bias.shape != (k.shape[3],):
        raise ArtifactError(f"{where}: Conv2D bias of shape {bias.shape} for {k.shape[3]} filters; the file is damaged")
    act = _activation_name(c.get("activation"), where)
    ops: list[Op] = [Conv(k, bias, strides[0])] + ([Act(act)] if act != "linear" else [])
    return ops, {"source": c.get("name"), "layer": "Conv2D", "shape": list(k.shape), "stride": strides[0],
                 "padding": "valid", "activation": act}


def _image_format(layers: list[dict[str, Any]], what: str) -> str:
    """The data_format every Conv2D of the model shares: channels_last (HWC) or channels_first (CHW)."""
    formats = {str(l.get("config", {}).get("data_format") or "channels_last") for l in layers
               if l.get("class_name") == "Conv2D" and isinstance(l.get("config"), dict)}
    if not formats <= {"channels_last", "channels_first"} or len(formats) > 1:
        raise UnsupportedModelError(f"{what}: Conv2D layers with data_format {limits.clip(sorted(formats), 80)}; "
                                    "supported: one of "
                                    "channels_last, channels_first for every Conv2D")
    return formats.pop() if formats else "channels_last"


def _flatten(c: dict[str, Any], ops: list[Op], where: str, image_format: str) -> list[Op]:
    """Keras's Flatten keeps the feature map's own order, except that ``data_format="channels_first"``
    first moves axis 1 last: HWC order for channels_last maps and channels_first maps flattened
    channels_first, CHW for channels_first maps flattened as channels_last. Before any Conv2D a
    Flatten changes nothing dqnc sees."""
    if not any(isinstance(op, Conv) for op in ops):
        return []
    fmt = str(c.get("data_format") or "channels_last")
    if image_format == "channels_last" and fmt != "channels_last":
        raise UnsupportedModelError(f"{where}: Flatten with data_format {fmt!r} after channels_last Conv2D layers "
                                    f"reorders the features (W, C, H); supported: {_CONV}")
    return [Flatten("CHW" if image_format == "channels_first" and fmt == "channels_last" else "HWC")]


def _input_shape(layers: list[dict[str, Any]], where: str) -> tuple[int, ...]:
    for layer in layers:
        c = layer.get("config", {})
        shape = c.get("batch_shape") or c.get("batch_input_shape")
        if shape:
            try:
                return tuple(int(d) for d in shape[1:])
            except (TypeError, ValueError):
                break
    raise UnsupportedModelError(f"{where}: a conv model must record its input image shape (keras.Input((H, W, C)))")


def _source(fmt: str, what: str, model_config: dict[str, Any], weights: WeightsFn, details: dict[str, Any]) -> Source:
    layers = ordered_layers(model_config, what)
    ops, mapping, pre = layer_ops(layers, weights, what)
    first = next((op.w for op in ops if isinstance(op, Affine)), None)
    if first is None:
        raise UnsupportedModelError(f"{what}: the model has no Dense layer")
    if not any(isinstance(op, Conv) for op in ops):
        return Source(fmt, _input_dim(layers, model_config, first), ops, mapping, pre, details)
    shape = _input_shape(layers, what)
    layout = "CHW" if _image_format(layers, what) == "channels_first" else "HWC"
    if len(shape) != 3 or min(shape) < 1:
        raise UnsupportedModelError(f"{what}: a conv model reading inputs of shape {limits.clip(shape, 60)}; supported: "
                                    f"{'(channels, height, width)' if layout == 'CHW' else '(height, width, channels)'} images")
    for op in ops[:next(i for i, op in enumerate(ops) if isinstance(op, Conv))]:
        if layout == "CHW" and isinstance(op, ScaleShift) and max(np.size(op.scale), np.size(op.shift)) > 1:
            raise UnsupportedModelError(f"{what}: a Rescaling/Normalization over the last axis of channels_first "
                                        "images (per column, not per channel) is not supported; supported: one scale "
                                        "and offset for all pixels")
    obs_dim = limits.check_elements(shape, f"{what}: the input image", limits.MAX_ACTIVATION_ELEMENTS,
                                    "MAX_ACTIVATION_ELEMENTS")
    keras_format = "channels_first" if layout == "CHW" else "channels_last"
    details = details | {"architecture": "conv", "conv_input": f"{layout} (Keras {keras_format})"}
    return Source(fmt, obs_dim, ops, mapping, pre, details, obs_shape=shape, layout=layout)


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


def _snake(name: str) -> str:
    """Keras 3's ``naming.to_snake_case``: ``Conv2D`` -> ``conv2d``, ``ReLU`` -> ``re_lu``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def saved_keys(model_config: dict[str, Any]) -> dict[str, str]:
    """Layer name -> the key Keras 3 saves its weights under: the snake-cased class name, numbered
    by order of appearance in the model's layers (``dense``, ``dense_1``, ...), not the layer name."""
    cfg = model_config.get("config", {})
    layers = cfg.get("layers") if isinstance(cfg, dict) else None
    keys: dict[str, str] = {}
    seen: dict[str, int] = {}
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict) or layer.get("class_name") == "InputLayer":
            continue
        base = _snake(str(layer.get("class_name")))
        n = seen.get(base, -1) + 1
        seen[base] = n
        name = layer.get("config", {}).get("name") if isinstance(layer.get("config"), dict) else None
        keys[str(name)] = base if n == 0 else f"{base}_{n}"
    return keys


def _keras3_weights(h5: Any, what: str, model_config: dict[str, Any]) -> WeightsFn:
    """Layer name -> its variables in a Keras 3 ``model.weights.h5`` (``layers/KEY/vars/0..n``): by the
    layer name the group records, else by the key Keras 3 derived from the layer's class."""
    by_name: dict[str, Any] = {}
    by_key: dict[str, Any] = {}
    root = h5.get("layers") or h5.get("_layer_checkpoint_dependencies") or {}
    budget = limits.Budget(f"{what}: weights")
    for key in root:
        vars_ = root[key].get("vars") if hasattr(root[key], "get") else None
        if vars_ is None:
            continue
        by_key[str(key)] = vars_
        name = _attr(vars_, "name", what, 4096)
        if name is not None:
            by_name[name.decode() if isinstance(name, bytes) else str(name)] = vars_
    for name, key in saved_keys(model_config).items():
        if name not in by_name and key in by_key:
            by_name[name] = by_key[key]

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
        return _source("keras", what, config, _keras3_weights(h5, what, config),
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
