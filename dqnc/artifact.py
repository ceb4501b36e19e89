"""Artifacts: a directory holding a model plus ``manifest.json``, written atomically.

Layout::

    OUT/
      model/            SavedModel (fp32 and pruned policies)
      model.tflite      (quantized policies)
      manifest.json     what made it, from what, with which settings, and every file's sha256

Writes go to a hidden sibling directory that is renamed into place only when complete, so an
interrupted stage never leaves a half artifact, and an existing output is replaced (with
``--force``) only after its successor is complete.

``--force`` replaces only a folder dqnc made: a manifest in dqnc's format whose ``files`` checksums
match the folder exactly (nothing extra, nothing missing, nothing changed). Any other folder is
the user's, whatever it holds, and is refused naming the first file dqnc did not write.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from dqnc import __version__, limits
from dqnc.envs import EnvSpec
from dqnc.errors import ArtifactError, DqncError, OutputExistsError, UsageError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"
TFLITE = "model.tflite"
SUMS = "SHA256SUMS"  # export's checksum list, written after the manifest (it covers the manifest too)
MANIFEST_KEYS = ("format_version", "dqnc_version", "stage", "env", "files")

_VERSIONED = ("numpy", "tensorflow", "tf-keras", "tensorflow-model-optimization", "gymnasium",
              "ai-edge-litert", "tflite-runtime", "box2d")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, keyed by POSIX relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p != root / MANIFEST:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "dqnc": __version__, "platform": platform.platform()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _plain_rel(rel: str) -> bool:
    """A manifest's file key as dqnc writes it: relative, POSIX, no '..' (never outside the folder)."""
    return bool(rel) and not rel.startswith("/") and "\\" not in rel and all(
        part not in ("", ".", "..") for part in rel.split("/"))


def dqnc_manifest(root: Path) -> dict[str, Any] | None:
    """``root/manifest.json`` when it is in dqnc's format (a JSON object with dqnc's keys and a
    ``files`` table of sha256s), else None. Bounded: a huge or deep file is simply not dqnc's."""
    m = root / MANIFEST
    try:
        if m.is_symlink() or not m.is_file():
            return None
        data = limits.load_json_file(m)
    except (OSError, ValueError, DqncError):
        return None
    if not isinstance(data, dict) or any(k not in data for k in MANIFEST_KEYS):
        return None
    files = data["files"]
    if (not isinstance(data["format_version"], int) or not isinstance(data["dqnc_version"], str)
            or not isinstance(data["stage"], str) or not isinstance(data["env"], dict) or not isinstance(files, dict)
            or not all(isinstance(k, str) and _plain_rel(k) and isinstance(v, str) for k, v in files.items())):
        return None
    return data


def _sums_text(root: Path, files: dict[str, str]) -> str:
    """SHA256SUMS for ``files`` plus the manifest, as ``sha256sum -c`` reads it."""
    sums = dict(files, **{MANIFEST: sha256_file(root / MANIFEST)})
    return "".join(f"{d}  {f}\n" for f, d in sorted(sums.items()))


def write_sums(root: Path) -> None:
    """Write ``root/SHA256SUMS`` over every file and the manifest (after :func:`write_manifest`)."""
    (root / SUMS).write_text(_sums_text(root, file_checksums(root)), encoding="utf-8")


def foreign_entry(root: Path) -> Path | None:
    """The first path under the directory ``root`` that dqnc did not write, or None when ``root``
    is exactly a dqnc artifact: its manifest in dqnc's format, every other file listed in the
    manifest's ``files`` with that sha256 (export's SHA256SUMS when it matches them), none missing.
    A symlink, a device or an unreadable folder is never dqnc's. Empty folders are ignored."""
    root = Path(root)
    manifest = dqnc_manifest(root)
    files: dict[str, str] = dict(manifest["files"]) if manifest is not None else {}
    first_dir: Path | None = None
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return d
        subdirs = []
        for e in entries:
            p = Path(e.path)
            rel = p.relative_to(root).as_posix()
            if e.is_symlink():
                return p
            if e.is_dir(follow_symlinks=False):
                subdirs.append(p)
                first_dir = first_dir or p
                continue
            if not e.is_file(follow_symlinks=False):
                return p
            if rel == MANIFEST:
                continue
            if manifest is not None and rel == SUMS and SUMS not in files:
                try:
                    if p.read_text(encoding="utf-8") == _sums_text(root, files):
                        continue
                except (OSError, UnicodeDecodeError):
                    pass
                return p
            expected = files.get(rel)
            try:
                if expected is None or sha256_file(p) != expected:
                    return p
            except OSError:
                return p
        stack.extend(reversed(subdirs))
    if manifest is None:
        return root / MANIFEST if (root / MANIFEST).exists() else (first_dir or root)
    return None


def missing_files(root: Path) -> list[str]:
    """Files a dqnc manifest lists that are absent (a damaged artifact)."""
    manifest = dqnc_manifest(root) or {"files": {}}
    return [rel for rel in manifest["files"] if not (root / rel).is_file()]


def owned_by_dqnc(root: Path) -> bool:
    """True when ``root`` is a complete, unchanged dqnc artifact (the only folder --force replaces)."""
    return Path(root).is_dir() and foreign_entry(root) is None and not missing_files(root)


CHECKPOINT_FILES = ("state.json", "buffer.npz", "best.npz")


def foreign_checkpoint_entry(path: Path) -> Path | None:
    """The first entry of a training checkpoint folder that dqnc's checkpoint writer did not make
    (``state.json`` naming a checkpoint version and config, ``buffer.npz``, ``best.npz``, ``tf/ckpt.*``),
    or None. A checkpoint is deleted after training finishes; only such a folder may be."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return path
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        for e in entries:
            p = Path(e.path)
            if e.is_symlink():
                return p
            if e.name == "tf" and e.is_dir(follow_symlinks=False):
                for t in sorted(os.scandir(p), key=lambda t: t.name):
                    if t.is_symlink() or not t.is_file(follow_symlinks=False) or not (
                            t.name.startswith("ckpt.") or t.name == "checkpoint"):
                        return Path(t.path)
                continue
            if e.name not in CHECKPOINT_FILES or not e.is_file(follow_symlinks=False):
                return p
        if not entries:
            return None
        state = path / "state.json"
        if not state.is_file():
            return Path(entries[0].path)
        meta = limits.load_json_file(state)
    except (OSError, ValueError, DqncError):
        return path / "state.json"
    if not isinstance(meta, dict) or "version" not in meta or not isinstance(meta.get("config"), dict):
        return path / "state.json"
    return None


def foreign_why(root: Path, foreign: Path) -> str:
    """How ``foreign`` (found by ``foreign_entry(root)``) differs from what dqnc wrote."""
    manifest = dqnc_manifest(root)
    try:
        rel = foreign.relative_to(root).as_posix()
    except ValueError:
        rel = ""
    if manifest is not None and rel in manifest["files"] and not foreign.is_symlink():
        return "which changed since dqnc wrote it"
    return "which dqnc did not write"


def foreign_message(out: Path, foreign: Path) -> str:
    why = foreign_why(out, foreign)
    what = "" if "changed" in why else " (not a dqnc artifact)"
    return (f"output {limits.quote(out)} holds {limits.quote(foreign)}, {why}{what}: choose another output path; --force only "
            "replaces folders dqnc made, unchanged")


def check_output(out: Path, force: bool) -> None:
    """Refuse an output that would destroy something, before any work starts: an existing output
    is replaced only with --force, and only when it is exactly a folder dqnc made."""
    if out.is_symlink():
        raise OutputExistsError(f"output {limits.quote(out)} is a symbolic link: choose another output path")
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"output {limits.quote(out)} exists and is a file, not a directory: choose another output path")
    if out.is_dir() and not _is_empty_dir(out):
        foreign = foreign_entry(out)
        if foreign is not None:
            raise OutputExistsError(foreign_message(out, foreign))
        missing = missing_files(out)
        if missing:
            raise OutputExistsError(
                f"output {limits.quote(out)} is a damaged dqnc artifact ({limits.quote(out / missing[0])} is missing): choose another "
                "output path, or delete the folder yourself")
        if not force:
            raise OutputExistsError(f"output {limits.quote(out)} already exists: pass --force to replace it")
    ensure_writable_dir(out.resolve().parent, "output folder")


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed and make sure dqnc may write in it, before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {what} {str(path)!r}: {e.strerror}; choose a writable path") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"{what} {str(path)!r} is not writable: choose a writable path")


@contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out`` in one rename."""
    out = Path(out)
    check_output(out, force)
    parent = out.resolve().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an artifact gets the usual permissions
    except OSError as e:
        raise UsageError(f"cannot write in {str(parent)!r}: {e.strerror}; choose a writable path") from e
    try:
        yield tmp
        check_output(out, force)  # again: the folder may have changed while the stage ran
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, out: Path) -> None:
    if out.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
        old.rmdir()
        os.rename(out, old)
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no Infinity or NaN (Python's encoder
    writes them anyway, and strict parsers such as jq reject the file). A confidence interval
    over one episode is unbounded, for one."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(root: Path, *, stage: str, env: EnvSpec, network: dict[str, Any], config: dict[str, Any],
                   metrics: dict[str, Any], parent: Artifact | None = None, command: list[str] | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``root/manifest.json`` covering every file already in ``root``."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "dqnc_version": __version__,
        "stage": stage,
        "created_utc": utc_now(),
        "parent": None if parent is None else {"path": str(parent.path), "sha256": parent.sha256, "stage": parent.stage},
        "env": env.to_dict(),
        "network": network,
        "config": config,
        "metrics": metrics,
        **(extra or {}),
        "versions": library_versions(),
        "command": shlex.join(command if command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "files": file_checksums(root),
    }
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


@dataclass
class Artifact:
    """A loaded, verified artifact (or a plain SavedModel adopted with an explicit env)."""

    path: Path
    manifest: dict[str, Any]
    env: EnvSpec
    kind: str  # "savedmodel" | "tflite"
    model_path: Path
    sha256: str = ""

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage", "external"))

    @property
    def network(self) -> dict[str, Any]:
        return dict(self.manifest.get("network") or {})

    @property
    def outputs(self) -> str:
        """What the model outputs: ``q_values`` (trained or imported), ``centered_q_values`` (Q minus
        its per-state mean: an integer model of a Q-network), or ``action_scores`` (a distilled
        student: only the ranking of actions is meaningful, not the values)."""
        pre = self.manifest.get("preprocess") or {}
        return str(pre.get("outputs") or self.network.get("outputs") or "q_values")


def _is_savedmodel(path: Path) -> bool:
    return path.is_dir() and ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file())


def load(path: str | Path, env: EnvSpec | None = None, verify: bool = True) -> Artifact:
    """Load an artifact directory, a bare tf_keras SavedModel (needs ``env``), or a ``.tflite`` file
    (needs ``env``). A model made elsewhere (ONNX, SB3, CleanRL, Keras 3) is opened by
    :func:`dqnc.sources.load`, which imports it first."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"{str(p)!r} does not exist: check the path")
    if p.is_dir() and (p / MANIFEST).is_file():
        return _load_artifact_dir(p, env, verify)
    if _is_savedmodel(p):
        if p.name == MODEL_DIR and (p.parent / MANIFEST).is_file():
            return _load_artifact_dir(p.parent, env, verify)
        if env is None:
            raise UsageError(f"{str(p)!r} is a SavedModel without a dqnc manifest: pass --env ENV_ID to say which env it acts in")
        return Artifact(p, {"stage": "external"}, env, "savedmodel", p, sha256=dir_digest(p))
    if p.is_file() and p.suffix == ".tflite":
        if env is None:
            raise UsageError(f"{str(p)!r} is a .tflite file without a dqnc manifest: pass --env ENV_ID")
        return Artifact(p, {"stage": "external"}, env, "tflite", p, sha256=sha256_file(p))
    if p.is_dir():
        raise ArtifactError(
            f"{str(p)!r} is neither a dqnc artifact (no manifest.json) nor a SavedModel (no saved_model.pb): "
            "point at the directory a dqnc stage wrote, or at a Keras SavedModel"
        )
    raise ArtifactError(f"{str(p)!r} is not a model dqnc can read: expected an artifact directory, a SavedModel or a .tflite file")


def dir_digest(root: Path) -> str:
    h = hashlib.sha256()
    for rel, digest in file_checksums(root).items():
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def _load_artifact_dir(root: Path, env: EnvSpec | None, verify: bool) -> Artifact:
    raw = (root / MANIFEST).read_bytes()
    try:
        manifest = limits.loads_json(raw, str(root / MANIFEST))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{root / MANIFEST}: not valid JSON ({e}); the artifact is damaged: re-create it") from None
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{root / MANIFEST}: format_version {version!r} is not supported by dqnc {__version__} "
            f"(reads up to {FORMAT_VERSION}): upgrade dqnc"
        )
    for key in ("stage", "env", "files"):
        if key not in manifest:
            raise ArtifactError(f"{root / MANIFEST}: missing required key {key!r}; the artifact is damaged: re-create it")
    if verify:
        verify_checksums(root, manifest)
    try:
        spec = EnvSpec.from_dict(manifest["env"])
    except TypeError as e:
        raise ArtifactError(f"{root / MANIFEST}: malformed 'env' entry ({e}); re-create the artifact") from None
    if env is not None and env.id != spec.id:
        raise UsageError(f"--env {env.id!r} disagrees with the artifact's env {spec.id!r}: drop --env or fix it")
    if (root / TFLITE).is_file():
        kind, model_path = "tflite", root / TFLITE
    elif _is_savedmodel(root / MODEL_DIR):
        kind, model_path = "savedmodel", root / MODEL_DIR
    else:
        raise ArtifactError(f"{str(root)!r} holds a manifest but no model ({MODEL_DIR}/ or {TFLITE}): re-create the artifact")
    return Artifact(root, manifest, spec, kind, model_path, sha256=hashlib.sha256(raw).hexdigest())


def verify_checksums(root: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{root / MANIFEST}: no file checksums recorded; re-create the artifact")
    for rel, expected in files.items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"{str(root)!r}: file {rel!r} listed in the manifest is missing; the artifact is incomplete: re-create it")
        actual = sha256_file(f)
        if actual != expected:
            raise ArtifactError(
                f"{str(root)!r}: checksum mismatch for {rel!r} (manifest {expected[:12]}..., file {actual[:12]}...): "
                "the file was modified or corrupted; re-create the artifact"
            )
