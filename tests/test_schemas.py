"""The shipped JSON Schemas (dqnc/schemas/) describe what dqnc really writes: manifests of every
stage, and the object each command prints with --json."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from dqnc import schemas
from dqnc.cli import app

runner = CliRunner()
FAST_DISTILL = {"hidden": [8, 8], "states": 1000, "steps": 200, "dagger_rounds": 1, "dagger_steps": 100,
                "check_states": 200}


def _valid(name: str, instance: dict) -> None:
    jsonschema.validate(instance, schemas.load(name), cls=jsonschema.Draft202012Validator)


def _json(args: list[str]) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def run_json(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("schema-run")
    recipe = {"out_dir": "out", "source": {"artifact": str(trained)},
              "stages": [{"name": "student", "stage": "distill", **FAST_DISTILL},
                         {"name": "int8", "stage": "quantize", "calibration_states": 200, "check_states": 200},
                         {"name": "bundle", "stage": "export", "check_states": 200},
                         {"name": "check", "stage": "eval", "episodes": 3, "gates": {"min_return": 0}}],
              "eval": {"episodes": 3, "latency_samples": 20}}
    (d / "r.yaml").write_text(yaml.safe_dump(recipe))
    return _json(["run", str(d / "r.yaml"), "--quiet"])


def test_every_shipped_schema_is_a_valid_draft_2020_12_schema():
    assert {"manifest", "eval", "run", "train", "prune", "distill", "quantize", "export", "import"} <= set(schemas.names())
    for name in schemas.names():
        jsonschema.Draft202012Validator.check_schema(schemas.load(name))


def test_manifests_of_every_stage_match_the_manifest_schema(trained, pruned, int8, bundle, run_json):
    stages = set()
    for folder in (trained, pruned, int8, bundle, Path(run_json["stages"][1]["path"])):
        manifest = json.loads((folder / "manifest.json").read_text())
        _valid("manifest", manifest)
        stages.add(manifest["stage"])
    assert stages == {"train", "prune", "quantize", "export", "distill"}


def test_run_and_eval_json_match_their_schemas_and_share_names(run_json, bundle, pruned):
    _valid("run", run_json)
    assert run_json["passed"] and [r["stage"] for r in run_json["stages"]] == ["source", "distill", "quantize", "export",
                                                                               "eval"]
    ev = _json(["eval", str(bundle), "-n", "3", "--reference", str(pruned), "--latency-samples", "20"])
    _valid("eval", ev)
    row = next(r for r in run_json["stages"] if r["stage"] == "export")["metrics"]
    shared = {k for k in row if k in ev}
    # One vocabulary: the figures both report carry the same names.
    assert {"agreement", "regret", "decisive_agreement", "latency_p50_us", "invoke_p50_us", "mean_return",
            "return_ci95", "size_bytes", "return_drop_frac"} <= shared
    assert "latency_us" not in ev and "agreement" not in ev["reference"]


def test_eval_schema_rejects_the_old_nested_names(bundle):
    ev = _json(["eval", str(bundle), "-n", "2", "--latency-samples", "10"])
    _valid("eval", ev)
    with pytest.raises(jsonschema.ValidationError):
        _valid("eval", {**ev, "latency_us": {"action": {"p50": 1.0}}})


def test_stage_commands_json_match_their_schemas(int8, trained, tmp_path, monkeypatch):
    import numpy as np

    from tests.torchzip_writer import torch_zip

    monkeypatch.setenv("DQNC_CACHE", str(tmp_path / "cache"))
    _valid("export", _json(["export", str(int8), "-o", str(tmp_path / "b")]))
    _valid("prune", _json(["prune", str(trained), "-o", str(tmp_path / "p"), "--sparsity", "0.5", "--states", "500",
                           "--epochs", "1", "--dagger-rounds", "0", "--check-states", "200"]))
    # A CleanRL state_dict of a 4-16-2 MLP: the cheapest import there is.
    r = np.random.default_rng(0)
    sd = {"network.0.weight": r.normal(size=(16, 4)).astype(np.float32), "network.0.bias": np.zeros(16, np.float32),
          "network.2.weight": r.normal(size=(2, 16)).astype(np.float32), "network.2.bias": np.zeros(2, np.float32)}
    (tmp_path / "q.cleanrl_model").write_bytes(torch_zip(sd))
    imported = _json(["import", str(tmp_path / "q.cleanrl_model"), "--env", "CartPole-v1", "--check-states", "200",
                      "-o", str(tmp_path / "imp")])
    _valid("import", imported)
    _valid("manifest", json.loads((tmp_path / "imp" / "manifest.json").read_text()))
    with pytest.raises(jsonschema.ValidationError):  # the schemas are closed: an unknown key is caught
        _valid("import", {**imported, "extra": 1})


def test_schema_command_prints_a_schema_and_refuses_an_unknown_name():
    r = runner.invoke(app, ["schema", "eval"])
    assert r.exit_code == 0 and json.loads(r.stdout)["title"] == "dqnc eval --json"
    r = runner.invoke(app, ["schema", "nope"])
    assert r.exit_code == 2 and "pick one of" in r.output
