"""Edge targets: TFLM verification in export, the C deliverables, the C policy, the Cortex-M4 run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc import artifact as art
from dqnc import cpolicy, mcu, tflm
from dqnc.cli import app

runner = CliRunner()
needs_cc = pytest.mark.skipif(cpolicy.host_compiler() is None, reason="no host C compiler (cc, gcc or clang)")


def test_quantize_multiplier_matches_tflite_definition():
    assert cpolicy.quantize_multiplier(0.5) == (1 << 30, 0)
    assert cpolicy.quantize_multiplier(1.0) == (1 << 30, 1)
    assert cpolicy.quantize_multiplier(0.75) == (3 << 29, 0)
    q, shift = cpolicy.quantize_multiplier(0.001234)
    assert abs(q * 2.0 ** (shift - 31) - 0.001234) < 1e-12
    assert cpolicy.quantize_multiplier(0.0) == (0, 0)


def test_mcu_bundle_is_verified_on_tflm_with_its_arena_and_c_files(bundle):
    m = json.loads((bundle / "manifest.json").read_text())["metrics"]
    assert m["target"] == "mcu" and m["tflm_compatible"] is True
    check = m["tflm_check"]
    assert check["states"] == 10_000 and check["actions_equal"] >= 0.99 * check["states"]
    assert check["tflm_equals_double_rounding"] if check["actions_equal"] < check["states"] else True
    arena = m["tflm_arena_bytes"]
    assert arena["total"] == arena["head"] + arena["tail"] > 0
    assert m["ops"] == ["FULLY_CONNECTED"] and m["tflm_flash_bytes"] == (bundle / "model.tflite").stat().st_size
    header = (bundle / "dqnc_policy.h").read_text()
    assert f"constexpr int kTensorArenaSize = {m['tflm_arena_shipped_bytes']};" in header
    assert m["tflm_arena_shipped_bytes"] >= arena["total"] * 1.25
    assert "MicroMutableOpResolver<kDqncOpCount>" in header and "r.AddFullyConnected()" in header
    assert header.count("if (r.Add") == 1 and '"push cart left"' in header
    assert "tflite::GetModel(g_dqnc_model)" in (bundle / "main.cc").read_text()
    # the shipped arena runs the model (a far smaller one crashes TFLM's Python wrapper: not tried here)
    content = (bundle / "model.tflite").read_bytes()
    it = tflm.Interpreter(content, arena_size=m["tflm_arena_shipped_bytes"])
    it.set_tensor(0, np.zeros((1, 4), np.int8))
    it.invoke()


@needs_cc
def test_c_policy_int8_outputs_are_bit_identical_to_tflm(bundle, tmp_path):
    """10,000 uniformly random int8 inputs (every saturation corner) plus float observations."""
    content = (bundle / "model.tflite").read_bytes()
    mlp = cpolicy.extract(content)
    assert not isinstance(mlp, str)
    lib = cpolicy.build_host(bundle, tmp_path)
    c = cpolicy.CPolicy(lib, mlp.obs_dim, mlp.n_actions, mlp.output_scale, mlp.output_zero_point)
    manifest = json.loads((bundle / "manifest.json").read_text())
    micro = tflm.policy(content, manifest)
    xq = np.random.default_rng(0).integers(-128, 128, size=(10_000, mlp.obs_dim)).astype(np.int8)
    raw = np.stack([np.array(micro.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])
    assert (c.scores_int8(xq) == raw).all()
    assert (mlp.forward(xq) == raw).all()
    obs = np.random.default_rng(1).normal(scale=[1.0, 1.0, 0.1, 1.0], size=(2000, 4)).astype(np.float32)
    assert (c.quantize(obs) == micro.quantize_input(obs)).all()  # C and the Python runner quantize alike
    assert (c.q_values(obs) == micro.q_values(obs)).all()
    sizes = manifest["metrics"]["c_policy"]
    assert sizes["host_verified"] and sizes["const_data_bytes"] >= sum(l.weights.size for l in mlp.layers)


def test_mcu_export_refuses_what_tflm_cannot_run(pruned, tmp_path):
    from dqnc import quantize
    from dqnc.config import QuantizeConfig

    sparse = quantize.run(QuantizeConfig(target="linux", sparse_encoding="on", calibration_states=200, check_states=200,
                                         min_decisive_agreement=0.0, max_q_rel_error=1.0), art.load(pruned), tmp_path / "s")
    r = runner.invoke(app, ["export", str(sparse.path), "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "sparse tensors" in r.output and "--target linux" in r.output
    assert not (tmp_path / "b").exists()
    r = runner.invoke(app, ["export", str(sparse.path), "-o", str(tmp_path / "b"), "--target", "linux", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert m["tflm_compatible"] is False and "DENSIFY" in m["ops"]
    assert not (tmp_path / "b" / "policy.c").exists()
    dynamic = quantize.run(QuantizeConfig(mode="dynamic", min_decisive_agreement=0.0, max_q_rel_error=1.0,
                                          check_states=100), art.load(pruned), tmp_path / "d")
    r = runner.invoke(app, ["export", str(dynamic.path), "-o", str(tmp_path / "b2")])
    assert r.exit_code == 2 and "hybrid" in r.output


def test_quantize_refuses_sparse_encoding_for_mcu():
    r = runner.invoke(app, ["quantize", "nowhere", "--sparse-encoding", "on"])
    assert r.exit_code == 2 and "needs target 'linux'" in r.output


@needs_cc
def test_eval_runs_each_runtime_and_tflm_and_c_act_alike(bundle):
    results = {}
    for rt in ("litert", "tflm", "c"):
        r = runner.invoke(app, ["eval", str(bundle), "--runtime", rt, "-n", "3", "--latency-samples", "50", "--json"])
        assert r.exit_code == 0, r.output
        results[rt] = json.loads(r.stdout)
    assert results["tflm"]["runtime"] == "tflm" and results["c"]["runtime"] == "c"
    assert results["tflm"]["mean_return"] == results["c"]["mean_return"]  # bit-identical outputs, same episodes
    r = runner.invoke(app, ["eval", str(bundle), "--runtime", "onnx", "-n", "1"])
    assert r.exit_code == 2


@pytest.mark.skipif(bool(mcu.missing_tools()), reason=f"missing {', '.join(mcu.missing_tools())} "
                    "(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")
def test_c_policy_runs_bare_metal_on_an_emulated_cortex_m4(bundle, tmp_path):
    work = tmp_path / "b"
    shutil.copytree(bundle, work)
    result = mcu.verify_bundle(work, n_vectors=200)
    assert result["vectors"] == 200 and result["actions_equal"] == 200
    assert result["actions_equal_litert"] >= 190
    assert result["sections"]["rodata"] >= sum(l.weights.size for l in cpolicy.extract(
        (bundle / "model.tflite").read_bytes()).layers)
    assert result["ram_bytes"] >= 2 * 16 and 100 < result["instructions_per_action"] < 1e6
    assert result["instructions_per_tick"] == pytest.approx(40, rel=0.01)  # 1 ns per instruction at 25 MHz
