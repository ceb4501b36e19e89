"""The bundle's dependency-free ``policy.c`` (:mod:`dqnc.cpolicy`), compiled for the host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dqnc.runtimes.base import Runtime
from dqnc.runtimes.names import C


def _available() -> str | None:
    from dqnc import cpolicy

    if cpolicy.host_compiler() is None:
        return "needs a host C compiler (cc, gcc or clang): install one, e.g. apt-get install gcc"
    return None


def _refuses(content: bytes, manifest: dict[str, Any] | None) -> str | None:
    from dqnc import cpolicy

    net = cpolicy.extract(content, conv=True)
    return f"no C policy for this model: {net}" if isinstance(net, str) else None


def c_policy(source: Any, content: bytes | None = None, manifest: dict[str, Any] | None = None) -> Any:
    """The bundle's policy.c compiled for the host (generated from the model where the artifact
    has none; ``source`` is an Artifact, or the .tflite bytes themselves)."""
    import tempfile

    from dqnc import cpolicy
    from dqnc.runtime import Policy

    is_bytes = isinstance(source, (bytes, bytearray))
    content = bytes(source) if is_bytes else (content if content is not None else source.model_path.read_bytes())
    manifest = manifest if manifest is not None or is_bytes else source.manifest
    net = cpolicy.extract(content, conv=True)
    if isinstance(net, str):
        raise ValueError(f"no C policy for this model: {net}")
    work = Path(tempfile.mkdtemp(prefix="dqnc-cpolicy-"))
    if not is_bytes and (source.path / cpolicy.SOURCE).is_file() and (source.path / cpolicy.HEADER).is_file():
        src = source.path
    else:
        pre = (manifest or {}).get("preprocess") or {}
        lite = Policy(model_content=content, obs_mean=pre.get("obs_mean"), obs_std=pre.get("obs_std"))
        names = None if is_bytes else source.env.action_meanings
        names = names or [f"action {i}" for i in range(net.n_actions)]
        cpolicy.write(net, lite, names, work, pre.get("obs_mean"), pre.get("obs_std"))
        src = work
    lib = cpolicy.build_host(src, work)
    return cpolicy.CPolicy(lib, net.obs_dim, net.n_actions, net.output_scale, net.output_zero_point)


C_RUNTIME = Runtime(name=C, summary="the bundle's policy.c (int8 fully connected and conv models), compiled for the host",
                    available=_available, refuses=_refuses,
                    open=lambda source, manifest: c_policy(source, None, manifest), loads_tflite=False)
