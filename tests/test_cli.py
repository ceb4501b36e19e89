from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dqnc import __version__
from dqnc.cli import app

runner = CliRunner()
COMMANDS = ["train", "prune", "quantize", "export", "eval", "inspect", "version"]


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_version():
    r = _run("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"dqnc {__version__}"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_of_every_command(cmd):
    r = _run(cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output


def test_help_and_config_errors_never_import_tensorflow():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from dqnc.cli import app\n"
        "r = CliRunner()\n"
        "for args in (['--help'], *[[c, '--help'] for c in %r], ['train', '--env', 'CartPole-v1', '--gamma', '7']):\n"
        "    r.invoke(app, args)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    ) % COMMANDS
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "dqnc", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dqnc {__version__}"


def test_no_command_shows_help():
    r = _run()
    assert "Usage" in r.output


def test_unknown_option_is_usage_error():
    assert _run("train", "--no-such-flag").exit_code == 2


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "--env", "CartPole-v1", "--gamma", "7"], "gamma"),
        (["train", "--env", "CartPole-v1", "--hidden", "a,b"], "widths"),
        (["train"], "--env"),
        (["train", "--env", "CartPole-v1", "--config", "/nonexistent.yaml"], "does not exist"),
        (["eval", "/nonexistent/model"], "does not exist"),
        (["inspect", "/nonexistent/model"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, fragment):
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert fragment in r.output
    assert "Traceback" not in r.output


def test_unknown_env_suggests_a_registered_one(tmp_path):
    r = _run("train", "--env", "CartPole-v2", "-o", str(tmp_path / "x"))
    assert r.exit_code == 2
    assert "CartPole-v1" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_non_discrete_env_is_refused(tmp_path):
    r = _run("train", "--env", "Pendulum-v1", "-o", str(tmp_path / "x"))
    assert r.exit_code == 2 and "Discrete" in r.output


def test_eval_json_is_one_object_and_gate_exit_codes(trained):
    r = _run("eval", str(trained), "-n", "3", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["episodes"] == 3 and result["env"] == "CartPole-v1"
    assert result["min_return"] <= result["mean_return"] <= result["max_return"]
    failing = _run("eval", str(trained), "-n", "3", "--json", "--min-return", "100000")
    assert failing.exit_code == 1
    gated = json.loads(failing.stdout)
    assert gated["gates"][0]["passed"] is False
    assert "below 100000 by" in failing.stderr
    passing = _run("eval", str(trained), "-n", "3", "--min-return", "1")
    assert passing.exit_code == 0


def test_inspect_reports_layers_and_sizes(trained):
    r = _run("inspect", str(trained), "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["stage"] == "train"
    assert [l["shape"] for l in info["layers"]] == [[4, 16], [16, 16], [16, 2]]
    assert info["params"] == 4 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2
    assert 0 < info["gzip_bytes"] < info["size_bytes"]
    assert _run("inspect", str(trained)).exit_code == 0


def test_eval_of_a_bare_savedmodel_needs_env_and_checks_shapes(trained):
    bare = trained / "model"
    # model/ inside an artifact resolves to the artifact
    assert _run("eval", str(bare), "-n", "2", "--json").exit_code == 0
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        copy = shutil.copytree(bare, f"{d}/bare")
        r = _run("eval", copy, "-n", "2")
        assert r.exit_code == 2 and "--env" in r.output
        r = _run("eval", copy, "-n", "2", "--env", "CartPole-v1", "--json")
        assert r.exit_code == 0, r.output
        r = _run("eval", copy, "-n", "2", "--env", "Acrobot-v1")
        assert r.exit_code == 2 and "does not fit" in r.output


COMMAND_CONFIGS = {"train": "TrainConfig", "prune": "PruneConfig", "distill": "DistillConfig",
                   "quantize": "QuantizeConfig", "export": "ExportConfig", "import": "ImportConfig",
                   "eval": "EvalConfig"}


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_config_option_is_a_cli_flag(command):
    """One home per option: a field added to a stage config reaches the CLI without a second edit."""
    import typer.main

    from dqnc import config

    cls = getattr(config, COMMAND_CONFIGS[command])
    params = {p.name for p in typer.main.get_command(app).commands[command].params}
    fields = set(cls.model_fields) - {"gates"} | (set(config.Gates.model_fields) if command == "eval" else set())
    assert not sorted(fields - params), f"dqnc {command} lacks flags for {sorted(fields - params)}"


def test_config_flags_reach_the_config(tmp_path, monkeypatch):
    """A derived flag (--eps-start) and a YAML one (--keep-dense) land in the validated config."""
    from dqnc import prune as prune_stage
    from dqnc import train as train_stage

    seen = {}

    def fake_train(cfg, out, **kw):
        seen["train"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(train_stage, "run", fake_train)
    r = runner.invoke(app, ["train", "--env", "CartPole-v1", "--eps-start", "0.5", "--no-double-dqn", "-o",
                            str(tmp_path / "x")])
    assert r.exit_code == 130 and seen["train"].eps_start == 0.5 and seen["train"].double_dqn is False
    r = runner.invoke(app, ["train", "--env", "CartPole-v1", "--eps-start", "2"])
    assert r.exit_code == 2 and "--eps-start" in r.output


@pytest.mark.parametrize("command", ["train", "prune", "distill", "quantize", "export", "eval", "inspect", "import",
                                     "run", "version"])
def test_every_command_has_quiet_and_env_kwargs_where_it_has_env(command):
    import typer.main

    params = {p.name for p in typer.main.get_command(app).commands[command].params}
    assert "quiet" in params
    if "env" in params:
        assert "env_kwargs" in params


def test_version_json_parses():
    r = runner.invoke(app, ["version", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["dqnc"]


def test_an_internal_error_exits_3_with_one_line(monkeypatch):
    from dqnc import artifact

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(artifact, "library_versions", boom)
    r = runner.invoke(app, ["version"])
    assert r.exit_code == 3
    assert "internal error: ZeroDivisionError: a bug" in r.output and "--debug" in r.output
    assert "Traceback" not in r.output


def test_json_output_is_strict_json_even_with_one_episode(trained):
    """A one-episode CI is unbounded: --json says null, never the invalid token -Infinity."""
    r = runner.invoke(app, ["eval", str(trained), "-n", "1", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in --json output"))
    assert out["return_ci95"] == [None, None]
