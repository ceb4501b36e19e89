"""The one YAML reader: every recipe, config file, ``--set``, ``--grid`` and option value goes through it.

- Safe loading only (plain mappings, lists and scalars; no Python tags).
- YAML 1.2 booleans: only ``true``/``false`` (any case) are booleans. YAML 1.1's ``on``/``off``/
  ``yes``/``no``/``y``/``n`` stay strings, so ``sparse_encoding: off`` means the option value
  ``"off"`` as documented, in files and in ``--set`` alike.
- Bounded: at most ``limits.MAX_YAML_ALIASES`` alias references, nesting at most
  ``limits.MAX_NESTING`` deep, and at most ``MAX_NODES`` nodes once aliases are expanded (an alias
  bomb composes cheaply and explodes only when something walks it: pydantic, JSON, a hash).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from dqnc.errors import ConfigError
from dqnc.limits import MAX_NESTING, MAX_YAML_ALIASES

MAX_NODES = 20_000  # a recipe or config is small; "billion laughs" stops here
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and caps on aliases and nesting while composing."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise ConfigError(f"line {mark.line + 1}: more than {MAX_YAML_ALIASES} YAML aliases (an alias bomb?): "
                                  "write the values out")
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                raise ConfigError(f"line {mark.line + 1}: YAML nested more than {MAX_NESTING} levels deep: flatten it")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


for _first in "tTfF":
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list(_first))


def expanded_size(node: Any) -> int:
    """Nodes in ``node`` with every alias expanded, computed without expanding (memoized)."""
    sizes: dict[int, int] = {}
    order: list[Any] = []
    stack = [node]
    while stack:  # iterative post-order: children sized before parents
        n = stack.pop()
        if id(n) in sizes:
            continue
        kids = _children(n)
        pending = [k for k in kids if id(k) not in sizes]
        if pending:
            stack.append(n)
            stack.extend(pending)
            continue
        sizes[id(n)] = min(1 + sum(sizes[id(k)] for k in kids), 1 << 62)
        order.append(n)
    return sizes[id(node)]


def _children(n: Any) -> list[Any]:
    if isinstance(n, yaml.MappingNode):
        return [x for kv in n.value for x in kv]
    if isinstance(n, yaml.SequenceNode):
        return list(n.value)
    return []


def compose(text: str) -> Any:
    """YAML text to a node tree, bounded; raises ``ConfigError`` (messages start 'line N:')
    or ``yaml.YAMLError`` for syntax errors."""
    loader = Loader(text)
    try:
        node = loader.get_single_node()
    finally:
        loader.dispose()
    if node is not None and expanded_size(node) > MAX_NODES:
        raise ConfigError(f"line {node.start_mark.line + 1}: the YAML expands to more than {MAX_NODES:,} YAML nodes "
                          "(an alias bomb?): write it out without nested aliases")
    return node


def compose_file(text: str, path: Any, construct_too: bool = False) -> Any:
    """:func:`compose` (and with ``construct_too``, :func:`construct`) for a file's text: every
    error a ``ConfigError`` naming ``path:line``."""
    try:
        node = compose(text)
        return construct(node) if construct_too else node
    except ConfigError as e:  # "line N: ..." from the caps above
        raise ConfigError(f"{path}:{str(e).removeprefix('line ')}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the YAML") from None


def construct(node: Any) -> Any:
    """A composed node as plain Python data (the node tree is already bounded)."""
    if node is None:
        return None
    loader = Loader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load(text: str) -> Any:
    """Bounded safe loading of one YAML document; errors as for :func:`compose`."""
    return construct(compose(text))


def scalar(text: str) -> Any:
    """A value given on the command line, read as YAML (``[16,16]``, ``0.5``, ``off``); text that
    is not valid YAML stays the text itself."""
    try:
        return load(text)
    except yaml.YAMLError:
        return text
