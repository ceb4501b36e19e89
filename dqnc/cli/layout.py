"""Output that reads at the console's width (80 in a CI log) and never cuts a value.

Messages wrap at words, a word longer than a line (a path) is kept whole. Tables keep every cell on
one line: when the table is wider than the console, the columns a table names as optional are
left out, least useful first, and a note says which; a column named ``wrap`` folds at spaces only;
if what is left is still wider, the table is printed at its own width rather than cut.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


def _breaks(plain: str, width: int) -> list[int]:
    """Offsets where lines start: before the first word that would overflow, never inside a word."""
    out: list[int] = []
    start = 0
    for m in re.finditer(r"\S+", plain):
        newline = plain.rfind("\n", start, m.start())
        if newline >= 0:
            start = newline + 1
        elif m.start() > start and m.end() - start > width:
            out.append(m.start())
            start = m.start()
    return out


def wrap_words(text: Text, width: int) -> Text:
    """``text`` with newlines at word boundaries so no line exceeds ``width`` (but a longer word)."""
    lines = text.divide(_breaks(text.plain, max(1, width)))
    for line in lines:
        line.rstrip()
    return Text("\n").join(lines)


def say(console: Console, text: str, *, style: str | None = None, markup: bool = False) -> None:
    """One message on ``console``, wrapped at words to its width."""
    t = Text.from_markup(text) if markup else Text(text)
    if style:
        t.stylize(style)
    console.print(wrap_words(t, console.width), soft_wrap=True)


def _needed(table: Table, cells: dict[str, list[str]], wrap: Sequence[str]) -> int:
    """The narrowest width at which ``table`` cuts nothing: its natural width (every cell on one
    line), less what its ``wrap`` columns can give by folding at spaces down to their longest word.
    (Rich's own minimum treats every column as foldable.)"""
    natural = Console(width=10**5, file=io.StringIO()).measure(table).maximum
    give = 0
    for head in wrap:
        texts = [Text.from_markup(c).plain for c in cells.get(head, [])]
        if texts:
            give += max(map(len, texts)) - max(len(w) for t in texts for w in (t.split() or [""]))
    return natural - give


def table(console: Console, heads: Sequence[str], rows: Sequence[Sequence[str]], *, optional: Sequence[str] = (),
          wrap: Sequence[str] = (), left: Sequence[str] = (), styles: dict[str, str] | None = None,
          markup: bool = False, dropped_note: str = "every figure is in --json", **table_args: Any) -> list[str]:
    """Print ``rows`` under ``heads`` (cells taken literally, or as Rich markup with ``markup``);
    return the columns left out.

    ``optional`` columns, least useful first, are left out while the table is wider than the
    console; ``wrap`` columns fold at spaces (never inside a word); ``left`` columns are left-
    justified (the others right-justified, as numbers are)."""
    dropped: list[str] = []

    def build() -> tuple[Table, int]:
        t = Table(**table_args)
        keep = [i for i, h in enumerate(heads) if h not in dropped]
        for i in keep:
            h = heads[i]
            t.add_column(h, no_wrap=h not in wrap, overflow="fold", style=(styles or {}).get(h),
                         justify="left" if h in left else "right")
        for row in rows:
            t.add_row(*(row[i] if markup else Text(row[i]) for i in keep))
        cells = {heads[i]: [heads[i], *(row[i] if markup else escape(row[i]) for row in rows)] for i in keep}
        return t, _needed(t, cells, [h for h in wrap if h not in dropped])

    t, needed = build()
    for name in optional:
        if needed <= console.width:
            break
        dropped.append(name)
        t, needed = build()
    console.print(t, width=max(console.width, needed), crop=False)
    if dropped:
        say(console, f"(left out at {console.width} columns: {', '.join(dropped)}; {dropped_note})", style="dim")
    return dropped
