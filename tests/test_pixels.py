"""Pixel DQN: a conv Q-network on MinAtar Breakout through train -> quantize -> export -> eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc.cli import app
from dqnc.config import build_train_config
from dqnc.replay import ReplayBuffer

pytest.importorskip("minatar")

runner = CliRunner()
ENV = "MinAtar/Breakout-v1"
TINY_CONV = dict(conv=[[8, 3, 1]], hidden=[32], total_steps=1200, num_envs=4, learning_starts=400, train_freq=200,
                 gradient_steps=20, batch_size=32, buffer_size=2000, eval_freq=1200, eval_episodes=2,
                 confirm_episodes=0)


@pytest.fixture(scope="session")
def conv_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import train

    out = tmp_path_factory.mktemp("pixels") / "fp32"
    train.run(build_train_config(ENV, {}, TINY_CONV), out)
    return out


@pytest.fixture(scope="session")
def conv_int8(conv_fp32: Path) -> Path:
    from dqnc import artifact as art
    from dqnc import quantize

    out = conv_fp32.parent / "int8"
    quantize.run(quantize.QuantizeConfig(calibration_states=200, check_states=300, check_episodes=5),
                 art.load(conv_fp32), out)
    return out


@pytest.fixture(scope="session")
def conv_bundle(conv_int8: Path) -> Path:
    from dqnc import artifact as art
    from dqnc import export

    out = conv_int8.parent / "bundle"
    export.run(export.ExportConfig(target="mcu", check_states=300), art.load(conv_int8), out)
    return out


def test_trained_conv_net_records_its_image_layout_and_runs_without_keras(conv_fp32):
    from dqnc import artifact as art
    from dqnc.envs import collect_states
    from dqnc.nets_conv import NumpyConvNet
    from dqnc.policy import load_keras_model, q_function

    a = art.load(conv_fp32)
    assert a.env.obs_layout == "HWC" and a.env.obs_shape == (10, 10, 4) and a.env.obs_dtype == "bool"
    assert a.network["saved_as"] == "sequential_conv" and a.network["conv"] == [[8, 3, 1]]
    q = q_function(a)
    assert isinstance(q, NumpyConvNet)
    states = collect_states(q, a.env, 200, seed=5, epsilon=0.3)
    assert states.shape == (200, 10, 10, 4)  # rollouts keep the image shape
    model = load_keras_model(a.model_path)
    assert [type(l).__name__ for l in model.layers] == ["Conv2D", "Flatten", "Dense", "Dense"]
    np.testing.assert_allclose(q(states), model(states, training=False).numpy(), rtol=1e-4, atol=1e-5)
    # The flat (HWC row-major) order every runtime accepts gives the same Q-values.
    np.testing.assert_allclose(q(states.reshape(200, -1)), q(states), rtol=0, atol=0)


def test_int8_conv_has_per_channel_weights_and_matches_its_parent(conv_int8, conv_fp32):
    from dqnc import artifact as art
    from dqnc.tflm import op_names, read_model

    a = art.load(conv_int8)
    m = read_model(a.model_path.read_bytes())
    assert "CONV_2D" in op_names(m)
    sg = m.subgraphs[0]
    conv_op = next(op for op in sg.operators if m.operatorCodes[op.opcodeIndex].builtinCode == 3)  # CONV_2D
    filt = sg.tensors[int(conv_op.inputs[1])]
    assert len(filt.quantization.scale) == 8  # one scale per output channel
    # Pixels are not standardized (bool/uint8 fit one int8 input scale); the head is centered.
    assert a.manifest["preprocess"] == {"outputs": "centered_q_values"}
    assert a.manifest["metrics"]["output_range_factor"] <= 1.0
    check = a.manifest["metrics"]["check"]
    # A barely trained net has many near-ties: the decisive states and the regret are the measure.
    assert check["decisive_agreement"] >= 0.97 and check["regret"] <= 0.02
    assert check["q_rel_error"] <= 0.05


def test_center_head_keeps_every_action_and_removes_the_mean_over_actions(conv_fp32):
    from dqnc import artifact as art
    from dqnc.envs import collect_states
    from dqnc.policy import load_keras_model, q_function
    from dqnc.quantize import center_head

    a = art.load(conv_fp32)
    model = load_keras_model(a.model_path)
    states = collect_states(q_function(a), a.env, 300, seed=7, epsilon=0.3)
    centered, pre = center_head(model)
    assert pre == {"outputs": "centered_q_values"}
    q, c = model(states).numpy(), centered(states).numpy()
    np.testing.assert_allclose(c, q - q.mean(axis=1, keepdims=True), atol=1e-4 * np.abs(q).max())
    top2 = np.sort(q, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4 * np.abs(q).max()  # exact float ties may round either way
    assert clear.mean() > 0.5 and (c.argmax(axis=1) == q.argmax(axis=1))[clear].all()
    np.testing.assert_array_equal(model(states).numpy(), q)  # the source model is untouched


def test_export_verifies_conv_on_tflm_and_writes_a_policy_c_bit_identical_to_it(conv_bundle, conv_fp32):
    from dqnc import artifact as art

    a = art.load(conv_bundle)
    m = a.manifest["metrics"]
    assert m["tflm_compatible"] is True
    assert m["c_policy"]["written"] is True and m["c_policy"]["host_verified"] and m["c_policy"]["conv_layers"] == 1
    assert (conv_bundle / "policy.c").exists()
    obs = json.loads((conv_bundle / "manifest.json").read_text())
    assert "HWC" in json.dumps(obs)
    results = {}
    for rt in ("litert", "tflm", "c"):
        r = runner.invoke(app, ["eval", str(conv_bundle), "-n", "3", "--json", "--runtime", rt, "--latency-samples", "20",
                                "--reference", str(conv_fp32)])
        assert r.exit_code == 0, r.output
        results[rt] = json.loads(r.stdout)
    assert results["litert"]["mean_return"] == results["tflm"]["mean_return"] == results["c"]["mean_return"]
    # Q errors leave out the states whose (narrowed) int8 outputs saturate, and say how many there were.
    assert 0.0 <= results["litert"]["saturated_share"] < 1.0
    assert results["litert"]["regret"] <= 0.05  # of the action spread, over ~20 visited states


def test_replay_buffer_stores_bool_and_uint8_images_compactly():
    rng = np.random.default_rng(0)
    for dtype in (np.bool_, np.uint8):
        buf = ReplayBuffer(16, (10, 10, 4), dtype)
        obs = rng.integers(0, 2, (6, 10, 10, 4)).astype(dtype)
        buf.add(obs, np.arange(6), np.ones(6), obs[::-1], np.zeros(6))
        assert buf.obs.dtype == dtype and buf.obs.nbytes == 16 * 400
        o, a, _, n, _ = buf.sample(rng, 2, 5)
        assert o.dtype == np.float32 and o.shape == (2, 5, 10, 10, 4)
        np.testing.assert_array_equal(o, obs[a].astype(np.float32))
        np.testing.assert_array_equal(n, obs[::-1][a].astype(np.float32))


@pytest.mark.parametrize("env", ["CartPole-v1", "tests.grid2d_env:Grid2D-v0"])
def test_conv_on_non_image_observations_is_a_one_line_error(tmp_path, env):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("conv: [[4, 3, 1]]\nhidden: [8]\ntotal_steps: 10\n")
    r = runner.invoke(app, ["train", "--env", env, "--config", str(cfg), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2, r.output
    assert "'conv' needs (height, width, channels) image observations" in r.output
    assert "drop 'conv'" in r.output and len(r.output.strip().splitlines()) <= 3  # one (wrapped) line
    assert not (tmp_path / "m").exists()


def test_pixel_model_with_a_vector_env_is_a_one_line_error(conv_int8, conv_fp32, tmp_path):
    tfl = tmp_path / "m.tflite"
    shutil.copy(conv_int8 / "model.tflite", tfl)
    saved = tmp_path / "saved"
    shutil.copytree(conv_fp32 / "model", saved)
    for path in (tfl, saved):
        r = runner.invoke(app, ["eval", str(path), "--env", "CartPole-v1", "-n", "1"])
        assert r.exit_code == 2, r.output
        assert "reads 10x10x4 (HWC) images but env 'CartPole-v1' gives flat observations (4,)" in " ".join(r.output.split())


def test_conv_net_prunes_to_the_target_and_quantizes(conv_fp32, tmp_path):
    from dqnc import artifact as art
    from dqnc import prune, quantize
    from dqnc.config import PruneConfig
    from dqnc.policy import load_keras_model, q_function

    cfg = PruneConfig(sparsity=0.5, keep_dense=("last",), states=300, epochs=3, check_states=200)
    pruned = prune.run(cfg, art.load(conv_fp32), tmp_path / "pruned")
    layers = {l["name"]: l for l in pruned.manifest["metrics"]["layers"]}
    assert layers["conv_0"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # Conv2D kernels are pruned too
    assert layers["dense_0"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert layers["q_values"]["sparsity"] == 0.0
    assert pruned.manifest["metrics"]["check"]["regret"] <= 0.1
    # Policy distillation (with DAgger) as for MLPs: the outputs rank actions, and its options apply.
    assert pruned.outputs == "action_scores" and pruned.manifest["metrics"]["loss_history"]
    hinge = prune.run(cfg.model_copy(update={"distill_loss": "hinge"}), art.load(conv_fp32), tmp_path / "hinge")
    assert hinge.manifest["metrics"]["loss_history"] != pruned.manifest["metrics"]["loss_history"]
    q = q_function(pruned)
    x = np.random.default_rng(0).integers(0, 2, (5, 10, 10, 4)).astype(np.float32)
    np.testing.assert_allclose(q(x), load_keras_model(pruned.model_path)(x).numpy(), rtol=1e-4, atol=1e-5)
    q8 = quantize.run(quantize.QuantizeConfig(calibration_states=200, check_states=200, check_episodes=3), pruned,
                      tmp_path / "int8")
    assert q8.manifest["metrics"]["check"]["regret"] <= 0.05
    r = runner.invoke(app, ["prune", str(conv_fp32), "--finetune", "rl", "-o", str(tmp_path / "rl")])
    assert r.exit_code == 2 and "--finetune rl covers Dense MLPs" in r.output


def test_conv_parent_distills_into_a_dense_student_on_flattened_images(conv_fp32, tmp_path):
    from dqnc import artifact as art
    from dqnc import distill
    from dqnc.config import DistillConfig
    from dqnc.policy import q_function

    cfg = DistillConfig(hidden=[16], states=600, steps=300, dagger_rounds=1, dagger_steps=100, check_states=200)
    out = distill.run(cfg, art.load(conv_fp32), tmp_path / "student")
    m = out.manifest["metrics"]
    assert m["parent_params"] == 8 * 4 * 9 + 8 + 8 * 8 * 8 * 32 + 32 + 32 * 3 + 3  # the conv parent's own count
    assert m["check"]["regret"] <= 0.1
    student = q_function(out)
    assert student(np.zeros((2, 10, 10, 4), np.float32)).shape == (2, 3)


def test_numpy_conv_forward_matches_keras_with_strides_and_several_layers():
    from dqnc.nets_conv import ConvSpec, NumpyConvNet, build_conv_q_network
    from dqnc.nets import dense_weights

    spec = ConvSpec((12, 11, 3), 5, ((4, 3, 2), (6, 2, 1)), (7,), "relu", dueling=True)
    model = build_conv_q_network(spec)
    x = np.random.default_rng(1).random((9, 12, 11, 3)).astype(np.float32)
    net = NumpyConvNet(dense_weights(model), [2, 1], spec.obs_shape, ["relu"] * 3)
    np.testing.assert_allclose(net(x), model(x, training=False).numpy(), rtol=1e-4, atol=1e-5)
    assert spec.feature_shapes() == [(5, 5, 4), (4, 4, 6)]
    assert spec.params() == sum(int(np.prod(w.shape)) for w in dense_weights(model))


@pytest.mark.parametrize("bump, accepted", [(1, True), (5, False)])
def test_tflm_flips_on_conv_nets_pass_only_as_near_ties(conv_int8, monkeypatch, bump, accepted):
    """A TFLM that ranks near-tied actions differently (by ``bump`` int8 steps) is accepted as
    rounding only within NEAR_TIE_STEPS; larger differences stop the export."""
    from dqnc import artifact as art
    from dqnc import export, tflm
    from dqnc.errors import GateFailed
    from dqnc.runtime import Policy

    a = art.load(conv_int8)
    content = a.model_path.read_bytes()
    lite = Policy.from_manifest(str(a.model_path), a.manifest)
    ref = Policy.from_manifest(str(a.model_path), a.manifest)

    class Shifted:
        def invoke_quantized(self, x):  # LiteRT's outputs, the best dropped below the runner-up where close
            out = np.array(ref.invoke_quantized(x), np.int64).reshape(-1)
            order = np.argsort(-out, kind="stable")
            if out[order[0]] - out[order[1]] <= 1 and out[order[1]] - bump >= -128:
                out[order[0]] = out[order[1]] - bump  # lowered, not raised: the best may sit at 127
            return out.astype(np.int8)[None]

    monkeypatch.setattr(tflm, "policy", lambda *args, **kw: Shifted())
    states = np.random.default_rng(0).integers(0, 2, (300, 10, 10, 4)).astype(np.float32)
    if accepted:
        _, figures, _, _ = export.verify_tflm(content, lite, a.manifest, states, max_mismatch=1.0)
        assert figures["int8_near_ties"] == 300 - figures["actions_equal"] > 0
    else:
        with pytest.raises(GateFailed, match="more than the two runtimes' rounding explains"):
            export.verify_tflm(content, lite, a.manifest, states, max_mismatch=1.0)
    # With the parent's Q-values, a flip is a tie when the parent rates both actions the same, however
    # many int8 steps apart the runtimes put them (a narrowed output range counts finer steps).
    n_actions = lite.q_values(states[:1]).shape[1]
    indifferent = np.repeat(np.linspace(0.0, 3.0, 300)[:, None], n_actions, axis=1)  # a Q range, no action gaps
    _, figures, _, _ = export.verify_tflm(content, lite, a.manifest, states, max_mismatch=1.0, q_parent=indifferent)
    assert figures["parent_ties"] == 300 - figures["actions_equal"] > 0
    assert set(figures["regret_vs_parent"]) == {"tflm", "litert"}
    if not accepted:  # a parent with clear preferences between every pair of actions: TFLM's flips cost regret
        decisive = np.tile(np.arange(n_actions, dtype=np.float64), (300, 1))
        with pytest.raises(GateFailed, match="strays from its parent.*regret") as e:
            export.verify_tflm(content, lite, a.manifest, states, max_mismatch=1.0, q_parent=decisive)
        assert e.value.result["tflm_check"]["regret_vs_parent"]["tflm"] > 0.05


def test_spaceinvaders_defaults_resolve_to_a_conv_net():
    from dqnc.config import build_train_config
    from dqnc.envs import env_spec
    from dqnc.nets_conv import conv_spec_for

    cfg = build_train_config("MinAtar/SpaceInvaders-v1", {}, {})
    assert cfg.conv == [[16, 3, 1]] and cfg.hidden == [128] and cfg.total_steps == 1_000_000
    spec = conv_spec_for(env_spec(cfg.env, cfg.env_kwargs), cfg.conv, cfg.hidden, cfg.activation, cfg.dueling)
    assert spec.obs_shape == (10, 10, 6) and spec.n_actions == 4
    assert spec.params() == 6 * 9 * 16 + 16 + 1024 * 128 + 128 + 128 * 4 + 4
