"""The stage cache: content-hash keys, cached-output checks, the per-out_dir lock and state file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from dqnc.errors import DqncError, UsageError

STATE_DIR = ".dqnc"


class _Lock:
    """One ``dqnc run`` per out_dir: a second one refuses instead of racing the first."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / "lock"
        self.fd: int | None = None

    def __enter__(self) -> _Lock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"out_dir {str(self.path.parent.parent)!r} is in use by pid {holder} (another dqnc run): "
                             "wait for it, or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _State:
    """Cache keys of finished stages and evaluations, in <out_dir>/.dqnc/state.json."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / "state.json"
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.data, dict):
                raise ValueError
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("stages", {})
        self.data.setdefault("evals", {})

    def save(self) -> None:
        from dqnc.artifact import write_json_atomic

        write_json_atomic(self.path, self.data)


def _cached(state: _State, name: str, key: str, out: Path) -> Any:
    from dqnc import artifact as art

    entry = state.data["stages"].get(name)
    if not entry or entry.get("key") != key or not out.exists():
        return None
    try:
        a = art.load(out)
    except DqncError:
        return None
    return a if a.sha256 == entry.get("sha256") else None


def machine_fingerprint() -> str:
    """Host name, CPU model and core count: what latency figures depend on."""
    import platform

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.node()}|{platform.machine()}|{cpu or platform.processor()}|{os.cpu_count()}"
