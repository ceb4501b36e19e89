from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc import artifact as art
from dqnc import prune, quantize
from dqnc.cli import app
from dqnc.errors import UsageError
from dqnc.policy import load_keras_model

runner = CliRunner()


def test_pruning_reaches_the_target_sparsity_exactly_per_layer(pruned):
    a = art.load(pruned)
    m = a.manifest["metrics"]
    model = load_keras_model(a.model_path)
    for layer in m["layers"]:
        kernel = model.get_layer(layer["name"]).get_weights()[0]
        measured = 1 - np.count_nonzero(kernel) / kernel.size
        assert measured == pytest.approx(layer["sparsity"])
        if layer["target"] > 0:
            assert abs(measured - layer["target"]) <= 1 / kernel.size + 1e-9, layer
        else:
            assert measured < 0.05  # kept dense
    assert [l["name"] for l in m["layers"] if l["target"] == 0] == ["dense_0", "q_values"]
    assert a.manifest["parent"]["sha256"] and a.manifest["stage"] == "prune"


def test_erk_gives_small_layers_lower_sparsity_and_hits_the_overall_target(trained):
    teacher = load_keras_model(art.load(trained).model_path)
    targets = prune.layer_targets(teacher, prune.PruneConfig(sparsity=0.8, distribution="erk", keep_dense=()))
    assert prune.layer_targets(teacher, prune.PruneConfig(keep_dense=("last",)))["dense_0"] == 0.8
    sizes = {l.name: int(np.prod(l.kernel.shape)) for l in teacher.layers}
    overall = sum(targets[n] * sizes[n] for n in targets) / sum(sizes.values())
    assert overall == pytest.approx(0.8, abs=1e-6)
    assert targets["dense_1"] > targets["q_values"]  # 16x16 is pruned harder than 16x2


def test_unknown_layer_override_is_a_clear_error(trained):
    teacher = load_keras_model(art.load(trained).model_path)
    with pytest.raises(UsageError, match="no Dense layer named 'dense_9'"):
        prune.layer_targets(teacher, prune.PruneConfig(layer_sparsity={"dense_9": 0.5}))


def test_invalid_sparsity_is_refused():
    r = runner.invoke(app, ["prune", "/nonexistent", "--sparsity", "1.5"])
    assert r.exit_code == 2 and "sparsity" in r.output and "less than 1" in r.output


@pytest.mark.parametrize("finetune", ["none", "rl"])
def test_other_finetune_modes_reach_the_target(trained, tmp_path, finetune):
    cfg = prune.PruneConfig(sparsity=0.6, finetune=finetune, rl_steps=1500, check_states=200)
    a = prune.run(cfg, art.load(trained), tmp_path / finetune)
    for layer in a.manifest["metrics"]["layers"]:
        if layer["target"] > 0:
            assert layer["sparsity"] == pytest.approx(0.6, abs=0.01)


def test_int8_file_has_int8_kernels_and_io(int8):
    from ai_edge_litert.interpreter import Interpreter

    a = art.load(int8)
    q = a.manifest["quantization"]
    assert q["input"]["dtype"] == "int8" and q["output"]["dtype"] == "int8"
    it = Interpreter(model_path=str(a.model_path))
    dtypes = {np.dtype(d["dtype"]).name for d in it.get_tensor_details()}
    assert "float32" not in dtypes, dtypes  # full integer: no float tensor anywhere
    assert "int8" in dtypes
    assert a.manifest["preprocess"]["obs_std"] and a.manifest["metrics"]["check"]["states"] == 300


def test_quantize_refuses_a_result_beyond_tolerance(pruned, tmp_path):
    from dqnc.errors import GateFailed

    cfg = quantize.QuantizeConfig(calibration_states=200, check_states=200, max_q_rel_error=0.0)
    with pytest.raises(GateFailed, match="strays from its parent"):
        quantize.run(cfg, art.load(pruned), tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("mode", ["int16x8", "float16", "dynamic", "fp32"])
def test_other_modes_convert_and_load(pruned, tmp_path, mode):
    cfg = quantize.QuantizeConfig(mode=mode, calibration_states=200, check_states=200)
    a = quantize.run(cfg, art.load(pruned), tmp_path / mode)
    r = runner.invoke(app, ["eval", str(a.path), "-n", "2", "--json", "--latency-samples", "10"])
    assert r.exit_code == 0, r.output


def test_quantize_of_a_tflite_is_refused(int8, tmp_path):
    r = runner.invoke(app, ["quantize", str(int8), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "quantize its parent" in r.output


def test_bundle_contents_and_checksums(bundle):
    files = sorted(p.name for p in bundle.iterdir())
    assert files == ["Makefile", "README.md", "SHA256SUMS", "arduino", "dqnc_policy.h", "firmware", "main.cc", "manifest.json", "model.tflite", "model_data.cc",
                     "model_data.h", "policy.c", "policy.h", "run_policy.py"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["io"]["input"]["dtype"] == "int8" and "scale" in m["io"]["input"]
    assert m["actions"]["meanings"] == ["push cart left", "push cart right"]
    assert m["observation"]["names"][2] == "pole angle"
    assert isinstance(m["metrics"]["tflm_compatible"], bool)
    cc = (bundle / "model_data.cc").read_text()
    assert "alignas(16) const unsigned char g_dqnc_model[]" in cc
    assert f"g_dqnc_model_len = {(bundle / 'model.tflite').stat().st_size};" in cc
    out = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_bundle_runner_works_where_tensorflow_cannot_be_imported(bundle, tmp_path):
    blocker = tmp_path / "blocker" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('tensorflow is not available on this device')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    probe = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True)
    assert probe.returncode != 0  # the blocker works
    out = subprocess.run([sys.executable, str(bundle / "run_policy.py"), "--obs", "0.01,0.0,-0.02,0.0", "--q"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["action"] in (0, 1) and len(row["q"]) == 2
    stdin = "[0.01, 0.0, -0.02, 0.0]\n[0.0, 0.1, 0.05, 0.2]\n"
    out = subprocess.run([sys.executable, str(bundle / "run_policy.py")], input=stdin, env=env, capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 0 and len(out.stdout.split()) == 2
    bad = subprocess.run([sys.executable, str(bundle / "run_policy.py"), "--obs", "1,2"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "expected 4 numbers" in bad.stderr


def test_runner_matches_dqnc_eval_actions(bundle):
    from dqnc.envs import collect_states
    from dqnc.policy import q_function
    from dqnc.runtime import Policy

    a = art.load(bundle)
    states = collect_states(q_function(a), a.env, 50, 0)
    runner_policy = Policy.from_manifest(str(bundle / "model.tflite"), a.manifest)
    assert [runner_policy.act(s) for s in states] == list(q_function(a)(states).argmax(1))


def test_eval_of_tflite_and_bundle_never_imports_tensorflow(bundle, int8, pruned):
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from dqnc.cli import app\n"
        f"r = CliRunner().invoke(app, ['eval', {str(bundle)!r}, '-n', '3', '--json', '--reference', {str(pruned)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        f"r = CliRunner().invoke(app, ['eval', {str(int8)!r}, '-n', '3', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_reports_agreement_size_latency_and_gates(bundle, pruned):
    r = runner.invoke(app, ["eval", str(bundle), "-n", "3", "--json", "--reference", str(pruned), "--latency-samples", "50"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    # One vocabulary with run --json's rows: what was measured against the reference is flat.
    for key in ("agreement", "decisive_agreement", "decisive_states", "decisive_share", "regret", "regret_p99",
                "return_drop_frac", "return_drop_ci95"):
        assert key in d
    assert set(d["reference"]) == {"path", "stage", "mean_return", "return_ci95", "random_policy_mean_return"}
    # The pruned reference outputs action scores, not Q-values: no Q error is reported against it.
    assert "q_mae" not in d and "q_range" not in d and art.load(pruned).outputs == "action_scores"
    assert d["return_ci95"][0] <= d["mean_return"] <= d["return_ci95"][1]
    assert d["size_bytes"] == (bundle / "model.tflite").stat().st_size and 0 < d["gzip_bytes"] < d["size_bytes"]
    assert d["latency_p50_us"] > 0 and d["invoke_p99_us"] > 0 and "latency_us" not in d
    assert d["runtime"] == "ai_edge_litert"
    for args, gate in ((["--max-size-kb", "0.5"], "max_size_kb"), (["--max-size-kib", "0.5"], "max_size_kib"),
                       (["--min-agreement", "1.01"], None), (["--max-regret", "-0.5"], None),
                       (["--max-return-drop", "-1"], "max_return_drop"), (["--min-return", "1e9"], "min_return")):
        r = runner.invoke(app, ["eval", str(bundle), "-n", "2", "--reference", str(pruned), "--latency-samples", "0", *args])
        if gate is None:
            assert r.exit_code == 2  # 1.01 is out of range: usage error
            continue
        assert r.exit_code == 1, r.output
        assert f"gate {gate} failed" in r.output


def test_agreement_gates_need_a_reference(bundle):
    r = runner.invoke(app, ["eval", str(bundle), "-n", "2", "--min-agreement", "0.9"])
    assert r.exit_code == 2 and "--reference" in r.output


@pytest.mark.parametrize("damage", ["truncate", "random", "empty", "flip"])
def test_damaged_tflite_exits_2_with_a_clear_message(int8, tmp_path, damage):
    data = (Path(int8) / "model.tflite").read_bytes()
    rng = np.random.default_rng(0)
    if damage == "truncate":
        data = data[: len(data) // 3]
    elif damage == "random":
        data = rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()
    elif damage == "empty":
        data = b""
    else:
        arr = bytearray(data)
        for i in rng.integers(0, len(arr), 40):
            arr[i] ^= 0xFF
        data = bytes(arr)
    f = tmp_path / "bad.tflite"
    f.write_bytes(data)
    code = (
        "from typer.testing import CliRunner\nfrom dqnc.cli import app\n"
        f"r = CliRunner().invoke(app, ['eval', {str(f)!r}, '--env', 'CartPole-v1', '-n', '2', '--latency-samples', '0'])\n"
        "print(r.exit_code); print(r.output)\n"
    )
    # In a subprocess: a damaged flatbuffer must not take the test runner down with it.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    if lines[0] == "0":  # some flips land in padding and leave a valid model: that is a verified result
        assert damage == "flip"
        return
    assert lines[0] == "2", out.stdout
    assert "not a valid TFLite model" in out.stdout or "not a TFLite flatbuffer" in out.stdout or "empty" in out.stdout
    assert "Traceback" not in out.stdout


def test_export_of_a_savedmodel_is_fp32_tflite(pruned, tmp_path):
    r = runner.invoke(app, ["export", str(pruned), "-o", str(tmp_path / "b"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["io"]["input"]["dtype"] == "float32"
    r = runner.invoke(app, ["eval", str(tmp_path / "b"), "-n", "3", "--json", "--reference", str(pruned)])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["agreement"] == 1.0  # fp32 conversion acts exactly like its source


def test_cli_prune_quantize_export_chain(trained, tmp_path):
    r = runner.invoke(app, ["prune", str(trained), "-o", str(tmp_path / "p"), "--sparsity", "0.5", "--states", "500",
                            "--epochs", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["prunable_sparsity"] == pytest.approx(0.5, abs=0.01)
    r = runner.invoke(app, ["quantize", str(tmp_path / "p"), "-o", str(tmp_path / "q"), "--calibration-states", "200",
                            "--check-states", "200", "--min-agreement", "0", "--mode", "dynamic", "--json"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(tmp_path / "q"), "-o", str(tmp_path / "b"), "--target", "linux"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prune", str(trained), "--finetune", "magic"])
    assert r.exit_code == 2 and "--finetune" in r.output


def _relu_mlp(rng, sizes):
    return [a for i, o in itertools.pairwise(sizes) for a in (rng.normal(size=(i, o)) * rng.lognormal(0, 1, size=o),
                                                              rng.normal(size=o))]


def _forward(w, x):
    for i in range(0, len(w) - 2, 2):
        x = np.maximum(x @ w[i] + w[i + 1], 0.0)
    return x @ w[-2] + w[-1]


@pytest.mark.parametrize("sweeps", [1, 2])
def test_equalization_keeps_the_function_and_balances_each_unit(sweeps):
    rng = np.random.default_rng(0)
    w = _relu_mlp(rng, [4, 16, 12, 3])
    x = rng.normal(size=(500, 4))
    eq = quantize.equalize(w, x, sweeps)
    np.testing.assert_allclose(_forward(eq, x), _forward(w, x), rtol=1e-9, atol=1e-9)
    # After the sweep, the last hidden layer's units have equal activation and outgoing-weight ranges.
    h = np.maximum(np.maximum(x @ eq[0] + eq[1], 0) @ eq[2] + eq[3], 0)
    live = h.max(0) > 0
    ratio = np.abs(eq[4]).max(1)[live] / h.max(0)[live]
    assert np.allclose(ratio, ratio[0]), ratio
    assert not np.allclose(np.abs(w[4]).max(1)[live] / np.maximum(np.maximum(x @ w[0] + w[1], 0) @ w[2] + w[3], 0).max(0)[live],
                           ratio[0])  # the random net was not balanced to begin with


def test_output_range_is_narrowed_only_where_the_parent_agrees_better(int8):
    from tensorflow.lite.tools import flatbuffer_utils as fu

    from dqnc.runtime import Policy

    content = art.load(int8).model_path.read_bytes()
    out_scale = Policy(model_content=content).io()["output"]["scale"]
    same, factor, _ = quantize.narrow_output_range(content, lambda c: 1.0)  # nothing beats the original
    assert same == content and factor == 1.0
    # A score that rewards smaller output scales picks the narrowest candidate, and the saturation
    # bounds it reports are those of the rewritten model.
    narrow, factor, (lo, hi) = quantize.narrow_output_range(
        content, lambda c: -Policy(model_content=c).io()["output"]["scale"])
    assert factor == min(quantize.OUTPUT_RANGE_FACTORS)
    io = Policy(model_content=narrow).io()["output"]
    assert io["scale"] == pytest.approx(out_scale * factor, rel=1e-6)
    assert (lo, hi) == pytest.approx(((-128 - io["zero_point"]) * io["scale"], (127 - io["zero_point"]) * io["scale"]))
    assert len(fu.read_model_from_bytearray(bytearray(narrow)).subgraphs[0].tensors) == len(
        fu.read_model_from_bytearray(bytearray(content)).subgraphs[0].tensors)


def test_int8_manifest_records_the_equalization_and_output_range(int8, pruned, tmp_path):
    m = art.load(int8).manifest["metrics"]
    assert m["equalization_sweeps"] in quantize.EQUALIZE_SWEEPS
    assert m["output_range_factor"] in quantize.OUTPUT_RANGE_FACTORS
    assert 0.0 <= m["check"]["saturated_share"] <= 1.0
    cfg = quantize.QuantizeConfig(output_range="full", calibration_states=200, check_states=200)
    full = quantize.run(cfg, art.load(pruned), tmp_path / "full")
    assert full.manifest["metrics"]["output_range_factor"] == 1.0


def test_cli_output_range_is_validated(pruned, tmp_path):
    r = runner.invoke(app, ["quantize", str(pruned), "-o", str(tmp_path / "q"), "--output-range", "wide"])
    assert r.exit_code == 2 and "'ranking' or 'full'" in r.output and not (tmp_path / "q").exists()


def test_hinge_distillation_reaches_the_target_and_keeps_the_policy(trained, tmp_path):
    r = runner.invoke(app, ["prune", str(trained), "-o", str(tmp_path / "h"), "--sparsity", "0.6", "--distill-loss", "hinge",
                            "--states", "500", "--epochs", "3", "--dagger-rounds", "1", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert all(layer["sparsity"] == pytest.approx(0.6, abs=0.01) for layer in m["layers"] if layer["target"] > 0)
    assert art.load(tmp_path / "h").manifest["config"]["distill_loss"] == "hinge"


def test_cli_int8_quantize_reports_the_rewrite(pruned, tmp_path):
    r = runner.invoke(app, ["quantize", str(pruned), "-o", str(tmp_path / "q"), "--calibration-states", "300",
                            "--check-states", "300", "--min-agreement", "0"])
    assert r.exit_code == 0, r.output
    m = art.load(tmp_path / "q").manifest["metrics"]
    assert f"{m['equalization_sweeps']} equalization sweep(s), output range x{m['output_range_factor']:g}" in " ".join(r.output.split())


def test_chosen_int8_candidate_falls_back_to_the_unequalized_one_when_it_fails_the_check():
    checked = []

    def verify(k):
        checked.append(k)
        return {"k": k}, (["decisive 97%"] if k == 2 else [])

    k, stats, problems, notes = quantize.choose_candidate({0: (True, 0.95, 1.0), 2: (True, 0.97, 1.0)}, verify)
    assert (k, stats, problems) == (0, {"k": 0}, []) and checked == [2, 0]
    assert notes and "2 sweeps" in notes[0] and "decisive 97%" in notes[0]
    # When the best one passes, nothing else is checked; when both fail, the best one's problems stand.
    checked.clear()
    assert quantize.choose_candidate({0: (True, 0.9, 1.0), 1: (True, 0.96, 1.0)}, verify)[:3] == (1, {"k": 1}, [])
    assert checked == [1]
    k, _, problems, notes = quantize.choose_candidate({0: 0.1, 2: 0.9}, lambda k: ({}, ["bad"]))
    assert (k, problems, notes) == (2, ["bad"], [])


def test_float_io_int8_narrows_the_internal_output_and_reports_saturation(pruned, tmp_path):
    cfg = quantize.QuantizeConfig(float_io=True, calibration_states=300, check_states=300)
    a = quantize.run(cfg, art.load(pruned), tmp_path / "fio")
    q, m = a.manifest["quantization"], a.manifest["metrics"]
    assert q["input"]["dtype"] == "float32" and q["output"]["dtype"] == "float32"
    assert m["output_range_factor"] in quantize.OUTPUT_RANGE_FACTORS
    assert 0 <= m["check"]["saturated_share"] <= 1 and 0 < m["check"]["q_error_states"] <= 300


@pytest.mark.parametrize("command", ["prune", "quantize", "export"])
def test_cli_defaults_are_the_config_defaults(command):
    """CLI options repeat the stage configs' defaults (for --help); they must not drift apart."""
    import typer.main

    from dqnc import config

    cfg_class = {"prune": config.PruneConfig, "quantize": config.QuantizeConfig, "export": config.ExportConfig}[command]
    click_cmd = typer.main.get_command(app).commands[command]
    shared = {p.name: p.default for p in click_cmd.params if p.name in cfg_class.model_fields}
    assert shared, "no option shares a name with the config"
    for name, default in shared.items():
        field_default = cfg_class.model_fields[name].get_default(call_default_factory=True)
        if default is None or isinstance(field_default, (tuple, dict)):
            continue  # None = "the config's default"; tuples/dicts are built from repeatable options
        assert default == field_default, f"--{name.replace('_', '-')}: CLI {default!r} vs config {field_default!r}"


@pytest.mark.parametrize("which", ["trained", "pruned", "int8", "bundle"])
def test_inspect_works_on_every_artifact_kind(which, request):
    """`dqnc inspect` used to fail on every .tflite artifact and bundle ("cannot load the SavedModel")."""
    path = request.getfixturevalue(which)
    r = runner.invoke(app, ["inspect", str(path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["layers"] and info["params"] > 0 and 0.0 <= info["sparsity"] < 1.0
    if which in ("int8", "bundle"):
        assert "FULLY_CONNECTED" in info["ops"] and info["quantization"]["mode"] == "int8"
    assert info["outputs"] == {"trained": "q_values", "pruned": "action_scores", "int8": "action_scores",
                               "bundle": "action_scores"}[which]


def test_keep_dense_typo_is_refused(trained, tmp_path):
    r = runner.invoke(app, ["prune", str(trained), "-o", str(tmp_path / "p"), "--keep-dense", "dense_9"])
    assert r.exit_code == 2 and "no Dense layer named 'dense_9'" in r.output and not (tmp_path / "p").exists()


def test_quantize_check_refuses_with_regret_numbers(pruned, tmp_path):
    from dqnc.errors import GateFailed

    cfg = quantize.QuantizeConfig(calibration_states=200, check_states=200, min_agreement=1.0, max_regret=0.0)
    with pytest.raises(GateFailed, match="regret") as e:
        quantize.run(cfg, art.load(pruned), tmp_path / "q")
    check = e.value.result["check"]
    assert check["states"] == 200 and 0 <= check["decisive_states"] <= 200 and "decisive_share" in check
    assert not (tmp_path / "q").exists()
