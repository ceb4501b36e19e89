"""The stage cache: content-hash keys, cached-output checks, the per-out_dir lock and state file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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

    def __init__(self, out_dir: Path, shared: SharedCache | None = None) -> None:
        self.path = out_dir / STATE_DIR / "state.json"
        self.shared = shared
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


class SharedCache:
    """Stage outputs and evaluations shared by concurrent runs (a sweep's trials), by cache key.

    ``<root>/<key>/`` is a finished stage output, ``<root>/evals/<key>.json`` an evaluation. One
    writer per entry: whoever computes an entry holds ``<root>/.locks/<key>`` (fcntl, released by
    the kernel if the writer dies), and others wait on it, then copy the entry. An entry appears by
    one rename of a complete directory or file, so a reader never sees half of one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / ".locks").mkdir(parents=True, exist_ok=True)
        (self.root / "evals").mkdir(exist_ok=True)

    @contextmanager
    def writer(self, key: str) -> Iterator[None]:
        import fcntl

        fd = os.open(self.root / ".locks" / key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def fetch(self, key: str, out: Path) -> Any:
        """Copy entry ``key`` to ``out`` and load it, or None when there is no such entry."""
        from dqnc import artifact as art

        entry = self.root / key
        if not entry.is_dir():
            return None
        tmp = out.with_name(f".{out.name}.shared-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(entry, tmp, symlinks=True)
        art._replace_dir(tmp, out)
        try:
            return art.load(out)
        except DqncError:
            return None

    def publish(self, key: str, src: Path) -> None:
        tmp = self.root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        from dqnc.artifact import _replace_dir

        _replace_dir(tmp, self.root / key)

    def get_eval(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.root / "evals" / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def put_eval(self, key: str, result: dict[str, Any]) -> None:
        from dqnc.artifact import write_json_atomic

        write_json_atomic(self.root / "evals" / f"{key}.json", result)


def shared_writer(state: _State, key: str) -> Any:
    """The entry's writer lock when runs share a cache; a no-op otherwise."""
    return state.shared.writer(key) if state.shared is not None else nullcontext()


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
