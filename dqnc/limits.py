"""Resource limits for everything dqnc reads from a file it did not write.

A foreign model, a manifest or a recipe declares sizes (element counts, shapes, strides,
decompressed lengths, nesting depth) before dqnc allocates anything for them. Every reader checks
those declarations here first, so a 1 KB file cannot ask for 10 GB, and an exceeded limit is one
line naming the limit (exit 2), never a MemoryError (exit 3) or a machine swapping.

The limits are far above any Q-network dqnc handles (the Nature DQN has 1.7M parameters; an
Atari frame stack is 28k values) and far below what hurts a 2-core, 24 GB machine.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

from dqnc.errors import DqncError

MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024  # one tensor: 256 MB as float32
MAX_TOTAL_ELEMENTS = 256 * 1024 * 1024  # all tensors of one model: 1 GB as float32
MAX_ACTIVATION_ELEMENTS = 16 * 1024 * 1024  # one intermediate result for a batch of states
MAX_DECOMPRESSED_BYTES = 1024 * 1024 * 1024  # one member of a zip file
MAX_JSON_BYTES = 64 * 1024 * 1024  # a model config, a manifest, SB3's "data"
MAX_NESTING = 100  # JSON/YAML containers inside containers
MAX_YAML_ALIASES = 100  # YAML alias references in one document (alias bombs)
MAX_ECHO = 120  # characters of a user's value quoted in a message


# What zipfile raises for a damaged or unsupported archive (a member's compression it lacks is
# NotImplementedError, a truncated one EOFError): a reader turns these into one line, exit 2.
DAMAGED_ZIP = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, NotImplementedError)


class LimitError(DqncError):
    """A file declares more than dqnc will allocate for it, or nests deeper than it will parse."""


def clip(value: Any, limit: int = MAX_ECHO) -> str:
    """``value`` as text for a one-line message: at most ``limit`` characters."""
    text = str(value).replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def quote(path: Any) -> str:
    """A path for a one-line message, quoted: long enough to find it (300 characters)."""
    return repr(clip(path, 300))


def check_elements(shape: Any, what: str, limit: int = MAX_TENSOR_ELEMENTS, name: str = "") -> int:
    """The element count of ``shape``; refuse negative dims or more than ``limit`` elements
    (``name``: the limit's name in this module, for the message)."""
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise LimitError(f"{what}: shape {clip(tuple(dims))} has a negative dimension; the file is damaged")
    n = math.prod(dims)
    if n > limit:
        raise LimitError(f"{what}: shape {clip(tuple(dims))} declares {n:,} elements, over dqnc's limit of "
                         f"{limit:,} (dqnc.limits{'.' + name if name else ''}); this is not a Q-network dqnc can deploy")
    return n


class Budget:
    """A running total of elements across one model's tensors."""

    def __init__(self, what: str, limit: int = MAX_TOTAL_ELEMENTS) -> None:
        self.what, self.limit, self.used = what, limit, 0

    def take(self, shape: Any, name: str = "") -> int:
        n = check_elements(shape, f"{self.what}{': ' + name if name else ''}", name="MAX_TENSOR_ELEMENTS")
        self.used += n
        if self.used > self.limit:
            raise LimitError(f"{self.what}: its tensors declare over {self.limit:,} elements in all "
                             f"(dqnc.limits{'.MAX_TOTAL_ELEMENTS' if self.limit == MAX_TOTAL_ELEMENTS else ''}); "
                             "this is not a Q-network dqnc can deploy")
        return n


def check_depth(obj: Any, what: str, limit: int = MAX_NESTING) -> Any:
    """Refuse containers nested deeper than ``limit`` (iteratively: no recursion to overflow)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, dict):
            children: Any = x.values()
        elif isinstance(x, (list, tuple)):
            children = x
        else:
            continue
        if depth > limit:
            raise LimitError(f"{what}: nested more than {limit} levels deep (dqnc.limits); the file is damaged or hostile")
        stack.extend((c, depth + 1) for c in children)
    return obj


def _json_depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text, outside strings; linear, no recursion."""
    depth = best = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def loads_json(data: bytes | str, what: str, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_NESTING) -> Any:
    """``json.loads`` with a size and a nesting limit checked before parsing (Python's parser
    recurses: a few thousand levels raise RecursionError, an internal error)."""
    if len(data) > max_bytes:
        raise LimitError(f"{what}: {len(data):,} bytes of JSON, over dqnc's limit of {max_bytes:,} (dqnc.limits)")
    text = data.decode("utf-8", errors="replace") if isinstance(data, (bytes, bytearray)) else data
    if _json_depth(text) > max_depth:
        raise LimitError(f"{what}: JSON nested more than {max_depth} levels deep (dqnc.limits); the file is damaged or hostile")
    return json.loads(text)


def load_json_file(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file read with :func:`loads_json`'s limits, without reading more than ``max_bytes + 1``
    bytes (OSError, ValueError and LimitError propagate)."""
    with open(path, "rb") as f:
        return loads_json(f.read(max_bytes + 1), str(path), max_bytes=max_bytes)


def read_zip_member(zf: Any, name: str, what: str, limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """One member of an open ``zipfile.ZipFile``, refused before reading if it declares, or turns
    out to inflate to, more than ``limit`` bytes (a zip bomb can lie in its header)."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise LimitError(f"{what}: zip member {name!r} declares {info.file_size:,} bytes uncompressed, over dqnc's "
                         f"limit of {limit:,} (dqnc.limits)")
    out = bytearray()
    with zf.open(info) as f:
        while chunk := f.read(1 << 20):
            out += chunk
            if len(out) > limit:
                raise LimitError(f"{what}: zip member {name!r} inflates past dqnc's limit of {limit:,} bytes "
                                 "(dqnc.limits); the file is a zip bomb or damaged")
    return bytes(out)
