"""Whatever model a user points at, as an artifact: a dqnc artifact, a bare tf_keras SavedModel or
``.tflite`` (with an env), or a model made elsewhere (Keras 3, ONNX, SB3, CleanRL), imported once
into the import cache and verified (:func:`dqnc.importers.adopt`).

Commands and recipe sources open models here; :func:`dqnc.artifact.load` reads dqnc's own files
only, so the artifact module never depends on the importers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dqnc import artifact as art
from dqnc.envs import EnvSpec
from dqnc.errors import UsageError


def foreign_format(p: Path) -> str | None:
    """The importer format of a model dqnc did not write, or None. A tf_keras SavedModel (it has
    ``keras_metadata.pb``) is read directly, as data (:mod:`dqnc.savedmodel`)."""
    if p.is_dir() and ((p / art.MANIFEST).is_file() or (p / "keras_metadata.pb").is_file()
                       or (p.name == art.MODEL_DIR and (p.parent / art.MANIFEST).is_file())
                       or not (p / "saved_model.pb").is_file() or (p / "saved_model.pb").stat().st_size == 0):
        return None
    if p.is_file() and p.suffix == ".tflite":
        return None
    from dqnc.importers import sniff

    return sniff(p)


def load(path: str | Path, env: EnvSpec | None = None, verify: bool = True,
         log: Callable[[str], None] | None = None) -> art.Artifact:
    """Open ``path`` as an artifact, importing a foreign model (once) where that is what it is."""
    p = Path(path)
    if p.exists():
        fmt = foreign_format(p)
        if fmt is not None:
            if env is None:
                raise UsageError(f"{str(p)!r} is a {fmt} model without a dqnc manifest: pass --env ENV_ID to say which "
                                 "env it acts in (or run `dqnc import` first)")
            from dqnc.importers import adopt

            return adopt(p, env, log=log)
    return art.load(p, env, verify)
