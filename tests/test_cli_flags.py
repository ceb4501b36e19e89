"""Every stage flag is its config field: same bounds, same choices, its default shown; command
bodies stay thin; the README's commands table names flags that exist."""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import annotated_types
import pytest
import typer.main
from typer.testing import CliRunner

from dqnc import config
from dqnc.cli import app, options

ROOT = Path(__file__).resolve().parents[1]
COMMAND_CONFIGS = {"train": config.TrainConfig, "prune": config.PruneConfig, "distill": config.DistillConfig,
                   "quantize": config.QuantizeConfig, "export": config.ExportConfig, "import": config.ImportConfig,
                   "eval": config.EvalConfig}


def _fields(cls):
    for name, field in cls.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, config.BaseModel):
            yield from _fields(field.annotation)
        else:
            yield name, field


def _params(command):
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


CASES = [(cmd, name, field) for cmd, cls in sorted(COMMAND_CONFIGS.items()) for name, field in _fields(cls)]


def _field_bounds(field):
    found = {}
    for m in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, key.capitalize())):
                found[key] = getattr(m, key)
    return found


@pytest.mark.parametrize(("command", "name", "field"), CASES, ids=[f"{c}--{n}" for c, n, _ in CASES])
def test_flag_bounds_and_choices_are_the_config_fields(command, name, field):
    param = _params(command)[name]
    info = param.type_descriptor.parameter_info
    parser = info.parser
    bounds = {k: getattr(parser, k) for k in ("ge", "gt", "le", "lt") if getattr(parser, k) is not None} \
        if isinstance(parser, options.Bounds) else {}
    expected = _field_bounds(field)
    cli_type = param.type_descriptor.annotation
    if cli_type in (int, float):  # a number on the command line carries the field's bounds exactly
        assert bounds == expected, f"dqnc {command} --{name}: bounds {bounds} != config {expected}"
        if expected:
            assert parser.kind is cli_type
    else:
        assert not bounds
    # A Literal (or Literal | None) field is a choice of exactly its values.
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    literal = field.annotation if typing.get_origin(field.annotation) is typing.Literal else \
        args[0] if len(args) == 1 and typing.get_origin(args[0]) is typing.Literal else None
    if literal is not None:
        assert isinstance(parser, options.Choices) and parser.values == typing.get_args(literal)


def test_bounds_refuse_what_the_config_refuses():
    runner = CliRunner()
    # --rl-steps: the config allows 100 (the hand-written flag said 1000); --lr: 0 is excluded (gt=0).
    assert _params("prune")["rl_steps"].type_descriptor.parameter_info.parser(100) == 100
    for args in (["prune", "x", "--rl-steps", "99"], ["train", "--env", "CartPole-v1", "--lr", "0"],
                 ["eval", "x", "--max-size-kb", "0"], ["quantize", "x", "--weight-bits", "3"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "Invalid value" in r.output, (args, r.output)


def _help(command, monkeypatch):
    """--help at 200 columns without a TTY, as {flag: its row's text, wrapped lines joined}."""
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    r = CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0, r.output
    rows: dict[str, str] = {}
    flag = None
    for line in r.output.splitlines():
        m = re.match(r"│ \*? *(--[a-z][a-z0-9-]*)", line)  # "*": a required option
        if m:
            flag = m.group(1)
            rows[flag] = ""
        elif not line.startswith("│ "):
            flag = None
        if flag:
            rows[flag] += " " + line.strip("│ ")
    return rows


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_help_shows_every_default_and_choice(command, monkeypatch):
    rows = _help(command, monkeypatch)
    for name, field in _fields(COMMAND_CONFIGS[command]):
        flag = _params(command)[name].opts[0]
        assert flag in rows, f"dqnc {command} --help lacks {flag}"
        if field.is_required() or field.get_default(call_default_factory=True) in (None, {}):
            continue
        assert "[default: " in rows[flag], f"dqnc {command} {flag}: no default in {rows[flag]!r}"


def test_hand_written_defaults_survive_rich_markup(monkeypatch):
    assert "[default: runs/ENV-seedSEED]" in _help("train", monkeypatch)["--out"]
    assert "[default: PATH-bundle]" in _help("export", monkeypatch)["--out"]
    assert "[default: a local one with this machine's cores]" in _help("sweep", monkeypatch)["--address"]


def test_no_command_body_is_over_40_lines():
    long = []
    for path in (ROOT / "dqnc" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and path.name == "commands.py" and node.col_offset == 0:
                lines = node.end_lineno - node.body[0].lineno + 1
                if lines > 40:
                    long.append((node.name, lines))
    assert not long, f"command bodies over 40 lines: {long}"


def test_readme_commands_table_flags_exist():
    readme = (ROOT / "README.md").read_text()
    rows = [ln for ln in readme.splitlines() if ln.startswith("| `dqnc ")]
    assert len(rows) >= 10
    group = typer.main.get_command(app)
    checked = 0
    for row in rows:
        command = re.match(r"\| `dqnc (\w+)", row).group(1)
        if command == "recipe":
            continue
        known = {o for p in group.commands[command].params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", row):
            assert flag in known, f"README names dqnc {command} {flag}, which does not exist"
            checked += 1
    assert checked >= 20
