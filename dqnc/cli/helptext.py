"""``--help`` that reads at any width: Typer's Rich panels on a wide terminal, plain text elsewhere.

Typer draws options as a Rich table that shrinks its columns to the console and cuts what does not
fit (``--target-update-inte…`` at 80 columns, and CI logs are read at 80 when stdout is not a
terminal). The plain layout is click's: each option on its line, its help wrapped at words below
or beside it, nothing cut; options are grouped by their Rich panel (Options, More options) and
every command's whole first paragraph is listed, as the Rich layout does.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import click
from rich.text import Text
from typer.core import MARKUP_MODE_KEY, TyperCommand, TyperGroup

RICH_MIN_COLUMNS = 110  # the room Typer's panels need for dqnc's longest flags (tests/test_render80.py)


def rich_fits() -> bool:
    """Whether Typer's Rich panels have room: the width they would be drawn at (TERMINAL_WIDTH,
    COLUMNS, the terminal's, else 80 as in a CI log) is at least RICH_MIN_COLUMNS."""
    width = os.environ.get("TERMINAL_WIDTH", "")
    return (int(width) if width.isdigit() else shutil.get_terminal_size().columns) >= RICH_MIN_COLUMNS


def _plain(text: str | None) -> str:
    """Help text as shown: Rich markup applied (escapes undone, styles dropped), lines joined."""
    return " ".join(Text.from_markup(text or "").plain.split())


def _first_paragraph(text: str | None) -> str:
    return _plain((text or "").strip().split("\n\n")[0])


def _records(cmd: click.Command, ctx: click.Context) -> tuple[list[tuple[str, str]], dict[str, list[tuple[str, str]]]]:
    """(arguments, {panel: options}) as (name and type, help) pairs, panels in first-seen order."""
    ctx.ensure_object(dict)
    if isinstance(ctx.obj, dict):
        ctx.obj[MARKUP_MODE_KEY] = "rich"  # Typer then escapes its own [default: ...] texts
    args: list[tuple[str, str]] = []
    panels: dict[str, list[tuple[str, str]]] = {}
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        row = (record[0], _plain(record[1]))
        if param.param_type_name == "argument":
            args.append(row)
        else:
            panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(row)
    return args, panels


def format_plain(cmd: click.Command, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    cmd.format_usage(ctx, formatter)
    if cmd.help:
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(_plain(cmd.help))
    args, panels = _records(cmd, ctx)
    for title, rows in ([("Arguments", args)] if args else []) + list(panels.items()):
        with formatter.section(title):
            formatter.write_dl(rows)
    if isinstance(cmd, click.Group) or hasattr(cmd, "commands"):
        rows = [(name, _first_paragraph(sub.help)) for name, sub in getattr(cmd, "commands", {}).items()
                if not sub.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
    if cmd.epilog:
        formatter.write_paragraph()
        formatter.write_text(_plain(cmd.epilog))


class Command(TyperCommand):
    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> Any:
        if rich_fits():
            return super().format_help(ctx, formatter)
        format_plain(self, ctx, formatter)


class Group(TyperGroup):
    command_class = Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and self.no_args_is_help and not ctx.resilient_parsing and not rich_fits():
            # Typer shows this help as a side effect of drawing it with Rich; plain text is printed here,
            # with the exit code Typer gives (2).
            click.echo(ctx.get_help(), color=ctx.color)
            ctx.exit(2)
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> Any:
        if rich_fits():
            return super().format_help(ctx, formatter)
        format_plain(self, ctx, formatter)
