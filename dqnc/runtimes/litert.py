"""LiteRT and tflite-runtime: the interpreters ``dqnc.runtime.Policy`` (the bundle's runner) drives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqnc.runtimes.base import Runtime
from dqnc.runtimes.names import LITERT, TFLITE_RUNTIME

# registry name -> the interpreter module dqnc.runtime imports
MODULES = {LITERT: "ai_edge_litert", TFLITE_RUNTIME: "tflite_runtime"}


def tflite_policy(path: Path, manifest: dict[str, Any] | None = None, runtime: str | None = None) -> Any:
    """A runtime.Policy for a .tflite file, with damaged files reported as ArtifactError
    (``runtime``: an interpreter module name, or None for the first that imports)."""
    from dqnc.errors import ArtifactError, UsageError
    from dqnc.runtime import Policy

    try:
        return Policy.from_manifest(str(path), manifest, runtime=runtime)
    except ImportError as e:
        raise UsageError(str(e)) from None
    except (ValueError, RuntimeError, OSError) as e:
        decode_refusal(path, runtime)  # a LUT-compressed model is not damaged: say which runtime runs it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{str(path)!r} is not a valid TFLite model ({first[:200]}): re-create it with dqnc quantize or export") from None


def decode_refusal(path: Any, runtime: str | None) -> None:
    """Raise UsageError (exit 2) if ``path`` is a LUT-compressed model, which ``runtime`` cannot run."""
    from dqnc.errors import UsageError
    from dqnc.runtimes.names import TFLM
    from dqnc.tflite_model import uses_decode

    try:
        compressed = uses_decode(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - unreadable: the caller reports the file as damaged
        return
    if compressed:
        raise UsageError(f"{str(path)!r} is LUT-compressed (TFLite Micro's DECODE op), which {runtime or 'LiteRT'} "
                         f"cannot run: use --runtime {TFLM}, or the bundle's uncompressed model.tflite")


_PROBE = (
    "import sys, numpy as np\n"
    "from dqnc.runtime import Policy\n"
    "p = Policy(sys.argv[1])\n"
    "p.q_values(np.zeros((1, p.obs_dim), np.float32))\n"
)


def probe_tflite(path: Path) -> None:
    """Load and invoke an unverified .tflite in a child process first.

    TFLite's flatbuffer checks do not catch every corruption: some damaged files abort the
    process (measured: about 1 in 300 random byte flips). A file without a dqnc manifest has no
    checksum to catch that first, so a crash is confined to a child and reported as bad input.
    """
    import subprocess
    import sys

    from dqnc.errors import ArtifactError

    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{str(path)!r}: loading the TFLite model hangs: the file is damaged; re-create it") from None
    if proc.returncode < 0 or proc.returncode > 1:
        raise ArtifactError(f"{str(path)!r} is not a valid TFLite model (the runtime crashed loading it, "
                            f"exit {proc.returncode}): re-create it with dqnc quantize or export")


def _available(module: str) -> str | None:
    from dqnc.runtime import interpreter_class

    try:
        interpreter_class(module)
    except ImportError as e:
        return f"needs {module} ({e}): pip install {module.replace('_', '-')}"
    return None


def _open(module: str, source: Any, manifest: dict[str, Any] | None) -> Any:
    """An Artifact opens as eval opens it (damaged files reported); bare bytes as the runner does."""
    from dqnc.runtime import Policy

    if isinstance(source, (bytes, bytearray)):
        pre = (manifest or {}).get("preprocess") or {}
        return Policy(model_content=bytes(source), runtime=module, obs_mean=pre.get("obs_mean"), obs_std=pre.get("obs_std"))
    return tflite_policy(source.model_path, manifest, runtime=module)


def _make(name: str, summary: str) -> Runtime:
    module = MODULES[name]
    return Runtime(name=name, summary=summary, available=lambda: _available(module),
                   refuses=lambda content, manifest: None,
                   open=lambda source, manifest: _open(module, source, manifest))


LITERT_RUNTIME = _make(LITERT, "LiteRT (ai-edge-litert), the default")
TFLITE_RUNTIME_RUNTIME = _make(TFLITE_RUNTIME, "tflite-runtime, for devices that only have it")
