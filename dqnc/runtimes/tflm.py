"""TensorFlow Lite Micro's reference kernels on the host (the interpreter lives in :mod:`dqnc.tflm`)."""

from __future__ import annotations

from typing import Any

from dqnc.runtimes.base import Runtime
from dqnc.runtimes.names import TFLM


def _available() -> str | None:
    try:
        import tflite_micro  # noqa: F401
    except ImportError as e:
        return f"needs tflite-micro ({e}): pip install tflite-micro"
    return None


def _open(source: Any, manifest: dict[str, Any] | None) -> Any:
    from dqnc import tflm  # looked up at call time: tests replace tflm.policy

    content = source if isinstance(source, (bytes, bytearray)) else source.model_path.read_bytes()
    return tflm.policy(bytes(content), manifest)


TFLM_RUNTIME = Runtime(name=TFLM, summary="TensorFlow Lite Micro's reference kernels (tflite-micro)",
                       available=_available, refuses=lambda content, manifest: None, open=_open)
