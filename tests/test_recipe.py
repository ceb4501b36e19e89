from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dqnc import recipe
from dqnc.cli import app
from dqnc.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

FAST_PRUNE = {"states": 500, "epochs": 2, "dagger_rounds": 0, "check_states": 200}
FAST_QUANT = {"calibration_states": 200, "check_states": 200}


def _write(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return p


def _fast_recipe(source: Path, out: str = "out") -> dict:
    return {
        "out_dir": out,
        "source": {"artifact": str(source)},
        "stages": [
            {"name": "pruned", "stage": "prune", "sparsity": 0.5, **FAST_PRUNE},
            {"name": "int8", "stage": "quantize", **FAST_QUANT},
            {"name": "bundle", "stage": "export", "check_states": 500},
        ],
        "eval": {"episodes": 3, "latency_samples": 20},
    }


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_validate(name):
    loaded = recipe.load(ROOT / "recipes" / name)
    assert loaded.recipe.stages


def test_validate_is_fast_and_never_imports_tensorflow():
    code = (
        "import sys, time\nt = time.perf_counter()\n"
        "from typer.testing import CliRunner\nfrom dqnc.cli import app\n"
        f"r = CliRunner().invoke(app, ['recipe', 'validate', {str(ROOT / 'recipes/cartpole.yaml')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'tensorflow' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schema_is_json_schema_with_all_stage_types():
    r = runner.invoke(app, ["recipe", "schema"])
    assert r.exit_code == 0
    schema = json.loads(r.stdout)
    text = json.dumps(schema)
    for stage in ("prune", "quantize", "export", "eval"):
        assert f'"{stage}"' in text
    assert "properties" in schema and "source" in schema["properties"]


BAD = {
    "yaml_syntax": ("source: {artifact: x\nstages: [\n", r":\d+: YAML syntax error"),
    "unknown_key": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": [{"name": "p", "stage": "prune", "sparsty": 0.5}]},
                    r"r.yaml:\d+: unknown key 'stages.0.sparsty': did you mean 'sparsity'\?"),
    "unknown_top_key": ({"sourc": {}, "stages": []}, r"unknown key 'sourc': did you mean 'source'\?"),
    "wrong_type": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": [{"name": "p", "stage": "prune", "epochs": "many"}]},
                   r"r.yaml:\d+: stages.0.epochs: .*integer"),
    "sparsity_out_of_range": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": [{"name": "p", "stage": "prune", "sparsity": 1.5}]},
                              r"r.yaml:\d+: stages.0.sparsity: .*less than 1"),
    "negative_steps": ({"source": {"train": {"env": "CartPole-v1", "total_steps": -5}}, "stages": [{"name": "q", "stage": "quantize"}]},
                       r"r.yaml:\d+: source.train.total_steps: .*greater than or equal to 1"),
    "missing_source": ({"stages": [{"name": "q", "stage": "quantize"}]}, r"missing key .source.: add one of"),
    "empty_source": ({"source": {}, "stages": [{"name": "q", "stage": "quantize"}]}, r"give exactly one of artifact, savedmodel, import or train"),
    "unknown_env": ({"source": {"train": {"env": "CartPole-v7"}}, "stages": [{"name": "q", "stage": "quantize"}]},
                    r"r.yaml:\d+: unknown env id 'CartPole-v7' \(did you mean 'CartPole-v1'\?\)"),
    "duplicate_names": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": [{"name": "a", "stage": "quantize"}, {"name": "a", "stage": "export"}]},
                        r"stage name 'a' is used twice"),
    "prune_after_quantize": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": [{"name": "q", "stage": "quantize"}, {"name": "p", "stage": "prune"}]},
                             r"r.yaml:\d+: stage 'p' \(prune\) reads 'q', a TFLite model"),
    "input_from_later_stage": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": [{"name": "a", "stage": "quantize", "input": "b"}, {"name": "b", "stage": "export"}]},
                               r"reads input 'b', which comes later"),
    "unknown_stage_type": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": [{"name": "a", "stage": "distil"}]},
                           r"'stage' must be one of prune, distill, quantize, export, eval"),
    "no_stages": ({"source": {"train": {"env": "CartPole-v1"}}, "stages": []}, r"stages: List should have at least 1 item"),
    "empty_file": ("", r"the recipe is empty"),
    "not_a_mapping": ("- 1\n- 2\n", r"a recipe is a mapping"),
    "missing_artifact": ({"source": {"artifact": "nope/none"}, "stages": [{"name": "q", "stage": "quantize"}]},
                         r"source.artifact 'nope/none' does not exist"),
    "savedmodel_without_env": ({"source": {"savedmodel": "x"}, "stages": [{"name": "q", "stage": "quantize"}]},
                               r"savedmodel needs env"),
    "python_tag": ("source: !!python/object/apply:os.system ['echo hi']\nstages: []\n", r"r.yaml:1: .*python/object"),
    "billion_laughs": ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                       "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                       "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
                       "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
                       "i: [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]\n", r"more than 20,000 YAML nodes"),
    "duplicate_key": ("source: {train: {env: CartPole-v1}}\nstages: [{name: a, stage: export}]\nstages: []\n",
                      r"r.yaml:3: key 'stages' appears twice"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_recipes_give_one_precise_line_and_exit_2(tmp_path, case):
    data, pattern = BAD[case]
    p = _write(tmp_path, data)
    t0 = time.perf_counter()
    r = runner.invoke(app, ["recipe", "validate", str(p)])
    assert time.perf_counter() - t0 < 5
    assert r.exit_code == 2, r.output
    import re

    msg = r.output.strip()
    assert len(msg.splitlines()) == 1 or len(msg) < 400, msg
    assert re.search(pattern, msg.replace("\n", " ")), msg
    assert "Traceback" not in r.output
    # `dqnc run` refuses the same file the same way, before creating anything
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2
    assert not (tmp_path / "runs").exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path, trained):
    (tmp_path / "taken").write_text("precious")
    p = _write(tmp_path, _fast_recipe(trained, out="taken"))
    r = runner.invoke(app, ["recipe", "validate", str(p)])
    assert r.exit_code == 2 and "is an existing file" in r.output
    assert (tmp_path / "taken").read_text() == "precious"


def test_set_overrides_and_errors(tmp_path, trained):
    p = _write(tmp_path, _fast_recipe(trained))
    loaded = recipe.load(p, ["pruned.sparsity=0.7", "eval.episodes=5"])
    assert loaded.recipe.stages[0].sparsity == 0.7 and loaded.recipe.eval.episodes == 5
    with pytest.raises(ConfigError, match=r"after --set.*sparsity"):
        recipe.load(p, ["pruned.sparsity=3"])
    with pytest.raises(UsageError, match="did you mean 'pruned'"):
        recipe.load(p, ["prunned.sparsity=0.5"])
    with pytest.raises(UsageError, match="KEY=VALUE"):
        recipe.load(p, ["pruned.sparsity"])


def test_relative_paths_resolve_from_the_recipe_folder(tmp_path, trained, monkeypatch):
    shutil.copytree(trained, tmp_path / "models" / "src")
    sub = tmp_path / "recipes"
    sub.mkdir()
    p = _write(sub, _fast_recipe(Path("../models/src"), out="../runs/x"))
    monkeypatch.chdir(tmp_path.parent)
    loaded = recipe.load(p)
    assert loaded.out_dir == tmp_path / "runs" / "x"


def test_run_caches_and_invalidates(tmp_path, trained):
    p = _write(tmp_path, _fast_recipe(trained))
    first = recipe.run(recipe.load(p))
    assert [r.status for r in first.rows] == ["loaded", "ran", "ran", "ran"]  # the source row first
    out = tmp_path / "out"
    for f in ("report.json", "report.md", "recipe.effective.yaml"):
        assert (out / f).is_file()
    assert (out / "bundle" / "model.tflite").is_file()
    t0 = time.perf_counter()
    again = recipe.run(recipe.load(p))
    assert time.perf_counter() - t0 < 5
    assert [r.status for r in again.rows] == ["loaded", "cached", "cached", "cached"]
    # an option change re-runs that stage and everything downstream of it
    changed = recipe.run(recipe.load(p, ["int8.mode=dynamic", "bundle.target=linux"]))
    assert [r.status for r in changed.rows] == ["loaded", "cached", "ran", "ran"]
    # --force STAGE re-runs that stage; the unchanged output hash keeps the rest cached
    forced = recipe.run(recipe.load(p, ["int8.mode=dynamic", "bundle.target=linux"]), force={"pruned"})
    assert forced.rows[1].status == "ran"
    # a changed output is neither trusted nor replaced (the change may be the user's): the run
    # refuses, naming it; once the folder is moved away the stage runs again
    (out / "bundle" / "model_data.h").write_text("tampered")
    with pytest.raises(UsageError, match=r"bundle/model_data.h', which changed since dqnc wrote it"):
        recipe.run(recipe.load(p, ["int8.mode=dynamic", "bundle.target=linux"]))
    assert (out / "bundle" / "model_data.h").read_text() == "tampered"
    shutil.rmtree(out / "bundle")
    healed = recipe.run(recipe.load(p, ["int8.mode=dynamic", "bundle.target=linux"]))
    assert [r.status for r in healed.rows] == ["loaded", "cached", "cached", "ran"]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    row = report["stages"][2]["metrics"]
    for key in ("size_bytes", "gzip_bytes", "sparsity", "precision", "mean_return", "agreement", "latency_p50_us"):
        assert key in row
    assert row["precision"] == "dynamic"


def test_changed_input_invalidates_downstream(tmp_path, trained):
    src = tmp_path / "src"
    shutil.copytree(trained, src)
    p = _write(tmp_path, _fast_recipe(src))
    recipe.run(recipe.load(p), until="pruned")
    from dqnc import train

    from .conftest import tiny_config

    train.run(tiny_config(seed=11), src, force=True)  # a different source policy, same path
    rerun = recipe.run(recipe.load(p), until="pruned")
    assert rerun.rows[1].status == "ran"


def test_until_and_from(tmp_path, trained):
    data = _fast_recipe(trained)
    data["gates"] = {"max_size_kb": 1000}
    p = _write(tmp_path, data)
    part = recipe.run(recipe.load(p), until="int8")
    assert [r.status for r in part.rows] == ["loaded", "ran", "ran", "skipped"]
    # Stopping early never reports PASSED: the recipe's gates were not checked.
    assert part.verdict == "INCOMPLETE" and part.to_dict()["passed"] is False
    assert "gates were not checked" in (tmp_path / "out" / "report.md").read_text()
    rest = recipe.run(recipe.load(p), from_stage="bundle")
    assert [r.status for r in rest.rows] == ["loaded", "cached", "cached", "ran"] and rest.verdict == "PASSED"
    with pytest.raises(UsageError, match="not a stage"):
        recipe.run(recipe.load(p), from_stage="nope")
    # --from checks the cache keys of the stages it skips: a stale output is not reused.
    with pytest.raises(UsageError, match="cache key differs"):
        recipe.run(recipe.load(p, ["int8.mode=dynamic"]), from_stage="bundle")


def test_until_the_last_stage_still_checks_the_gates(tmp_path, trained):
    """`dqnc run RECIPE --until LAST --set gates.max_size_kb=1` used to print PASSED and exit 0."""
    data = _fast_recipe(trained)
    data["stages"].append({"name": "check", "stage": "eval", "episodes": 2, "latency_samples": 0})
    p = _write(tmp_path, data)
    r = runner.invoke(app, ["run", str(p), "--until", "check", "--set", "gates.max_size_kb=1"])
    assert r.exit_code == 1, r.output
    assert "max_size_kb" in r.output and "PASSED" not in r.output


def test_report_table_fits_80_columns_without_a_tty(tmp_path, trained, monkeypatch):
    from rich.console import Console

    from dqnc.cli import render

    p = _write(tmp_path, _fast_recipe(trained))
    report = recipe.run(recipe.load(p))
    console = Console(width=80, force_terminal=False, color_system=None, highlight=False)
    monkeypatch.setattr(render, "stdout", console)
    with console.capture() as cap:
        render.report(report.to_dict(), recipe.load(p), as_json=False)
    text = cap.get()
    table = [ln for ln in text.splitlines() if "|" not in ln][:8]
    assert "…" not in text, text
    assert all(len(ln) <= 80 for ln in table), text
    for head in ("return±CI", "regret", "agree", "decisive"):
        assert head in text


def test_stale_train_checkpoint_is_discarded_with_a_message(tmp_path):
    from .conftest import TINY

    data = {"out_dir": "out", "source": {"train": {"env": "CartPole-v1", **TINY, "total_steps": 1500}},
            "stages": [{"name": "fp32", "stage": "export"}], "eval": {"episodes": 2, "latency_samples": 0}}
    p = _write(tmp_path, data)
    ckpt = tmp_path / "out" / "train.ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"version": 1, "config": {}}))
    logs: list[str] = []
    report = recipe.run(recipe.load(p), log=logs.append)
    assert report.rows[0].status == "ran" and not ckpt.exists()
    assert any("discarding the checkpoint" in line and "another dqnc version" in line for line in logs)


def test_failing_gate_exits_1_names_gate_and_margin_and_keeps_outputs(tmp_path, trained):
    data = _fast_recipe(trained)
    data["gates"] = {"max_size_kb": 0.1, "min_return": -1}
    p = _write(tmp_path, data)
    r = runner.invoke(app, ["run", str(p), "--json"])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["passed"] is False
    assert any("max_size_kb" in f and "exceeds 0.1 kB by" in f for f in report["failures"])
    assert (tmp_path / "out" / "bundle" / "model.tflite").is_file()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**FAILED**" in md and "max_size_kb" in md


def test_second_run_on_the_same_out_dir_is_refused(tmp_path, trained):
    p = _write(tmp_path, _fast_recipe(trained))
    loaded = recipe.load(p)
    loaded.out_dir.mkdir(parents=True)
    import os

    with recipe.Lock(loaded.out_dir):
        r = runner.invoke(app, ["run", str(p)])
        assert r.exit_code == 2
        assert f"in use by pid {os.getpid()}" in r.output


def test_train_source_runs_and_caches(tmp_path):
    from .conftest import TINY

    data = {"out_dir": "out", "source": {"train": {"env": "CartPole-v1", **TINY, "total_steps": 1500}},
            "stages": [{"name": "fp32", "stage": "export"}], "eval": {"episodes": 2, "latency_samples": 0}}
    p = _write(tmp_path, data)
    first = recipe.run(recipe.load(p))
    assert [r.status for r in first.rows] == ["ran", "ran"]
    again = recipe.run(recipe.load(p))
    assert [r.status for r in again.rows] == ["cached", "cached"]


def test_readme_main_recipe_runs_end_to_end_then_from_cache(tmp_path):
    """`dqnc run recipes/cartpole.yaml` (README's main job) on a copy of the repo's files."""
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "cartpole.yaml", tmp_path / "recipes")
    cmd = [sys.executable, "-m", "dqnc", "run", "recipes/cartpole.yaml", "--json"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads(first.stdout)
    assert report["passed"] and [s["status"] for s in report["stages"]] == ["loaded"] + ["ran"] * 4
    bundle = report["stages"][-2]["metrics"]
    assert bundle["precision"] == "int8" and bundle["mean_return"] >= 475
    # Bytes per parameter and the ratio to the source's fp32 TFLite file (16x16: 4*16+16+16*16+16+16*2+2).
    assert bundle["params"] == 386 and bundle["bytes_per_param"] == pytest.approx(bundle["size_bytes"] / 386)
    assert report["fp32_tflite_bytes"] > 15 * bundle["size_bytes"]
    shown = subprocess.run(cmd[:-1], cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout
    assert (f"bundle: {bundle['size_bytes']:,} bytes, 386 parameters" in shown
            and f"{report['fp32_tflite_bytes'] / bundle['size_bytes']:.1f}x smaller" in shown), shown
    t0 = time.perf_counter()
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0
    assert time.perf_counter() - t0 < 10
    assert [s["status"] for s in json.loads(second.stdout)["stages"]][1:4] == ["cached"] * 3


def test_evaluations_are_not_reused_on_another_machine(tmp_path, trained, monkeypatch):
    """Latency belongs to the machine that measured it: the evaluation cache key includes it."""
    from dqnc import evaluate
    from dqnc.recipe import runner

    p = _write(tmp_path, _fast_recipe(trained))
    recipe.run(recipe.load(p))
    calls = []
    real = evaluate.run
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe.run(recipe.load(p))
    assert calls == [], "same machine: every evaluation comes from the cache"
    monkeypatch.setattr(runner, "machine_fingerprint", lambda: "another-host|x86_64|other cpu|64")
    recipe.run(recipe.load(p))
    assert len(calls) >= 3, "another machine re-measures"
