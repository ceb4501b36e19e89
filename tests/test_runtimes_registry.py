"""The runtime registry: a runtime registered from outside dqnc is a choice of the config, the
recipe schema and `dqnc eval --runtime`, and unregistering it takes it away everywhere; no module
outside dqnc/runtimes spells a runtime's name."""

from __future__ import annotations

import ast
import io
import json
import tokenize
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc import runtimes
from dqnc.cli import app
from pydantic import ValidationError

from dqnc.config import EvalConfig
from dqnc.runtimes import Runtime, names, register, unregister

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAKE = "fake-numpy"


@pytest.fixture(scope="module")
def fp32_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped CartPole policy as an fp32 .tflite artifact (no training)."""
    from dqnc import artifact as art
    from dqnc import quantize
    from dqnc.config import QuantizeConfig

    out = tmp_path_factory.mktemp("rt") / "fp32"
    quantize.run(QuantizeConfig(mode="fp32", check_episodes=0, check_states=64), art.load(ROOT / "sample_models" / "cartpole"), out)
    return out


class NumpyPolicy:
    """A 'runtime' in numpy: the Q-values LiteRT computes, the argmax taken here."""

    runtime = FAKE

    def __init__(self, lite) -> None:
        self.lite, self.obs_dim, self.n_actions, self.input_shape = lite, lite.obs_dim, lite.n_actions, lite.input_shape
        self.calls = 0

    def q_values(self, obs) -> np.ndarray:
        self.calls += 1
        return np.asarray(self.lite.q_values(obs), np.float32)

    __call__ = q_values

    def act(self, obs) -> int:
        return int(np.argmax(self.q_values(np.asarray(obs)[None])[0]))


@pytest.fixture
def fake_runtime():
    from dqnc.runtime import Policy

    opened = []

    def open_(source, manifest):
        pol = NumpyPolicy(Policy.from_manifest(str(source.model_path), manifest))
        opened.append(pol)
        return pol

    register(Runtime(name=FAKE, summary="numpy over LiteRT (a test double)", available=lambda: None,
                     refuses=lambda content, manifest: None, open=open_, loads_tflite=False))
    try:
        yield opened
    finally:
        unregister(FAKE)


def test_a_runtime_registered_from_test_code_runs_dqnc_eval(fp32_tflite, fake_runtime):
    r = runner.invoke(app, ["eval", str(fp32_tflite), "--runtime", FAKE, "--episodes", "2", "--latency-samples", "20",
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["runtime"] == FAKE and len(fake_runtime) == 1 and fake_runtime[0].calls > 0
    lite = json.loads(runner.invoke(app, ["eval", str(fp32_tflite), "--runtime", "litert", "--episodes", "2",
                                          "--latency-samples", "0", "--json"]).stdout)
    assert res["mean_return"] == lite["mean_return"]  # the same policy on the same episodes


def test_an_unknown_runtime_is_refused_listing_the_registered_ones(fp32_tflite, fake_runtime):
    r = runner.invoke(app, ["eval", str(fp32_tflite), "--runtime", "nosuch", "-n", "1"])
    assert r.exit_code == 2 and FAKE in r.output and "tflm" in r.output, r.output


def test_unregistering_restores_the_choices(fp32_tflite):
    before = names()
    register(Runtime(name=FAKE, summary="", available=lambda: None, refuses=lambda c, m: None, open=lambda s, m: None))
    assert names() == [*before, FAKE] and EvalConfig(runtime=FAKE).runtime == FAKE
    unregister(FAKE)
    assert names() == before
    with pytest.raises(ValidationError):
        EvalConfig(runtime=FAKE)
    r = runner.invoke(app, ["eval", str(fp32_tflite), "--runtime", FAKE, "-n", "1"])
    choices = r.output.split("choose one of")[-1].split("(got")[0]
    assert r.exit_code == 2 and "tflm" in choices and FAKE not in choices, r.output


def test_names_are_exactly_what_config_validation_and_the_schema_accept(fake_runtime):
    from dqnc.recipe import json_schema

    for name in ["auto", *names()]:
        assert EvalConfig(runtime=name).runtime == name
    for name in ("nosuch", "LiteRT", "tflite_runtime", ""):
        with pytest.raises(ValidationError):
            EvalConfig(runtime=name)
    enum = EvalConfig.model_json_schema()["properties"]["runtime"]["enum"]
    assert enum == ["auto", *names()] and FAKE in enum
    assert json.dumps(json_schema()).count(json.dumps(["auto", *names()])) >= 1


def test_a_runtime_that_refuses_or_is_unavailable_exits_2_saying_why(fp32_tflite):
    register(Runtime(name=FAKE, summary="", available=lambda: "needs a fake board: plug one in",
                     refuses=lambda c, m: None, open=lambda s, m: pytest.fail("opened an unavailable runtime")))
    try:
        r = runner.invoke(app, ["eval", str(fp32_tflite), "--runtime", FAKE, "-n", "1"])
        assert r.exit_code == 2 and "needs a fake board" in r.output
        register(Runtime(name=FAKE, summary="", available=lambda: None, refuses=lambda c, m: "no fake form of it",
                         open=lambda s, m: pytest.fail("opened a refusing runtime")))
        r = runner.invoke(app, ["eval", str(fp32_tflite), "--runtime", FAKE, "-n", "1"])
        assert r.exit_code == 2 and "no fake form of it" in r.output
    finally:
        unregister(FAKE)


# --- no module outside dqnc/runtimes spells a runtime's name -------------------------------------

# (file, literal): the same spelling meaning something else. artifact.py lists pip distributions.
NOT_RUNTIME_NAMES = {("dqnc/artifact.py", "tflite-runtime")}


def runtime_name_literals(files: list[Path], runtime_names: list[str], root: Path) -> list[tuple[str, int, str]]:
    """(file, line, name) of every string literal that is exactly a runtime's name."""
    found = []
    for path in files:
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if tok.type != tokenize.STRING or tok.string[:1] in "fFbB" or tok.string[:2].lower() in ("rf", "fr", "rb", "br"):
                continue
            value = ast.literal_eval(tok.string)
            rel = path.relative_to(root).as_posix()
            if value in runtime_names and (rel, value) not in NOT_RUNTIME_NAMES:
                found.append((rel, tok.start[0], value))
    return found


def test_no_module_outside_dqnc_runtimes_spells_a_runtime_name():
    files = [p for p in sorted((ROOT / "dqnc").rglob("*.py")) if "runtimes" not in p.relative_to(ROOT / "dqnc").parts]
    assert len(files) > 20
    assert runtime_name_literals(files, names(), ROOT) == []


def test_the_runtime_name_check_finds_a_spelt_name(tmp_path):
    (tmp_path / "dqnc").mkdir()
    bad = tmp_path / "dqnc" / "bad.py"
    bad.write_text('x = 1\nif runtime == "tflm":\n    pass\nhelp = "tflm is a runtime"\n')
    assert runtime_name_literals([bad], names(), tmp_path) == [("dqnc/bad.py", 2, "tflm")]


def test_the_registry_lists_the_built_in_runtimes_in_order():
    assert names()[:4] == ["litert", "tflite-runtime", "tflm", "c"]
    assert all(isinstance(rt, Runtime) and rt.summary for rt in runtimes.RUNTIMES.values())
    assert [n for n, rt in runtimes.RUNTIMES.items() if not rt.loads_tflite] == ["c"]
