"""A stage is one registry entry: a stage defined in test code is validated, run and reported by
`dqnc recipe validate` / `dqnc run` without any dqnc file knowing it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from dqnc import artifact as art
from dqnc import stages, sweep
from dqnc.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


class NoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    note: str = Field("", description="written into the manifest")


def noop_run(cfg: NoopConfig, source: art.Artifact, out: Path, *, force: bool, log) -> art.Artifact:
    """Copy the input artifact, with a manifest that names this stage and its parent."""
    with art.atomic_output(out, force) as tmp:
        shutil.copytree(source.path, tmp, dirs_exist_ok=True)
        (tmp / art.MANIFEST).unlink()
        own = {"format_version", "dqnc_version", "stage", "created_utc", "parent", "env", "network", "config",
               "metrics", "versions", "command", "files"}
        art.write_manifest(tmp, stage="noop", env=source.env, network=source.network, config=cfg.model_dump(),
                           metrics={}, parent=source, extra={k: v for k, v in source.manifest.items() if k not in own})
    return art.load(out)


@pytest.fixture
def noop():
    stage = stages.register(stages.Stage("noop", NoopConfig, frozenset({"savedmodel"}), "savedmodel", False, noop_run,
                                         "copy the input"))
    yield stage
    stages.unregister("noop")


def _recipe(tmp_path: Path, **extra) -> Path:
    data = {"out_dir": "out", "source": {"artifact": str(ROOT / "sample_models" / "cartpole")},
            "stages": [{"name": "copy", "stage": "noop", "note": "hello", **extra}],
            "eval": {"episodes": 2, "latency_samples": 0}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_a_registered_stage_validates_and_runs_end_to_end(tmp_path, noop):
    p = _recipe(tmp_path)
    r = runner.invoke(app, ["recipe", "validate", str(p)])
    assert r.exit_code == 0, r.output
    assert "copy (noop)" in r.output
    r = runner.invoke(app, ["run", str(p), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    row = next(s for s in report["stages"] if s["name"] == "copy")
    assert row["status"] == "ran" and row["stage"] == "noop"
    made = art.load(tmp_path / "out" / "copy")
    assert made.stage == "noop" and made.manifest["config"] == {"note": "hello"} and made.kind == "savedmodel"
    r = runner.invoke(app, ["run", str(p), "--json"])  # cached by content hash, like every stage
    assert next(s for s in json.loads(r.stdout)["stages"] if s["name"] == "copy")["status"] == "cached"


def test_a_registered_stage_rejects_an_unknown_option_in_one_line(tmp_path, noop):
    r = runner.invoke(app, ["recipe", "validate", str(_recipe(tmp_path, nots=1))])
    assert r.exit_code == 2
    assert re.search(r"r.yaml:\d+: unknown key 'stages.0.nots': did you mean 'note'\?", r.output), r.output
    assert len(r.output.strip().splitlines()) == 1


def test_the_stage_is_gone_once_unregistered(tmp_path, noop):
    stages.unregister("noop")
    r = runner.invoke(app, ["recipe", "validate", str(_recipe(tmp_path))])
    assert r.exit_code == 2 and "'stage' must be one of prune, distill, quantize, export, eval" in r.output


def test_registry_refuses_taken_and_source_names(noop):
    for name in ("noop", "prune", "train"):
        with pytest.raises(ValueError, match="already defined"):
            stages.register(stages.Stage(name, NoopConfig, frozenset({"savedmodel"}), "savedmodel", False, noop_run, ""))
    with pytest.raises(ValueError, match="no 'seed' option"):
        stages.register(stages.Stage("seedless", NoopConfig, frozenset({"savedmodel"}), "savedmodel", True, noop_run, ""))


def test_every_stage_whose_output_depends_on_its_seed_is_varied_by_sweep_seeds():
    # quantize calibrates (and with weight_bits 4|2 fine-tunes) on rollouts seeded by its seed
    assert {"prune", "distill", "quantize"} <= set(sweep.SEED_STAGES)
    data = {"stages": [{"name": "q", "stage": "quantize"}, {"name": "b", "stage": "export"}]}
    trials = sweep.expand("text", data, {}, seeds=3)
    assert [t.sets for t in trials] == [("q.seed=0",), ("q.seed=1",), ("q.seed=2",)]
