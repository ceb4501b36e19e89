"""Progress in CI logs: every long task prints a plain line at least every 10 s without a TTY,
nothing with --quiet, and a recipe's train source and stages report through the same display."""

from __future__ import annotations

import io
import re
import textwrap
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dqnc import progress
from dqnc.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "cartpole"
runner = CliRunner()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _plain(clock: Clock) -> tuple[progress.Display, io.StringIO]:
    buf = io.StringIO()
    return progress.Display(Console(file=buf, width=80), live=False, clock=clock, thread=False), buf


def test_plain_lines_start_after_5_s_then_every_10_s_with_count_rate_and_eta() -> None:
    clock = Clock()
    display, buf = _plain(clock)
    display.push("train CartPole-v1")
    display.update(1_000, 10_000, unit="steps")
    clock.now += 4.9
    assert display.tick() is None  # short work prints nothing
    display.update(3_000, 10_000, info="eval 120.0 (best 150.0)")
    clock.now += 0.1
    line = display.tick()
    # 2,000 steps in 5 s since the first count: 400 steps/s, 7,000 to go: 18 s.
    assert line == "train CartPole-v1; 3,000/10,000 steps (30%), 400 steps/s, ETA 18 s; eval 120.0 (best 150.0) [5 s]"
    clock.now += 9.9
    assert display.tick() is None
    clock.now += 0.1
    assert display.tick() is not None
    assert buf.getvalue().count("\n") == 2  # one line each, never folded


def test_a_task_that_reports_nothing_still_prints_its_label_phase_and_time() -> None:
    clock = Clock()
    display, buf = _plain(clock)
    display.push("[3/4] bundle (export)")
    display.update(phase="verifying on TensorFlow Lite Micro")
    clock.now += 75
    assert display.tick() == "[3/4] bundle (export): verifying on TensorFlow Lite Micro [1 min 15 s]"


def test_a_new_phase_resets_the_count_and_the_innermost_task_is_shown() -> None:
    clock = Clock()
    display, _ = _plain(clock)
    outer = display.push("[1/3] pruned (prune)")
    display.update(500, 1_000, phase="distilling")
    display.update(phase="checking on 2,000 held-out states")
    assert (outer.done, outer.total) == (None, None)
    display.push("eval pruned")
    display.update(phase="100 episodes")
    clock.now += 5
    assert display.tick().startswith("eval pruned: 100 episodes")


def test_quiet_shows_nothing_even_for_an_api_call_inside(capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    with progress.shown(Console(file=buf), quiet=True, first=0.0, interval=0.0):
        with progress.shown(first=0.0, interval=0.0):  # what dqnc.api does inside a CLI command
            with progress.task("train"):
                progress.update(10, 100)
                assert isinstance(progress.current(), progress.Display)
    assert buf.getvalue() == "" and capsys.readouterr().err == ""
    assert progress.current() is None


def test_duration_words() -> None:
    assert [progress.duration(s) for s in (4.4, 65, 7380)] == ["4 s", "1 min 05 s", "2 h 03 min"]


def _recipe(tmp_path: Path, source: str) -> Path:
    r = tmp_path / "r.yaml"
    r.write_text(textwrap.dedent(f"""\
        out_dir: {tmp_path / 'out'}
        source:
        {textwrap.indent(source, '  ')}
        stages:
          - name: check
            stage: eval
            episodes: 5
        eval:
          episodes: 5
        """), encoding="utf-8")
    return r


def test_recipe_train_source_and_eval_print_progress_without_a_tty(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DQNC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(progress, "FIRST", 0.3)
    monkeypatch.setattr(progress, "INTERVAL", 0.5)
    # 3,000 steps (~5-10 s): several reports every 500 steps, so a line after the first evaluation
    # does not hang on when the 0.5 s ticks fall (600 steps ran in 2 s in a full suite, with no line after step 500).
    r = _recipe(tmp_path, "train: {env: CartPole-v1, total_steps: 3000, eval_freq: 500, eval_episodes: 3, "
                          "learning_starts: 200, hidden: [16, 16]}")
    res = runner.invoke(app, ["run", str(r)])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    train_lines = [l for l in lines if l.startswith("[train] CartPole-v1; ")]
    assert train_lines, res.stderr
    # steps done/total, the latest greedy evaluation, the time
    assert any(re.search(r"[\d,]+/3,000 steps \(\d+%\).*eval [\d.]+ \(best [\d.]+\).*\[\d+ s\]$", l)
               for l in train_lines), train_lines


def test_eval_command_reports_its_phases_and_counts_and_quiet_silences_them(monkeypatch) -> None:
    monkeypatch.setattr(progress, "FIRST", 0.0)
    monkeypatch.setattr(progress, "INTERVAL", 0.2)
    args = ["eval", str(SAMPLE), "-n", "30", "--reference", str(SAMPLE), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert re.search(r"^evaluate cartpole: 30 episodes(; [\d,]+ steps.*)? \[\d+ s\]$", res.stderr, re.M), res.stderr
    assert res.stdout.lstrip().startswith("{")  # progress never reaches stdout
    quiet = runner.invoke(app, [*args, "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "", quiet.stderr


def test_live_mode_on_a_terminal_draws_bars_and_clears_them() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with progress.shown(console) as display:
        assert display.live
        with progress.task("[train] CartPole-v1"):  # a label is text, not Rich markup
            progress.update(phase="collecting 2,000 check states")
            progress.update(500, 2_000, unit="states", info="[best 1.0]")
            display._bars.refresh()
            drawn = buf.getvalue()
            assert "[train] CartPole-v1: collecting 2,000 check states" in drawn and "500/2,000 states" in drawn
            assert "[best 1.0]" in drawn
    assert display._thread is None  # no plain-line ticker on a terminal


def test_lines_reach_stderr_while_tensorflow_chatter_is_redirected_away() -> None:
    # dqnc.runtime.quiet_stderr points fd 2 at a scratch file during TF imports and conversions.
    import subprocess
    import sys

    code = ("import time\nfrom dqnc import progress\nfrom dqnc.runtime import quiet_stderr\n"
            "with progress.shown(first=0.0, interval=10.0):\n"
            "    with progress.task('quantize (int8)'):\n"
            "        with quiet_stderr():\n"
            "            progress.update(phase='converting')\n"
            "            time.sleep(0.5)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stderr.startswith("quantize (int8): converting ["), r.stderr
