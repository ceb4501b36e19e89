"""``dqnc inspect``: layers, parameter counts, sparsity and sizes of an artifact."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from dqnc.artifact import Artifact


def gzip_size(path: Path) -> int:
    """Bytes after gzip -9 of a file, or of a tar of a directory's files."""
    buf = io.BytesIO()
    if path.is_file():
        data = path.read_bytes()
    else:
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as tf:
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    tf.add(p, arcname=p.relative_to(path).as_posix())
        data = tar.getvalue()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return len(buf.getvalue())


def disk_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def layer_stats(name: str, kernel: np.ndarray, bias: np.ndarray | None, op: str = "Dense") -> dict[str, Any]:
    """Sizes of one layer. Sparsity, everywhere in dqnc, is the share of zero *kernel* weights
    (biases excluded): what pruning targets and what a sparse encoding saves."""
    params = kernel.size + (0 if bias is None else bias.size)
    return {
        "name": name,
        "op": op,
        "shape": list(kernel.shape),
        "params": int(params),
        "kernel_params": int(kernel.size),
        "nonzero": int(np.count_nonzero(kernel)) + (0 if bias is None else int(np.count_nonzero(bias))),
        "sparsity": float(1 - np.count_nonzero(kernel) / kernel.size) if kernel.size else 0.0,
    }


def _savedmodel_layers(artifact: Artifact) -> list[dict[str, Any]]:
    from dqnc.nets import MLP_FILE, load_mlp

    npz = artifact.path / MLP_FILE
    if npz.is_file():  # dqnc's own SavedModels carry their weights for TF-free reading
        mlp = load_mlp(npz)
        return [layer_stats(f"dense_{i}" if i else "dense", np.asarray(w), np.asarray(b))
                for i, (w, b) in enumerate(mlp.layers)]
    from dqnc.policy import check_io, load_keras_model

    model = load_keras_model(artifact.model_path)
    check_io(model, artifact.env, str(artifact.path))
    layers = []
    for layer in model.layers:
        w = layer.get_weights()
        if w:
            layers.append(layer_stats(layer.name, w[0], w[1] if len(w) > 1 else None, type(layer).__name__))
    return layers


def _tflite_layers(artifact: Artifact) -> tuple[list[dict[str, Any]], list[str]]:
    """Weighted ops of a .tflite model (read by :mod:`dqnc.tflite_model`, no TensorFlow) and its op list."""
    from dqnc.errors import ArtifactError
    from dqnc.tflite_model import Model

    model = Model(artifact.model_path.read_bytes())  # damaged or oversized: exit 2 before anything else reads it
    if model.uses_decode():
        raise ArtifactError(f"{str(artifact.model_path)!r}: a LUT-compressed model (TFLite Micro's DECODE) is inspected "
                            "through its uncompressed int8 parent")
    ops = model.ops()
    densified = {o.outputs[0]: o.inputs[0] for o in ops if o.name == "DENSIFY"}
    layers = []
    for op, w_idx, b_idx in model.weighted_layers():
        # Stripped models (quantize's default) carry no tensor names: name layers by position.
        name = model.tensor(w_idx).name or f"{op.name.lower()}_{len(layers)}"
        if w_idx in densified:  # sparse encoding: the stored values are the nonzeros
            shape = list(model.tensor(w_idx).shape)
            size = int(np.prod(shape))
            stored = model.data(densified[w_idx])
            nonzero = int(np.count_nonzero(stored)) if stored is not None else size
            layers.append({"name": name, "op": op.name + " (sparse)", "shape": shape, "params": size,
                           "kernel_params": size, "nonzero": nonzero, "sparsity": 1 - nonzero / size})
            continue
        w = model.data(w_idx)
        b = model.data(b_idx) if b_idx is not None else None
        if w is not None:
            layers.append(layer_stats(name, w, b, op.name))
    return layers, sorted({o.name for o in ops})


def param_count(artifact: Artifact) -> int | None:
    """Weights and biases of an artifact's network, read without TensorFlow (None where only
    loading the SavedModel could tell)."""
    if artifact.kind == "tflite":
        return sum(l["params"] for l in _tflite_layers(artifact)[0])
    from dqnc.nets import MLP_FILE
    from dqnc.nets_conv import CONV_FILE

    for name in (MLP_FILE, CONV_FILE):  # dqnc's own SavedModels carry their weights as p0, p1, ...
        if (artifact.path / name).is_file():
            with np.load(artifact.path / name, allow_pickle=False) as d:
                return int(sum(d[k].size for k in d.files if k.startswith("p")))
    return None


def summarize(artifact: Artifact) -> dict[str, Any]:
    ops: list[str] | None = None
    if artifact.kind == "tflite":
        layers, ops = _tflite_layers(artifact)
    else:
        layers = _savedmodel_layers(artifact)
    params = sum(l["params"] for l in layers)
    kernel = sum(l["kernel_params"] for l in layers)
    kernel_zero = sum(l["kernel_params"] * l["sparsity"] for l in layers)
    m = artifact.manifest
    return {
        "path": str(artifact.path),
        "stage": artifact.stage,
        "kind": artifact.kind,
        "env": artifact.env.to_dict(),
        "parent": m.get("parent"),
        "network": m.get("network"),
        "outputs": artifact.outputs,
        "quantization": m.get("quantization"),
        "ops": ops,
        "layers": layers,
        "params": params,
        "nonzero": sum(l["nonzero"] for l in layers),
        "sparsity": float(kernel_zero / kernel) if kernel else 0.0,
        "size_bytes": disk_size(artifact.model_path),
        "gzip_bytes": gzip_size(artifact.model_path),
        "metrics": m.get("metrics"),
        "created_utc": m.get("created_utc"),
        "command": m.get("command"),
        "versions": m.get("versions"),
    }
