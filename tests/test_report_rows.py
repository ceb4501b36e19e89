"""The recipe report's rows: the source first, no eval-stage copy of the row it evaluated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dqnc import recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """recipes/cartpole.yaml (README's main job) with an absolute source path and out_dir in tmp."""
    tmp = tmp_path_factory.mktemp("readme")
    data = yaml.safe_load((ROOT / "recipes" / "cartpole.yaml").read_text())
    shutil.copytree(ROOT / "sample_models" / "cartpole", tmp / "cartpole")
    data["source"]["artifact"] = str(tmp / "cartpole")
    data["out_dir"] = str(tmp / "out")
    p = tmp / "cartpole.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return recipe.run(recipe.load(p)), tmp / "out"


def test_first_row_is_the_source_with_its_fp32_tflite_bytes_and_return(readme_run):
    report, _ = readme_run
    first = report.rows[0]
    assert (first.name, first.stage, first.status) == ("source", "source", "loaded")
    m = first.metrics
    assert m["precision"] == "fp32" and report.fp32_tflite_bytes
    assert m["size_bytes"] == m["fp32_tflite_bytes"] == report.fp32_tflite_bytes
    # the return every other row's evaluation measured for the source as its reference
    student = next(r for r in report.rows if r.name == "student")
    assert m["mean_return"] is not None and m["episodes"] == 100
    assert m["mean_return"] >= 475 and len(m["return_ci95"]) == 2
    cells = recipe.table_rows(report)
    assert cells[0][0] == "source" and cells[0][1] == "fp32" and cells[0][2] == f"{report.fp32_tflite_bytes:,}"
    assert student.metrics["mean_return"] is not None


def test_no_two_rows_are_identical_and_the_eval_stage_shows_as_gates(readme_run):
    report, out = readme_run
    cells = recipe.table_rows(report)
    assert [c[0] for c in cells] == ["source", "student", "int8", "bundle"]
    # (int8 and bundle are one model, so only their names and latency may tell them apart)
    assert len({tuple(c) for c in cells}) == len(cells), cells
    lines = [line for _, line in recipe.gate_lines(report)]
    assert any(line.startswith("gate min_return (stage 'check') on bundle:") for line in lines), lines
    md = (out / "report.md").read_text()
    assert "| source | fp32 |" in md and "| check |" not in md.split("| gate |")[0]
    # report.json keeps every stage (the eval stage names the row it measured) and gains the source row
    data = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in data["stages"]] == ["source", "student", "int8", "bundle", "check"]
    assert data["stages"][-1]["of"] == "bundle" and data["stages"][0]["metrics"]["size_bytes"] == data["fp32_tflite_bytes"]


# --- --set errors name the stages and the nearest key ------------------------------------------

README_RECIPE = ROOT / "recipes" / "cartpole.yaml"


@pytest.mark.parametrize("item, message", [
    ("hidden=[8,8]", r"'hidden' is neither a stage name nor a recipe key: did you mean 'student.hidden'\? "
                     r"\(stages: student, int8, bundle, check; recipe keys: .*out_dir"),
    ("hiden=[8,8]", r"did you mean 'student.hidden'\?"),
    ("stdent.hidden=[8,8]", r"'stdent' is neither .*did you mean 'student'\?"),
    ("student.hiden=[8,8]", r"stage 'student' \(distill\) has no option 'hiden': did you mean 'student.hidden'\?"),
    ("int8.zzz=1", r"stage 'int8' \(quantize\) has no option 'zzz': its options: .*mode"),
])
def test_set_errors_name_the_stages_and_the_nearest_key(item, message):
    from dqnc.errors import UsageError

    with pytest.raises(UsageError, match=message):
        recipe.load(README_RECIPE, [item])


@pytest.mark.parametrize("item, message", [
    ("student.hidden=[a]", r"\(after --set\): stages.0.hidden.0: Input should be a valid integer"),
    ("student.hidden=5", r"\(after --set\): stages.0.hidden: Input should be a valid list"),
])
def test_validation_errors_name_keys_not_pydantic_union_members(item, message):
    from dqnc.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        recipe.load(README_RECIPE, [item])
    assert "list[" not in str(e.value)


def test_set_on_a_stage_option_still_works():
    loaded = recipe.load(README_RECIPE, ["student.hidden=[8,8]", "check.episodes=5", "gates.max_size_kb=4"])
    assert loaded.recipe.stages[0].hidden == [8, 8] and loaded.recipe.stages[3].episodes == 5


def test_an_eval_stage_runs_on_the_runtime_it_names(tmp_path):
    # Before: the runner rebuilt the eval stage's config from episodes, seed and latency samples only,
    # so `runtime: tflm` was silently evaluated on LiteRT.
    data = yaml.safe_load((ROOT / "recipes" / "cartpole.yaml").read_text())
    data["source"]["artifact"] = str(ROOT / "sample_models" / "cartpole")
    data["out_dir"] = str(tmp_path / "out")
    data["eval"] = {"episodes": 3, "latency_samples": 10}
    data["gates"] = {}  # a student trained on a tiny budget: the runtime is what this test checks
    data["stages"] = [s for s in data["stages"] if s["name"] in ("student", "int8")] + [
        {"name": "on_tflm", "stage": "eval", "runtime": "tflm", "episodes": 3, "latency_samples": 10}]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    loaded = recipe.load(p, ["student.steps=200", "student.dagger_rounds=0", "student.states=500"])
    report = recipe.run(loaded)
    row = next(r for r in report.rows if r.name == "on_tflm")
    assert row.metrics.get("runtime") == "tflm", row.metrics
