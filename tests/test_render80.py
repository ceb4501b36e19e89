"""80 columns without a TTY (a CI log): every table dqnc prints and every command's --help fit
80 columns, reflow or leave columns out (and say so), and never cut a value."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dqnc.cli import app, render
from dqnc.cli.helptext import RICH_MIN_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "cartpole"
COMMANDS = [[c] for c in ("train", "prune", "quantize", "export", "import", "distill", "run", "sweep", "eval",
                          "inspect", "version", "recipe")] + [["recipe", "validate"], ["recipe", "schema"], []]


@pytest.fixture
def out(monkeypatch) -> io.StringIO:
    """render's stdout as a CI log: 80 columns, not a terminal."""
    buf = io.StringIO()
    console = Console(file=buf, width=80, highlight=False)
    assert not console.is_terminal
    monkeypatch.setattr(render, "stdout", console)
    return buf


def _assert_uncut(text: str, heads: list[str], rows: list[list[str]]) -> None:
    """No ellipsis, no line over 80, and every word of every cell printed whole, unless its
    column was left out and the note names it."""
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    left_out = re.search(r"\(left out at 80 columns: ([^;]+);", text)
    dropped = left_out.group(1).split(", ") if left_out else []
    assert set(dropped) <= set(heads), dropped
    words = set(text.split())
    for row in rows:
        for head, cell in zip(heads, row):
            if head in dropped:
                continue
            for word in re.sub(r"\[/?[a-z ]+\]", "", cell).split():  # markup is not printed
                assert word in words, f"{head}: {word!r} of {cell!r} is cut in\n{text}"


def _sweep_result(tmp_path: Path) -> SimpleNamespace:
    from dqnc import sweep

    trials = []
    for i, (sets, size) in enumerate([(["student.hidden=[16,16]", "int8.weight_bits=4"], 2_832),
                                      (["student.hidden=[64,64]", "int8.mode=int16x8"], 1_234_567),
                                      (["student.hidden=[8,8]"], 1_010)]):
        trials.append({"id": f"t{i:03d}-a1b2c3", "sets": sets, "status": ["passed", "failed", "error"][i],
                       "seconds": 123.4, "stages": {"ran": 3, "cached": 1},
                       "metrics": {} if i == 2 else {"precision": "int16x8" if i else "int8", "size_bytes": size,
                                                     "mean_return": 500.0, "return_ci95": [499.5, 500.5],
                                                     "regret": 0.0123, "agreement": 0.99876,
                                                     "decisive_agreement": 1.0, "latency_p50_us": 12345.6}})
    result = sweep.SweepResult(str(tmp_path / "recipes" / "cartpole.yaml"), tmp_path / "sweep", trials, [trials[0]["id"]],
                               321.0, 0, extra={"ray": {"version": "2.49.0", "cpus": 2,
                                                        "address": "a local instance started for this sweep"}})
    return SimpleNamespace(result=result, table=sweep.table(result))


def test_sweep_table_fits_80_columns_says_where_ray_ran_and_cuts_nothing(out, tmp_path) -> None:
    s = _sweep_result(tmp_path)
    render.sweep(s.result, "recipes/cartpole.yaml", tmp_path / "sweep", as_json=False)
    text = out.getvalue()
    _assert_uncut(text, *s.table)
    for value in ("2,832", "1,234,567", "500.0±0.5", "student.hidden=[64,64]"):
        assert value in text  # the cut values: '2,83', '500.0±0.'
    assert "on Ray 2.49.0, a local instance started for this sweep (2 CPUs)" in " ".join(text.split())


def _run_report() -> dict:
    from dqnc import recipe

    m = {"precision": "int8", "size_bytes": 1_070_880, "mean_return": 500.0, "return_ci95": [499.0, 501.0],
         "regret": 0.0012, "agreement": 0.9987, "decisive_agreement": 0.995, "decisive_share": 0.123,
         "latency_p50_us": 1234.5}
    rows = [recipe.StageRow("source", "source", "sample_models/cartpole", "loaded",
                            metrics={**m, "precision": "fp32", "fp32_tflite_bytes": 70_880}),
            recipe.StageRow("a-long-student-name", "distill", "runs/x/student", "ran", 12.0, dict(m)),
            recipe.StageRow("int8", "quantize", "runs/x/int8", "cached", 0.0, dict(m))]
    return recipe.RunReport("recipes/cartpole.yaml", "runs/cartpole", rows, [], 42.0).to_dict()


def test_run_report_table_fits_80_columns(out) -> None:
    from dqnc import recipe

    d = _run_report()
    render.report(d, SimpleNamespace(out_dir=Path(d["out_dir"])), as_json=False)
    rep = recipe.RunReport(d["recipe"], d["out_dir"], [recipe.StageRow(**r) for r in d["stages"]], [], 42.0)
    _assert_uncut(out.getvalue(), ["name"] + [c[0] for c in recipe.COLUMNS] + ["status"], recipe.table_rows(rep))


def test_a_table_too_wide_for_80_columns_leaves_out_columns_and_says_so(out) -> None:
    from dqnc.cli import layout

    heads = ["name", "a", "b", "c"]
    rows = [["x" * 30, "y" * 20, "z" * 20, "w" * 20]]
    assert layout.table(render.stdout, heads, rows, optional=("c", "b")) == ["c"]
    _assert_uncut(out.getvalue(), heads, rows)
    assert "(left out at 80 columns: c;" in out.getvalue()


def test_eval_and_inspect_tables_fit_80_columns(out) -> None:
    import dqnc
    from dqnc.inspection import summarize

    result = dqnc.evaluate(SAMPLE, reference=SAMPLE, episodes=3, latency_samples=200, min_return=10, progress=False)
    render.evaluation(result.metrics, as_json=False)
    text = out.getvalue()
    assert "…" not in text and max(map(len, text.splitlines())) <= 80, text
    for value in (f"{result.mean_return:.2f}", f"{result.size_bytes:,}", "pass", "regret"):
        assert value in text
    out.seek(0)
    out.truncate()
    info = summarize(dqnc.load(ROOT / "sample_models" / "minatar-breakout-int8"))
    render.inspection(info, as_json=False)
    rows = [[layer["name"], layer["op"], str(tuple(layer["shape"])), f"{layer['params']:,}", f"{layer['nonzero']:,}",
             f"{100 * layer['sparsity']:.1f}%"] for layer in info["layers"]]
    _assert_uncut(out.getvalue(), ["layer", "op", "shape", "params", "nonzero", "sparsity"], rows)


def test_messages_wrap_at_words_and_keep_long_words_whole(out) -> None:
    path = "/tmp/" + "a-folder-with-a-very-long-name/" * 3 + "report.md"
    render.say("PASSED; every gate held on the held-out episodes, report: " + path + " and report.json, done")
    lines = out.getvalue().splitlines()
    assert path in lines  # on a line of its own rather than split
    assert all(len(line) <= 80 for line in lines if line != path) and len(lines) == 3, lines
    assert " ".join(" ".join(lines).split()) == ("PASSED; every gate held on the held-out episodes, report: " + path +
                                               " and report.json, done")


def _help(args: list[str], columns: int) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": str(columns), "TERMINAL_WIDTH": str(columns)})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "dqnc")
def test_help_reads_at_80_columns_with_every_flag_whole(args: list[str]) -> None:
    import typer

    group = typer.main.get_command(app)
    cmd = group
    for name in args:
        cmd = cmd.commands[name]
    flags = [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
    for columns in (80, RICH_MIN_COLUMNS):  # plain text, then Typer's Rich panels
        text = _help(args, columns)
        assert "…" not in text, text
        assert max(len(line) for line in text.splitlines()) <= columns, text
        words = set(re.split(r"[\s│,/]+", text))
        missing = [f for f in flags if f not in words]
        assert not missing, f"dqnc {' '.join(args)} --help at {columns} columns cuts {missing}:\n{text}"
