"""The stage cache: content-hash keys, cached-output checks, the per-out_dir lock and state file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from dqnc.errors import DqncError, UsageError
from dqnc.limits import quote

STATE_DIR = ".dqnc"


class Lock:
    """One ``dqnc run`` per out_dir: a second one refuses instead of racing the first."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / "lock"
        self.fd: int | None = None

    def __enter__(self) -> Lock:
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


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class State:
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


def cached_output(state: State, name: str, key: str, out: Path) -> Any:
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
        art.check_output(out, force=True)  # a folder there is replaced only if it is exactly dqnc's
        tmp = out.with_name(f".{out.name}.shared-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(entry, tmp, symlinks=True)
        art.replace_dir(tmp, out)
        try:
            return art.load(out)
        except DqncError:
            return None

    def publish(self, key: str, src: Path) -> None:
        tmp = self.root / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, symlinks=True)
        from dqnc.artifact import replace_dir

        replace_dir(tmp, self.root / key)

    def get_eval(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.root / "evals" / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def put_eval(self, key: str, result: dict[str, Any]) -> None:
        from dqnc.artifact import write_json_atomic

        write_json_atomic(self.root / "evals" / f"{key}.json", result)


def shared_writer(state: State, key: str) -> Any:
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


# --- out_dir ownership ----------------------------------------------------------------------------
#
# An out_dir is dqnc's when it holds MARKER (written when dqnc creates it, or adopts a folder an
# earlier dqnc made). Inside it a run replaces only what dqnc wrote: the report files whose sha256
# the marker records, stage folders that are exactly dqnc artifacts, and its training checkpoint.
# Anything else is the user's and is refused by name, before any work starts.

MARKER = ".dqnc-out"
REPORT_FILES = ("report.md", "report.json", "recipe.effective.yaml")
_TEMP = re.compile(r"^\..+\.(tmp|old|shared)(-[A-Za-z0-9_]*)?$")  # dqnc's hidden temporaries
_SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32", "/media",
                "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/local",
                "/var", "/var/tmp", "/Applications", "/Library", "/System", "/Users", "/Volumes", "/private",
                "/private/tmp", "/private/var")


def _forms(p: Path) -> set[Path]:
    return {Path(os.path.abspath(p)), Path(os.path.realpath(p))}


def check_out_dir_location(out_dir: Path) -> None:
    """Refuse '/', the home folder, any folder above it and the system folders, always: a run
    writes report.md and one folder per stage into its out_dir."""
    home: set[Path] = set()
    try:
        home = _forms(Path.home())
    except (RuntimeError, KeyError):
        pass
    what = None
    for p in _forms(out_dir):
        if p == Path(p.anchor):
            what = "the filesystem root"
        elif p in home:
            what = "your home folder"
        elif any(p in h.parents for h in home):
            what = "a parent of your home folder"
        elif str(p) in _SYSTEM_DIRS or p == Path(tempfile.gettempdir()).resolve():
            what = "a system folder"
        if what:
            break
    if what:
        raise UsageError(f"out_dir {quote(out_dir)} is {what}: dqnc writes report.md, report.json and one folder per "
                         "stage into out_dir; choose a folder of its own, such as ~/dqnc-runs/NAME")


def _sha(path: Path) -> str | None:
    from dqnc.artifact import sha256_file

    try:
        return sha256_file(path) if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def _head(path: Path, n: int = 4096) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _legacy_report(path: Path) -> bool:
    """A report file as an earlier dqnc wrote it (before out_dirs carried a marker)."""
    from dqnc.limits import load_json_file

    if path.is_symlink() or not path.is_file():
        return False
    if path.name == "report.md":
        return _head(path).startswith("## dqnc run `")
    if path.name == "recipe.effective.yaml":
        return _head(path).startswith("# Effective recipe: ")
    try:
        data = load_json_file(path)
    except (OSError, ValueError, DqncError):
        return False
    return isinstance(data, dict) and all(k in data for k in ("recipe", "out_dir", "dqnc_version", "stages", "verdict"))


def _foreign_state_dir(d: Path) -> Path | None:
    if d.is_symlink() or not d.is_dir():
        return d
    try:
        entries = sorted(os.scandir(d), key=lambda e: e.name)
    except OSError:
        return d
    for e in entries:
        if e.is_symlink() or not e.is_file(follow_symlinks=False) or not (
                e.name in ("lock", "state.json") or _TEMP.match(e.name)):
            return Path(e.path)
    return None


class OutDir:
    """The out_dir of one run: what dqnc may replace in it, checked before anything is written."""

    def __init__(self, path: Path, recipe_path: Path, stage_dirs: list[str], checkpoint: str | None) -> None:
        self.path = Path(path)
        self.recipe_path = recipe_path
        self.stage_dirs = stage_dirs
        self.checkpoint = checkpoint
        self.marker: dict[str, Any] | None = None

    # -- reading

    def _read_marker(self) -> dict[str, Any] | None:
        from dqnc.limits import load_json_file

        m = self.path / MARKER
        if m.is_symlink() or not m.is_file():
            return None
        try:
            data = load_json_file(m, 1 << 20)
        except (OSError, ValueError, DqncError):
            return None
        if not isinstance(data, dict) or data.get("dqnc_out_dir") != 1 or not isinstance(data.get("files"), dict):
            return None
        return data

    def _foreign_legacy(self, entries: list[os.DirEntry]) -> Path | None:
        """The first entry of an unmarked out_dir an earlier dqnc did not write, or None."""
        from dqnc import artifact as art

        names = {e.name for e in entries}
        for e in entries:
            p = Path(e.path)
            if e.name == STATE_DIR:
                bad = _foreign_state_dir(p)
                if bad is not None:
                    return bad
            elif e.name in REPORT_FILES:
                if STATE_DIR not in names or not _legacy_report(p):
                    return p
            elif _TEMP.match(e.name) and not e.is_symlink():
                continue
            elif e.is_symlink() or not e.is_dir(follow_symlinks=False):
                return p
            elif e.name.endswith(".ckpt"):
                bad = art.foreign_checkpoint_entry(p)
                if bad is not None:
                    return bad
            else:
                bad = art.foreign_entry(p)
                if bad is not None:
                    return bad
        return None

    def _refuse(self, entry: Path, why: str = "which dqnc did not write") -> None:
        raise UsageError(f"out_dir {quote(self.path)} holds {quote(entry)}, {why}: move it away or choose another "
                         "out_dir; dqnc replaces only what it wrote there")

    def check(self) -> None:
        """Refuse the out_dir, or anything in it this run would replace, that is not dqnc's."""
        from dqnc import artifact as art

        check_out_dir_location(self.path)
        p = self.path
        if p.is_symlink() and not p.is_dir():
            raise UsageError(f"out_dir {quote(p)} is a broken symbolic link: choose another out_dir")
        if not p.exists():
            self.marker = None
            return
        if not p.is_dir():
            raise UsageError(f"out_dir {quote(p)} is an existing file: choose a directory path")
        try:
            entries = sorted(os.scandir(p), key=lambda e: e.name)
        except OSError as e:
            raise UsageError(f"cannot read out_dir {quote(p)}: {e.strerror}; choose a readable folder") from None
        marker = self._read_marker()
        state = p / STATE_DIR
        if state.exists() or state.is_symlink():  # the lock and state file are rewritten by every run
            bad = _foreign_state_dir(state)
            if bad is not None:
                self._refuse(bad)
        # An out_dir holding only a lock and dqnc's temporaries (a run that stopped at once) is new.
        if marker is None and any(e.name != STATE_DIR and not _TEMP.match(e.name) for e in entries):
            bad = self._foreign_legacy(entries)
            if bad is not None:
                self._refuse(bad)
            # Made by an earlier dqnc (no marker, everything in it dqnc's): adopted as it is.
            marker = {"files": {n: _sha(p / n) for n in REPORT_FILES if _sha(p / n) is not None}, "adopted": True}
        self.marker = marker
        if marker is None:
            return
        recorded = marker["files"]
        for name in REPORT_FILES:
            f = p / name
            if f.exists() or f.is_symlink():
                if name not in recorded:
                    self._refuse(f)
                if _sha(f) != recorded[name]:
                    self._refuse(f, "which changed since dqnc wrote it")
        for name in self.stage_dirs:
            d = p / name
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                self._refuse(d)
            if d.is_dir() and any(d.iterdir()):
                bad = art.foreign_entry(d)
                if bad is not None:
                    self._refuse(bad, art.foreign_why(d, bad))
                missing = art.missing_files(d)
                if missing:
                    raise UsageError(f"out_dir {quote(p)}: stage folder {quote(d)} is a damaged dqnc artifact "
                                     f"({quote(d / missing[0])} is missing): move it away or delete it to re-run the stage")
        if self.checkpoint is not None and ((p / self.checkpoint).exists() or (p / self.checkpoint).is_symlink()):
            bad = art.foreign_checkpoint_entry(p / self.checkpoint)
            if bad is not None:
                self._refuse(bad)

    # -- writing (under the out_dir's lock)

    def claim(self) -> None:
        """Write the marker: a new out_dir, or an earlier dqnc's adopted."""
        from dqnc import __version__
        from dqnc.artifact import utc_now

        old = self.marker or {}
        self.marker = {"dqnc_out_dir": 1, "recipe": os.path.abspath(self.recipe_path),
                       "created_utc": old.get("created_utc") or utc_now(),
                       "dqnc_version": old.get("dqnc_version") or __version__,
                       "files": dict(old.get("files") or {})}
        if old.get("adopted"):
            self.marker["adopted_utc"] = utc_now()
        elif "adopted_utc" in old:
            self.marker["adopted_utc"] = old["adopted_utc"]
        self._save()

    def _save(self) -> None:
        from dqnc.artifact import write_json_atomic

        assert self.marker is not None
        write_json_atomic(self.path / MARKER, self.marker)

    def before_write(self, name: str) -> None:
        """Refuse to replace report file ``name`` if it is not what dqnc last wrote there."""
        assert self.marker is not None
        f = self.path / name
        if f.exists() or f.is_symlink():
            if _sha(f) is None or _sha(f) != self.marker["files"].get(name):
                self._refuse(f, "which changed since dqnc wrote it")

    def wrote(self, *names: str) -> None:
        assert self.marker is not None
        for name in names:
            sha = _sha(self.path / name)
            if sha is not None:
                self.marker["files"][name] = sha
        self._save()
