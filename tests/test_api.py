"""The Python API: `import dqnc` is light, the stage functions keep their names whatever is
imported, a small chain runs through them, and errors are the CLI's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dqnc
from dqnc.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "cartpole"
NAMES = ("train", "distill", "prune", "quantize", "export", "evaluate", "run_recipe", "load")
runner = CliRunner()


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_import_dqnc_is_light_and_lists_the_api() -> None:
    out = _python(
        "import sys, time\n"
        "t = time.perf_counter(); import dqnc; took = time.perf_counter() - t\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'numpy', 'pydantic', 'gymnasium')"
        " or m in ('dqnc.train', 'dqnc.quantize', 'dqnc.config'))\n"
        f"print(took, heavy, all(callable(getattr(dqnc, n)) for n in {NAMES!r}), sorted(set({NAMES!r}) - set(dir(dqnc))))\n")
    took, rest = out.split(" ", 1)
    assert rest.strip() == "[] True []", out
    assert float(took) < 1.0, out


def test_stage_functions_stay_functions_after_their_modules_are_imported() -> None:
    out = _python(
        "import dqnc.train, dqnc.prune\n"
        "import dqnc, sys\n"
        "from dqnc import quantize\n"
        "import dqnc.export as e\n"
        "from dqnc.cli import app\n"
        "from typer.testing import CliRunner\n"
        "assert CliRunner().invoke(app, ['quantize', '--help']).exit_code == 0\n"
        "from dqnc import api\n"
        f"print(all(getattr(dqnc, n) is getattr(api, n) for n in {NAMES!r}), quantize is api.quantize, e is api.export,\n"
        "      dqnc.prune.run is sys.modules['dqnc.prune'].run, dqnc.train.Progress.__module__)\n")
    assert out.split() == ["True", "True", "True", "True", "dqnc.train"], out


def test_module_attributes_are_patched_through_the_function(monkeypatch) -> None:
    module = sys.modules.get("dqnc.evaluate") or __import__("importlib").import_module("dqnc.evaluate")
    sentinel = object()
    monkeypatch.setattr(dqnc.evaluate, "apply_gates", sentinel)
    assert module.apply_gates is sentinel  # the stage registry calls the module's names
    monkeypatch.undo()
    assert module.apply_gates is not sentinel and dqnc.evaluate.apply_gates is module.apply_gates


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    return re.search(r"```python\n(.*?)\n```", section, re.S).group(1)


def test_the_readme_example_runs_a_chain_that_matches_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    names: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), names)  # noqa: S102 - the project's own README
    parent, int8, bundle, result = (names[k] for k in ("parent", "int8", "bundle", "result"))
    assert isinstance(parent, dqnc.Artifact) and parent.kind == "savedmodel"
    assert int8.kind == "tflite" and int8.manifest["quantization"]["mode"] == "int8"
    assert (bundle.path / "model.tflite").read_bytes() == int8.model_path.read_bytes()
    assert isinstance(result, dqnc.Evaluation) and result.passed and result.episodes == 20
    assert result.mean_return == result.metrics["mean_return"] >= 475 and result.metrics["regret"] < 0.05
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{result.mean_return} {result.size_bytes} ")
    assert printed[1].startswith("dqnc.quantize(): mode: Input should be 'int8'")  # the UsageError's one line
    assert not (tmp_path / "out" / "int7").exists()
    # The CLI measures the same thing the same way.
    r = runner.invoke(app, ["eval", str(bundle.path), "-n", "20", "-r", str(parent.path), "--min-return", "475",
                            "--latency-samples", "0", "--json"])
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    for key in ("mean_return", "return_ci95", "size_bytes", "episodes"):
        assert cli[key] == result.metrics[key], key
    assert cli["regret"] == result.metrics["regret"]  # eval --json: flat names (dqnc.evaluate.record)
    # A config object with options over it.
    cfg = dqnc.EvalConfig(episodes=3, latency_samples=0)
    assert dqnc.evaluate(bundle, config=cfg, episodes=4, progress=False).episodes == 4


def test_errors_are_the_clis(tmp_path: Path) -> None:
    # A bad option: the UsageError the CLI prints as one line and exits 2 for.
    with pytest.raises(dqnc.UsageError, match=r"mode: Input should be 'int8'"):
        dqnc.quantize(SAMPLE, tmp_path / "q", mode="int7")
    assert runner.invoke(app, ["quantize", str(SAMPLE), "--mode", "int7"]).exit_code == 2
    with pytest.raises(dqnc.UsageError, match=r"unknown key 'spasity': did you mean 'sparsity'"):
        dqnc.prune(SAMPLE, tmp_path / "p", spasity=0.5)
    with pytest.raises(dqnc.UsageError, match="config must be a ExportConfig or a mapping"):
        dqnc.export(SAMPLE, tmp_path / "b", config=42)
    with pytest.raises(dqnc.UsageError, match="no environment given"):
        dqnc.train(total_steps=100)
    # The same message, from the same function, on both sides.
    msg = "--min-agreement compare against a parent: pass --reference PARENT"
    with pytest.raises(dqnc.UsageError, match=msg):
        dqnc.evaluate(SAMPLE, min_agreement=0.9)
    r = runner.invoke(app, ["eval", str(SAMPLE), "--min-agreement", "0.9"])
    assert r.exit_code == 2 and msg in r.stderr
    with pytest.raises(dqnc.ArtifactError, match="does not exist"):
        dqnc.load(tmp_path / "nothing")
    # A failed gate carries its measurements, as `dqnc eval` exits 1 after printing them.
    with pytest.raises(dqnc.GateFailed) as failed:
        dqnc.evaluate(SAMPLE, episodes=3, latency_samples=0, min_return=1e6)
    assert failed.value.exit_code == 1 and failed.value.result["episodes"] == 3
