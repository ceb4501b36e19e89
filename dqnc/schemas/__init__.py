"""JSON Schemas (draft 2020-12) of what dqnc writes for other programs: ``manifest.json`` and the
one object each command prints with ``--json``. The ``*.json`` files beside this module are the
schemas; ``tests/test_schemas.py`` validates real outputs against them, so they cannot drift
unnoticed. ``dqnc schema NAME`` prints one.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from dqnc.errors import UsageError


def names() -> list[str]:
    """The schemas shipped: ``manifest`` and one per command with ``--json``."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load(name: str) -> dict[str, Any]:
    """The schema called ``name`` (``manifest``, ``eval``, ``run``, ...)."""
    if name not in names():
        raise UsageError(f"no schema {name!r}: pick one of {', '.join(names())}")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8"))
