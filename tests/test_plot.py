"""`dqnc plot` draws a train artifact's learning curve and a recipe run's size against return;
recipes write TensorBoard scalars for train, distill and prune by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dqnc import recipe
from dqnc.cli import app
from dqnc.plot import LEARNING_CURVE, SIZE_VS_RETURN, deployable_points

from .conftest import TINY

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plot-run")
    data = {"out_dir": "out", "source": {"train": {"env": "CartPole-v1", **TINY, "total_steps": 1500, "eval_freq": 500}},
            "stages": [{"name": "student", "stage": "distill", "hidden": [16, 16], "states": 1000, "steps": 200,
                        "dagger_rounds": 1, "dagger_steps": 100, "check_states": 200},
                       {"name": "pruned", "stage": "prune", "sparsity": 0.5, "states": 500, "epochs": 2,
                        "dagger_rounds": 0, "check_states": 200},
                       {"name": "int8", "stage": "quantize", "calibration_states": 200, "check_states": 200}],
            "eval": {"episodes": 3, "latency_samples": 0}}
    (d / "r.yaml").write_text(yaml.safe_dump(data))
    recipe.run(recipe.load(d / "r.yaml"))
    return d / "out"


def _scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    ea.Reload()
    return {tag: [float(e.tensor_proto.float_val[0]) if e.tensor_proto.float_val else
                  float(__import__("tensorflow").make_ndarray(e.tensor_proto)) for e in ea.Tensors(tag)]
            for tag in ea.Tags()["tensors"]}


def test_recipe_writes_tensorboard_scalars_for_train_distill_and_prune_by_default(run_dir):
    train = _scalars(run_dir / "tensorboard" / "train")
    assert len(train["eval/mean_return"]) == 3 and train["train/loss"]  # evals at 500, 1000, 1500 steps
    student = _scalars(run_dir / "tensorboard" / "student")
    assert len(student["distill/loss"]) == 3  # 200 first steps + 100 in the one DAgger round, per chunk of 100
    assert student["distill/dagger_round"] == [1.0]
    assert student["distill/states"][1] > student["distill/states"][0] == 1000  # DAgger added visited states
    assert _scalars(run_dir / "tensorboard" / "pruned")["distill/loss"]  # prune fine-tunes by distillation
    assert not (run_dir / "tensorboard" / "int8").exists()  # quantize trains nothing


def test_tensorboard_key_turns_it_off(tmp_path, trained):
    from dqnc.recipe.runner import tensorboard_dir

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"source": {"artifact": str(trained)}, "tensorboard": False,
                                 "stages": [{"name": "q", "stage": "quantize"}]}))
    assert tensorboard_dir(recipe.load(p), "q") is None
    p.write_text(yaml.safe_dump({"source": {"artifact": str(trained)}, "tensorboard": "sometimes",
                                 "stages": [{"name": "q", "stage": "quantize"}]}))
    r = runner.invoke(app, ["recipe", "validate", str(p)])
    assert r.exit_code == 2 and "tensorboard" in r.output


def test_plot_run_folder_writes_size_vs_return_and_the_learning_curve(run_dir, tmp_path):
    r = runner.invoke(app, ["plot", str(run_dir), "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines == [f"wrote {tmp_path / SIZE_VS_RETURN}", f"wrote {tmp_path / ('train-' + LEARNING_CURVE)}"]
    for line in lines:
        assert Path(line[len("wrote "):]).read_bytes()[:8] == PNG
    import json

    points = deployable_points(json.loads((run_dir / "report.json").read_text())["stages"])
    # The source (its fp32 TFLite bytes) and the int8 file; the SavedModel student has no deployable size.
    assert [p["name"] for p in points] == ["train", "int8"] and points[1]["bytes"] < points[0]["bytes"]


def test_plot_train_artifact_writes_its_learning_curve_beside_it(trained):
    r = runner.invoke(app, ["plot", str(trained)])
    assert r.exit_code == 0, r.output
    out = trained.parent / f"{trained.name}-{LEARNING_CURVE}"
    assert r.stdout == f"wrote {out}\n" and out.read_bytes()[:8] == PNG


def test_plot_never_replaces_a_file_without_force(trained, tmp_path):
    mine = tmp_path / LEARNING_CURVE
    mine.write_bytes(b"the user's own picture")
    r = runner.invoke(app, ["plot", str(trained), "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--force" in r.output and len(r.output.strip().splitlines()) == 1
    assert mine.read_bytes() == b"the user's own picture"
    r = runner.invoke(app, ["plot", str(trained), "-o", str(tmp_path), "--force"])
    assert r.exit_code == 0, r.output
    assert mine.read_bytes()[:8] == PNG


def test_plot_refuses_a_folder_with_neither_in_one_line(tmp_path):
    r = runner.invoke(app, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "report.json" in r.output


def test_size_vs_return_points_leave_out_savedmodels_and_eval_rows_and_merge_copies():
    def row(name, stage, size, ret, tflite=True):
        return {"name": name, "stage": stage, "metrics": {"size_bytes": size, "mean_return": ret, "precision": "int8",
                                                          "return_ci95": [ret - 1, ret + 1],
                                                          "bytes_per_param": 1.0 if tflite else None}}

    rows = [row("source", "source", 70880, 500.0, tflite=False), row("student", "distill", 9000, 499.0, tflite=False),
            row("int8", "quantize", 2832, 499.6), row("bundle", "export", 2832, 499.6), row("check", "eval", 2832, 499.6)]
    points = deployable_points(rows)
    assert [(p["name"], p["bytes"]) for p in points] == [("source", 70880), ("int8, bundle", 2832)]
