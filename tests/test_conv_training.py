"""Conv nets train under XLA with im2col convolutions: equal to TF's Conv2D update, and reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from dqnc.config import build_train_config

pytest.importorskip("minatar")


def _tiny_nets(dueling: bool, seed: int = 0):
    from dqnc.keras import keras
    from dqnc.nets_conv import ConvSpec, build_conv_q_network

    keras().utils.set_random_seed(seed)
    spec = ConvSpec((7, 6, 3), 4, conv=((5, 3, 1), (4, 2, 2)), hidden=(16,), dueling=dueling)
    q, target = build_conv_q_network(spec, "q"), build_conv_q_network(spec, "t")
    target.set_weights([w + 0.01 for w in q.get_weights()])
    return q, target


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_im2col_convolution_equals_tf_conv2d(stride):
    from dqnc.keras import tf
    from dqnc.nets_conv import im2col_conv

    rng = np.random.default_rng(stride)
    x = rng.standard_normal((5, 9, 8, 3)).astype(np.float32)
    k = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    want = tf().nn.conv2d(x, k, stride, "VALID").numpy()
    got = im2col_conv(tf().constant(x), tf().constant(k), stride).numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# MinAtar's network (no dueling head) only: the override replaces Conv2D's convolution op, which
# a dueling head never touches, and each case compiles four networks.
@pytest.mark.parametrize("dueling", [False])
def test_compiled_im2col_update_equals_the_reference_update(dueling):
    """Three Double-DQN steps (one target copy among them) through XLA + im2col, from bool batches,
    land on the same weights as the plain tf.function with TF's Conv2D on float batches."""
    from dqnc.keras import keras
    from dqnc.nets_conv import use_im2col
    from dqnc.train import _make_update_fn

    cfg = build_train_config("MinAtar/Breakout-v1", {}, dict(target_update_interval=2, lr=1e-2, max_grad_norm=0.5))
    nets = {}
    for name in ("reference", "fast"):
        q, target = _tiny_nets(dueling)
        if name == "fast":
            use_im2col(q)
            use_im2col(target)
        opt = keras().optimizers.Adam(learning_rate=cfg.lr)
        nets[name] = (q, target, _make_update_fn(q, target, opt, cfg, jit=name == "fast"))
    rng = np.random.default_rng(1)
    k, b = 3, 16
    obs, next_obs = rng.random((k, b, 7, 6, 3)) < 0.3, rng.random((k, b, 7, 6, 3)) < 0.3
    actions = rng.integers(0, 4, (k, b)).astype(np.int32)
    rewards = rng.standard_normal((k, b)).astype(np.float32)
    terminated = (rng.random((k, b)) < 0.2).astype(np.float32)
    ref_loss = float(nets["reference"][2](obs.astype(np.float32), actions, rewards, next_obs.astype(np.float32),
                                          terminated))
    fast_loss = float(nets["fast"][2](obs, actions, rewards, next_obs, terminated))
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    start = _tiny_nets(dueling)[0].get_weights()
    for model in (0, 1):  # online and target networks
        for w_ref, w_fast, w0 in zip(nets["reference"][model].get_weights(), nets["fast"][model].get_weights(), start):
            np.testing.assert_allclose(w_fast, w_ref, rtol=1e-4, atol=1e-5)
    # The steps moved the weights (lr 1e-2), so the equality above compares real updates.
    assert max(float(np.abs(a - b).max()) for a, b in zip(nets["fast"][0].get_weights(), start)) > 1e-3


def test_conv_training_is_reproducible(tmp_path):
    from dqnc import artifact as art
    from dqnc import train

    tiny = dict(conv=[[4, 3, 1]], hidden=[16], total_steps=640, num_envs=4, learning_starts=128, train_freq=64,
                gradient_steps=4, batch_size=16, buffer_size=1000, eval_freq=640, eval_episodes=1,
                confirm_episodes=0)
    cfg = build_train_config("MinAtar/Breakout-v1", {}, tiny)
    weights = []
    for name in ("a", "b"):
        out = train.run(cfg, tmp_path / name)
        weights.append(np.load(out.path / "convnet.npz"))
        assert art.load(out.path).manifest["metrics"]["gradient_steps"] == 4 * (640 - 128) // 64 + 4
    for key in weights[0].files:
        np.testing.assert_array_equal(weights[0][key], weights[1][key])
