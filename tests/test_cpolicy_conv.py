"""policy.c for int8 conv Q-networks: bit-identical to TensorFlow Lite Micro, exported, evaluated,
and run bare-metal on an emulated Cortex-M4."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc import cpolicy, mcu, tflm

pytest.importorskip("minatar")

runner = CliRunner()
needs_cc = pytest.mark.skipif(cpolicy.host_compiler() is None, reason="no host C compiler (cc, gcc or clang)")
ENV = "MinAtar/Breakout-v1"
# MinAtar-shaped: 10x10x4 frames, a stride-1 and a stride-2 convolution, 32 hidden units.
CONVS = ((8, 3, 1), (6, 3, 2))


def _int8_conv(layout: str, pixels: str, seed: int) -> bytes:
    """A random-weight dqnc conv net as int8 TFLite, calibrated on ``pixels`` ('bool' 0/1 or 'uint8' 0..255)."""
    from dqnc.keras import tf
    from dqnc.qnet.spec import QNetSpec
    from dqnc.quantize import convert

    tf().random.set_seed(seed)
    shape = (10, 10, 4) if layout == "HWC" else (4, 10, 10)
    model = QNetSpec.conv_net(shape, 3, CONVS, (32,), layout=layout).build_plain()
    high = 2 if pixels == "bool" else 256
    return convert(model, "int8", np.random.default_rng(seed).integers(0, high, (200, *shape)).astype(np.float32))


def _same_padding_net() -> bytes:
    """'same' padding, an odd image, a non-square kernel and strides, ReLU6, a linear conv: what dqnc
    does not build itself but the C policy covers."""
    from dqnc.keras import keras, tf
    from dqnc.quantize import convert

    k = keras()
    tf().random.set_seed(3)
    inp = k.Input((9, 11, 3))
    x = k.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu")(inp)
    x = k.layers.Conv2D(4, (2, 3), strides=(1, 2), padding="same", activation="relu6")(x)  # pads below only
    x = k.layers.Conv2D(6, 2, padding="valid")(x)  # every window inside: the input offset folded into the bias
    x = k.layers.Dense(7, activation="relu")(k.layers.Flatten()(x))
    model = k.Model(inp, k.layers.Dense(4)(x))
    return convert(model, "int8", np.random.default_rng(3).normal(size=(100, 9, 11, 3)).astype(np.float32))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("conv_models")
    paths = {}
    for name, content in (("HWC", _int8_conv("HWC", "bool", 0)), ("CHW", _int8_conv("CHW", "uint8", 1)),
                          ("same", _same_padding_net())):
        paths[name] = out / f"{name}.tflite"
        paths[name].write_bytes(content)
    return paths


def _tflm_raw(micro, xq: np.ndarray) -> np.ndarray:
    return np.stack([np.array(micro.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])


def _env_states(n: int, layout: str) -> np.ndarray:
    """Frames MinAtar Breakout shows a random policy, in ``layout``."""
    from dqnc.envs import collect_states, env_spec

    spec = env_spec(ENV)
    states = collect_states(lambda o: np.random.default_rng(len(o)).normal(size=(len(o), 3)), spec, n, seed=7, epsilon=1.0)
    return states if layout == "HWC" else states.transpose(0, 3, 1, 2)


@needs_cc
@pytest.mark.parametrize("name", ["HWC", "CHW", "same"])
def test_conv_policy_c_equals_tflm_bit_for_bit(models, name, tmp_path):
    """2,000+ states: uniformly random int8 inputs (every saturation corner), random bool or uint8
    pixels, and MinAtar frames through the observation quantizer."""
    from dqnc.runtime import Policy

    content = models[name].read_bytes()
    net = cpolicy.extract(content, conv=True)
    assert isinstance(net, cpolicy.IntegerConvNet), net
    assert (net.perm is not None) == (name == "CHW")
    lite = Policy(model_content=content)
    cpolicy.write(net, lite, ["no-op", "left", "right", "fire"][: net.n_actions], tmp_path)
    c = cpolicy.CPolicy(cpolicy.build_host(tmp_path, tmp_path), net.obs_dim, net.n_actions, net.output_scale,
                        net.output_zero_point)
    micro = tflm.policy(content, {})
    rng = np.random.default_rng(0)
    xq = rng.integers(-128, 128, size=(1500, *net.input_shape)).astype(np.int8)
    raw = _tflm_raw(micro, xq)
    assert (c.scores_int8(xq) == raw).all()
    assert (net.forward(xq) == raw).all()
    if name == "same":
        obs = rng.normal(size=(500, net.obs_dim)).astype(np.float32)
    else:
        pixels = rng.integers(0, 2 if name == "HWC" else 256, size=(500, *net.input_shape))
        obs = np.concatenate([pixels, _env_states(500, name)]).reshape(1000, -1).astype(np.float32)
    assert (c.quantize(obs) == micro.quantize_input(obs)).all()  # C and the Python runner quantize alike
    raw_obs = _tflm_raw(micro, c.quantize(obs).reshape(-1, *net.input_shape))
    assert (c.scores_int8(c.quantize(obs)) == raw_obs).all()
    assert (c.q_values(obs) == micro.q_values(obs)).all()
    assert c.takes_pixels  # one input scale and zero point for every pixel: the float-free byte entry exists
    if name != "same":  # bool or uint8 pixels through dqnc_policy_act_u8's table
        assert (c.scores_u8(obs) == raw_obs).all()
    header = (tmp_path / cpolicy.HEADER).read_text()
    assert f"#define DQNC_SCRATCH_BYTES {cpolicy.sizes(net)['activation_ram_bytes']}" in header
    assert "malloc" not in (tmp_path / cpolicy.SOURCE).read_text()


def test_conv_scratch_buffer_holds_the_two_largest_adjacent_tensors(models):
    net = cpolicy.extract(models["CHW"].read_bytes(), conv=True)
    sizes, offsets, total = cpolicy.scratch_plan(net)
    assert sizes == [400, 400, 8 * 8 * 8, 3 * 3 * 6, 32, 3]  # input, transposed input, two convs, two dense
    assert total == 400 + 512 and all(a + b <= total for a, b in zip(sizes, sizes[1:]))
    for k in range(1, len(sizes)):  # a layer's output never overlaps its input
        (a0, a1), (b0, b1) = (offsets[k - 1], offsets[k - 1] + sizes[k - 1]), (offsets[k], offsets[k] + sizes[k])
        assert a1 <= b0 or b1 <= a0


def test_fc_only_extraction_refuses_conv_nets_and_unsupported_ops_are_named(models):
    from dqnc.keras import keras
    from dqnc.quantize import convert

    assert "FULLY_CONNECTED" in cpolicy.extract(models["HWC"].read_bytes())  # the MLP reader (crosscheck's) is unchanged
    k = keras()
    inp = k.Input((10, 10, 4))
    x = k.layers.MaxPooling2D(2)(k.layers.Conv2D(4, 3, activation="relu")(inp))
    pooled = convert(k.Model(inp, k.layers.Dense(3)(k.layers.Flatten()(x))), "int8",
                     np.random.default_rng(0).integers(0, 2, (50, 10, 10, 4)).astype(np.float32))
    reason = cpolicy.extract(pooled, conv=True)
    assert isinstance(reason, str) and "CONV_2D -> MAX_POOL_2D -> RESHAPE -> FULLY_CONNECTED" in reason


@pytest.fixture(scope="module")
def conv_bundle(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import artifact as art
    from dqnc import export
    from dqnc.envs import env_spec

    out = tmp_path_factory.mktemp("conv_bundle") / "b"
    export.run(export.ExportConfig(target="mcu", check_states=300), art.load(models["HWC"], env=env_spec(ENV)), out)
    return out


@needs_cc
def test_export_of_a_conv_int8_model_writes_a_policy_c_checked_against_tflm(conv_bundle, models):
    m = json.loads((conv_bundle / "manifest.json").read_text())["metrics"]
    entry = m["c_policy"]
    net = cpolicy.extract(models["HWC"].read_bytes(), conv=True)
    assert entry["written"] and entry["host_verified"] and entry["conv_layers"] == 2 and entry["layers"] == 2
    assert entry["int8_outputs_equal_tflm"] == 300 * 3
    assert entry["activation_ram_bytes"] == cpolicy.scratch_plan(net)[2] == 400 + 8 * 8 * 8
    assert entry["weight_bytes"] == 8 * 36 + 6 * 72 + 54 * 32 + 32 * 3
    # bias, multiplier and shift per channel; one input map pair and the 256-entry byte-pixel table
    assert entry["const_data_bytes"] == entry["weight_bytes"] + 9 * (8 + 6 + 32 + 3) + 8 + 256
    assert entry["pixel_input_verified"] is True  # MinAtar's 0/1 frames also went through dqnc_policy_act_u8
    assert "int dqnc_policy_act_u8(" in (conv_bundle / "policy.h").read_text()
    assert (conv_bundle / "policy.c").is_file() and "policy.c" in (conv_bundle / "SHA256SUMS").read_text()


@needs_cc
def test_eval_runs_a_conv_bundle_on_the_c_runtime_as_on_tflm(conv_bundle):
    from dqnc.cli import app

    results = {}
    for rt in ("tflm", "c"):
        r = runner.invoke(app, ["eval", str(conv_bundle), "--runtime", rt, "-n", "2", "--latency-samples", "20", "--json"])
        assert r.exit_code == 0, r.output
        results[rt] = json.loads(r.stdout)
    assert results["c"]["runtime"] == "c"
    assert results["c"]["mean_return"] == results["tflm"]["mean_return"]  # bit-identical outputs, same episodes


@pytest.mark.skipif(bool(mcu.missing_tools()), reason=f"missing {', '.join(mcu.missing_tools())} "
                    "(apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")
def test_conv_policy_runs_bare_metal_on_an_emulated_cortex_m4(conv_bundle):
    result = mcu.verify_bundle(conv_bundle, n_vectors=100)
    assert result["vectors"] == 100 and result["actions_equal"] == 100
    assert result["sections"]["rodata"] >= 8 * 36 + 6 * 72 + 54 * 32 + 32 * 3
    assert result["sections"]["bss"] >= 400 + 8 * 8 * 8  # the one scratch buffer
    # 8x8x8 outputs of 36 taps plus 3x3x6 of 72 and 1,824 dense weights: more than one instruction each
    assert 8 * 8 * 8 * 36 + 3 * 3 * 6 * 72 + 1824 < result["instructions_per_action"] < 1e7
