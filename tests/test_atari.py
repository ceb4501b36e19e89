"""Atari: ALE ids through gymnasium's standard wrappers, CHW frames into a conv net, and the chain
train -> quantize -> export -> eval on LiteRT (and TFLite Micro) feeding every runtime the same tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc.cli import app
from dqnc.config import build_train_config

pytest.importorskip("ale_py", reason="Atari needs the atari extra: pip install 'dqnc[atari]'")
pytest.importorskip("cv2", reason="AtariPreprocessing resizes frames with opencv: pip install 'dqnc[atari]'")

runner = CliRunner()
ENV = "ALE/Breakout-v5"
# Episodes are capped at 400 frames (100 agent steps): a barely trained Breakout policy that never
# presses FIRE would otherwise idle for the ALE's full 108,000 frames.
CAP = {"max_num_frames_per_episode": 400}
TINY_ATARI = dict(conv=[[4, 8, 4], [8, 4, 2]], hidden=[32], total_steps=400, num_envs=4, learning_starts=200,
                  train_freq=100, gradient_steps=10, batch_size=16, buffer_size=400, eval_freq=400, eval_episodes=2,
                  confirm_episodes=0, env_kwargs=CAP)


@pytest.fixture(scope="session")
def atari_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import train

    out = tmp_path_factory.mktemp("atari") / "fp32"
    train.run(build_train_config(ENV, {}, TINY_ATARI), out)
    return out


@pytest.fixture(scope="session")
def atari_int8(atari_fp32: Path) -> Path:
    from dqnc import artifact as art
    from dqnc import quantize

    out = atari_fp32.parent / "int8"
    quantize.run(quantize.QuantizeConfig(calibration_states=150, check_states=150, check_episodes=0),
                 art.load(atari_fp32), out)
    return out


@pytest.fixture(scope="session")
def atari_keras(atari_fp32: Path) -> object:
    from dqnc.policy import load_keras_model

    return load_keras_model(atari_fp32 / "model")


def test_atari_env_with_standard_wrappers_gives_uint8_chw_frames_seeded_by_reset():
    from dqnc.envs import env_spec, make_env

    spec = env_spec(ENV, CAP)
    assert spec.obs_shape == (4, 84, 84) and spec.obs_dtype == "uint8" and spec.obs_layout == "CHW"
    assert spec.action_meanings == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    # The wrappers are named in the recorded kwargs, and v5's own frame skip is off (AtariPreprocessing skips).
    assert [next(iter(w)) for w in spec.wrappers] == ["AtariPreprocessing", "FrameStackObservation"]
    assert spec.kwargs["frameskip"] == 1 and spec.wrappers[0]["AtariPreprocessing"]["frame_skip"] == 4
    assert spec.obs_low == [0.0] and spec.obs_high == [255.0]  # an image's uniform bound, once
    env = make_env(spec.id, spec.kwargs)
    try:
        first, _ = env.reset(seed=123)
        again, _ = env.reset(seed=123)
        assert first.shape == (4, 84, 84) and first.dtype == np.uint8
        np.testing.assert_array_equal(first, again)
        frames = [env.step(1)[0] for _ in range(3)]
        # Frame stacking: the newest frame moves one slot towards the front each step.
        np.testing.assert_array_equal(frames[1][:3], frames[0][1:])
    finally:
        env.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"frameskip": 4}, "would skip frames twice"),
    ({"wrappers": ["FrameStack"]}, "unknown wrapper 'FrameStack': did you mean 'FrameStackObservation'?"),
    ({"wrappers": [{"FrameStackObservation": {"stack_size": 0}}]}, "wrapper FrameStackObservation"),
    ({"wrappers": 5}, "env_kwargs 'wrappers' must be a list, got int"),
])
def test_bad_atari_wrappers_are_one_line_errors(kwargs, message, tmp_path):
    r = runner.invoke(app, ["train", "--env", ENV, "--env-kwargs", json.dumps(kwargs), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and len(r.output.strip().splitlines()) <= 3


def test_chw_conv_net_reads_frames_as_the_env_gives_them_and_records_its_layout(atari_fp32, atari_keras):
    from dqnc import artifact as art
    from dqnc.envs import collect_states
    from dqnc.nets_conv import NumpyConvNet
    from dqnc.policy import q_function

    a = art.load(atari_fp32)
    assert a.env.obs_layout == "CHW" and a.env.obs_shape == (4, 84, 84)
    assert a.network["layout"] == "CHW" and a.network["conv"] == [[4, 8, 4], [8, 4, 2]]
    assert [next(iter(w)) for w in a.manifest["env"]["kwargs"]["wrappers"]] == ["AtariPreprocessing",
                                                                                "FrameStackObservation"]
    q = q_function(a)
    assert isinstance(q, NumpyConvNet) and q.layout == "CHW"
    states = collect_states(q, a.env, 150, seed=7, epsilon=0.5)
    assert states.shape == (150, 4, 84, 84) and states.dtype == np.uint8  # 1 byte a pixel
    model = atari_keras
    # One transpose, inside the model: Keras' CPU Conv2D is channels-last.
    assert [type(l).__name__ for l in model.layers] == ["Permute", "Conv2D", "Conv2D", "Flatten", "Dense", "Dense"]
    expected = model(states.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(q(states), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(q(states.reshape(150, -1)), q(states))  # the flat CHW order is the same tensor


def test_chw_model_and_its_tflite_file_give_identical_actions(atari_fp32, atari_keras):
    from dqnc import artifact as art
    from dqnc.envs import collect_states
    from dqnc.policy import q_function
    from dqnc.quantize import convert
    from dqnc.runtime import Policy

    parent = art.load(atari_fp32)
    lite = Policy(model_content=convert(atari_keras, "fp32"))
    assert lite.io()["input"]["shape"] == [1, 4, 84, 84]
    q_parent = q_function(parent)
    states = collect_states(q_parent, parent.env, 300, seed=11, epsilon=0.5)
    q_ref, q_lite = q_parent(states), lite.q_values(states)
    np.testing.assert_array_equal(q_lite.argmax(axis=1), q_ref.argmax(axis=1))
    assert np.abs(q_lite - q_ref).max() <= 1e-4 * max(1.0, float(np.abs(q_ref).max()))


def test_tiny_atari_conv_net_quantizes_exports_to_tflm_and_evaluates_on_litert(atari_int8, atari_fp32, tmp_path):
    from dqnc import artifact as art
    from dqnc import export
    from dqnc.tflm import op_names, read_model

    q8 = art.load(atari_int8)
    assert q8.manifest["quantization"]["input"]["shape"] == [1, 4, 84, 84]
    assert q8.manifest["metrics"]["check"]["regret"] <= 0.05
    assert op_names(read_model(q8.model_path.read_bytes()))[0] == "TRANSPOSE"
    bundle = export.run(export.ExportConfig(target="mcu", check_states=100), q8, tmp_path / "bundle")
    m = bundle.manifest["metrics"]
    assert m["tflm_compatible"] is True and m["tflm_check"]["actions_equal"] >= 99
    obs = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert "CHW" in json.dumps(obs) and "FrameStackObservation" in json.dumps(obs)
    # TFLite Micro was fed the same CHW tensor as LiteRT (export's check above); eval on LiteRT:
    r = runner.invoke(app, ["eval", str(tmp_path / "bundle"), "-n", "2", "--json", "--runtime", "litert",
                            "--latency-samples", "10", "--reference", str(atari_fp32)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["mean_length"] <= 100  # the capped episodes: 400 frames less the random no-ops at reset
    assert res["states"] == 2 * res["mean_length"]
    assert res["regret"] <= 0.05 and res["latency_p50_us"] > 0


def test_pixel_model_with_a_vector_env_and_2d_frames_are_one_line_errors(atari_int8, tmp_path):
    tfl = tmp_path / "m.tflite"  # a bare file: the env comes from --env
    shutil.copy(atari_int8 / "model.tflite", tfl)
    r = runner.invoke(app, ["eval", str(tfl), "--env", "CartPole-v1", "-n", "1"])
    assert r.exit_code == 2, r.output
    assert "reads 4x84x84 (CHW) images but env 'CartPole-v1' gives flat observations (4,)" in " ".join(r.output.split())
    cfg = tmp_path / "c.yaml"
    # AtariPreprocessing without frame stacking gives 2-D (84, 84) frames: no channel axis for a conv net.
    cfg.write_text("conv: [[4, 8, 4]]\nhidden: [8]\ntotal_steps: 10\nenv_kwargs:\n  wrappers: [AtariPreprocessing]\n")
    r = runner.invoke(app, ["train", "--env", ENV, "--config", str(cfg), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "gives 2-D observations (84, 84)" in out and "FrameStackObservation" in out
    assert len(r.output.strip().splitlines()) <= 3 and not (tmp_path / "m").exists()
