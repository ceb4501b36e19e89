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


def layer_stats(name: str, kernel: np.ndarray, bias: np.ndarray | None) -> dict[str, Any]:
    params = kernel.size + (0 if bias is None else bias.size)
    nonzero = int(np.count_nonzero(kernel)) + (0 if bias is None else int(np.count_nonzero(bias)))
    return {
        "name": name,
        "shape": list(kernel.shape),
        "params": int(params),
        "nonzero": nonzero,
        "kernel_sparsity": float(1 - np.count_nonzero(kernel) / kernel.size),
        "sparsity": float(1 - nonzero / params),
    }


def summarize(artifact: Artifact) -> dict[str, Any]:
    from dqnc.policy import check_io, load_keras_model

    model = load_keras_model(artifact.model_path)
    check_io(model, artifact.env, str(artifact.path))
    layers = []
    for layer in model.layers:
        w = layer.get_weights()
        if not w:
            continue
        layers.append(layer_stats(layer.name, w[0], w[1] if len(w) > 1 else None))
    params = sum(l["params"] for l in layers)
    nonzero = sum(l["nonzero"] for l in layers)
    m = artifact.manifest
    return {
        "path": str(artifact.path),
        "stage": artifact.stage,
        "kind": artifact.kind,
        "env": artifact.env.to_dict(),
        "parent": m.get("parent"),
        "network": m.get("network"),
        "layers": layers,
        "params": params,
        "nonzero": nonzero,
        "sparsity": 1 - nonzero / params if params else 0.0,
        "size_bytes": disk_size(artifact.model_path),
        "gzip_bytes": gzip_size(artifact.model_path),
        "metrics": m.get("metrics"),
        "created_utc": m.get("created_utc"),
        "command": m.get("command"),
        "versions": m.get("versions"),
    }
