"""4-bit and 2-bit weights: clustering, int8 kernels with <= 2^bits values, LUT compression, packed C."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc import cpolicy, lowbit, mcu
from dqnc.cli import app

runner = CliRunner()


def _quantize(src: Path, out: Path, bits: int) -> Path:
    from dqnc import artifact as art
    from dqnc import quantize

    # A barely trained policy: the check is opened up, the structure of the weights is what is tested.
    cfg = quantize.QuantizeConfig(weight_bits=bits, cluster_steps=200, calibration_states=300, check_states=300,
                                  check_episodes=0, max_regret=1.0)
    quantize.run(cfg, art.load(src), out)
    return out


@pytest.fixture(scope="session")
def w2(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _quantize(trained, tmp_path_factory.mktemp("w2") / "q", 2)


@pytest.fixture(scope="session")
def w2_bundle(w2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import artifact as art
    from dqnc import export

    out = tmp_path_factory.mktemp("w2b") / "b"
    export.run(export.ExportConfig(check_states=3000), art.load(w2), out)
    return out


def test_clustered_int8_kernels_hold_at_most_2_to_the_bits_values(trained, w2, tmp_path):
    from dqnc import artifact as art
    from dqnc.recipe import report

    w4 = _quantize(trained, tmp_path / "w4", 4)
    for path, k in ((w4, 16), (w2, 4)):
        a = art.load(path)
        content = a.model_path.read_bytes()
        counts = lowbit.distinct_weights(content)
        assert len(counts) == 3 and max(counts) <= k
        assert min(counts) >= 2  # clustered, not collapsed
        assert a.manifest["metrics"]["weight_bits"]["distinct_int8_weights"] == counts
        assert a.manifest["quantization"]["weight_bits"] == int(np.log2(k))
        assert report._precision(a.manifest) == f"{int(np.log2(k))}-bit"  # the recipe report's precision column
        mlp = cpolicy.extract(content)
        assert not isinstance(mlp, str) and all(l.multiplier.size == l.weights.shape[0] for l in mlp.layers)


def test_snap_leaves_at_most_k_int8_values_per_kernel(w2):
    from dqnc import artifact as art

    content = art.load(w2).model_path.read_bytes()
    same, snapped = lowbit.snap(content, 2)
    assert same == content and snapped == []  # already <= 4 values: untouched
    one_bit, snapped = lowbit.snap(content, 1)
    assert max(lowbit.distinct_weights(one_bit)) <= 2 and snapped


@pytest.mark.parametrize("bits,shape", [(4, (3, 5)), (2, (7, 3)), (4, (16, 16)), (2, (2, 16))])
def test_packed_weights_unpack_to_the_same_values(bits, shape):
    rng = np.random.default_rng(bits * 100 + shape[0])
    values = rng.choice(np.arange(-127, 128), size=2 ** bits, replace=False).astype(np.int8)
    w = values[rng.integers(0, 2 ** bits, size=shape)]
    packed, table = cpolicy.pack_weights(w, bits)
    assert len(packed) == -(-w.size * bits // 8) and len(table) == 2 ** bits
    assert np.array_equal(cpolicy.unpack_weights(packed, table, shape, bits), w)
    with pytest.raises(ValueError, match="distinct int8 weights"):
        cpolicy.pack_weights(np.arange(2 ** bits + 1, dtype=np.int8).reshape(1, -1), bits)


def test_lut_file_decodes_to_the_int8_kernels_and_runs_on_tflm_only(w2_bundle):
    from dqnc import tflm

    plain, lut = (w2_bundle / "model.tflite").read_bytes(), (w2_bundle / "model_lut.tflite").read_bytes()
    assert lowbit.uses_decode(lut) and not lowbit.uses_decode(plain)
    originals = lowbit.fc_kernels(plain)
    decoded = lowbit.decode_lut(lut)
    fed = [decoded[i] for i in lowbit.fc_weight_tensors(lut)]
    assert len(fed) == 3 and all(np.array_equal(d, o) for d, o in zip(fed, originals))
    # The same outputs from TFLM on random int8 inputs, compressed or not.
    xq = np.random.default_rng(0).integers(-128, 128, size=(500, 4)).astype(np.int8)
    a, b = tflm.policy(plain), tflm.policy(lut)
    out_a = np.stack([np.array(a.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])
    out_b = np.stack([np.array(b.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])
    assert np.array_equal(out_a, out_b)
    m = __import__("json").loads((w2_bundle / "manifest.json").read_text())["metrics"]
    assert m["lut"]["runtimes"]["tflm"] == "ran" and m["lut"]["runtimes"]["litert"].startswith("no:")
    assert m["lut"]["bytes"] == len(lut) and m["lut"]["tflm_arena_bytes"]["total"] > m["tflm_arena_bytes"]["total"]
    assert "AddDecode" in (w2_bundle / "dqnc_policy.h").read_text()


def test_packed_policy_c_is_bit_identical_to_the_int8_model(w2_bundle, tmp_path):
    from dqnc import tflm

    if cpolicy.host_compiler() is None:
        pytest.skip("no host C compiler (cc, gcc, clang)")
    content = (w2_bundle / "model.tflite").read_bytes()
    mlp = cpolicy.extract(content)
    assert not isinstance(mlp, str)
    source = (w2_bundle / "policy.c").read_text()
    assert "#define DQNC_WEIGHT_BITS 2" in source
    m = __import__("json").loads((w2_bundle / "manifest.json").read_text())["metrics"]["c_policy"]
    assert m["host_verified"] and m["weight_bits"] == 2
    assert m["weight_bytes"] == cpolicy.weight_bytes(mlp, 2) < sum(l.weights.size for l in mlp.layers) / 2
    lib = cpolicy.build_host(w2_bundle, tmp_path)
    cp = cpolicy.CPolicy(lib, mlp.obs_dim, mlp.n_actions, mlp.output_scale, mlp.output_zero_point)
    xq = np.random.default_rng(1).integers(-128, 128, size=(3000, mlp.obs_dim)).astype(np.int8)
    micro = tflm.policy(content)
    expected = np.stack([np.array(micro.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])
    assert np.array_equal(cp.scores_int8(xq), expected)
    assert np.array_equal(mlp.forward(xq), expected)


@pytest.mark.skipif(bool(mcu.missing_tools()), reason=f"missing {', '.join(mcu.missing_tools())} "
                    "(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")
def test_packed_policy_c_runs_on_an_emulated_cortex_m4(w2_bundle, tmp_path):
    work = tmp_path / "b"
    shutil.copytree(w2_bundle, work)
    result = mcu.verify_bundle(work, n_vectors=200)
    assert result["vectors"] == 200 and result["actions_equal"] == 200


def test_targets_that_cannot_run_a_form_are_refused_with_exit_2(w2_bundle, trained, tmp_path):
    lut = str(w2_bundle / "model_lut.tflite")
    r = runner.invoke(app, ["eval", lut, "--env", "CartPole-v1", "--runtime", "litert", "-n", "1"])
    assert r.exit_code == 2 and "LUT-compressed" in r.output and "--runtime tflm" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["export", lut, "--env", "CartPole-v1", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "LUT-compressed" in r.output
    r = runner.invoke(app, ["quantize", str(trained), "--mode", "int16x8", "--weight-bits", "4", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "weight_bits" in r.output
    r = runner.invoke(app, ["quantize", str(trained), "--weight-bits", "3", "-o", str(tmp_path / "z")])
    assert r.exit_code == 2


def test_one_weight_scale_per_layer_drops_the_per_channel_arrays(trained, tmp_path):
    """weight_scales: layer (plain int8) stores one scale per Dense kernel, and the file shrinks."""
    from dqnc import artifact as art
    from dqnc import quantize

    out = {}
    for scales in ("layer", "channel"):
        cfg = quantize.QuantizeConfig(weight_scales=scales, calibration_states=300, check_states=300)
        out[scales] = quantize.run(cfg, art.load(trained), tmp_path / scales)
    layer, channel = (cpolicy.extract(out[k].model_path.read_bytes()) for k in ("layer", "channel"))
    assert not isinstance(layer, str) and not isinstance(channel, str)
    # one requantization multiplier per layer (repeated per output row), against one per channel
    assert [np.unique(l.multiplier).size for l in layer.layers] == [1, 1, 1]
    assert any(np.unique(l.multiplier).size > 1 for l in channel.layers)
    assert out["layer"].model_path.stat().st_size < out["channel"].model_path.stat().st_size
