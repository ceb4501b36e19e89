"""The runtimes dqnc knows, by name: the config's choices, the CLI's, eval's and lowbit's read it."""

from __future__ import annotations

from typing import Any

from dqnc.runtimes.base import DeployedPolicy, Runtime

RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    """Add (or replace) a runtime; it is listed after those registered before it."""
    RUNTIMES[runtime.name] = runtime
    return runtime


def unregister(name: str) -> None:
    RUNTIMES.pop(name, None)


def names() -> list[str]:
    return list(RUNTIMES)


def get(name: str) -> Runtime:
    from dqnc.errors import UsageError

    if name not in RUNTIMES:
        raise UsageError(f"unknown runtime {name!r}: use {', '.join(names())}")
    return RUNTIMES[name]


def open_policy(name: str, artifact_or_content: Any, manifest: dict[str, Any] | None = None) -> DeployedPolicy:
    """The policy run by runtime ``name``; a runtime that refuses the model or cannot run here
    raises UsageError (exit 2) saying why. ``artifact_or_content`` is an Artifact or .tflite bytes."""
    from dqnc.errors import UsageError

    rt = get(name)
    if manifest is None and not isinstance(artifact_or_content, (bytes, bytearray)):
        manifest = artifact_or_content.manifest
    content = artifact_or_content if isinstance(artifact_or_content, (bytes, bytearray)) \
        else artifact_or_content.model_path.read_bytes()
    why = rt.refuses(bytes(content), manifest)
    if why:
        raise UsageError(f"--runtime {name}: {why}")
    why = rt.available()
    if why:
        raise UsageError(f"--runtime {name} {why}")
    return rt.open(artifact_or_content, manifest)
