"""The DQN core against numpy references: Double-DQN targets, truncation bootstrapping, the
target-update cadence, the epsilon schedule, and a small learning test."""

from __future__ import annotations

import numpy as np
import pytest

from dqnc import train
from dqnc.config import build_train_config
from dqnc.nets import NetSpec, NumpyMLP, build_plain_mlp, dense_weights
from dqnc.schedules import linear


def _nets(seed: int = 0, obs: int = 3, actions: int = 3):
    rng = np.random.default_rng(seed)
    spec = NetSpec(obs, actions, (5,), "relu")
    shapes = [(obs, 5), (5,), (5, actions), (actions,)]
    wq = [rng.normal(size=s).astype(np.float32) for s in shapes]
    wt = [rng.normal(size=s).astype(np.float32) for s in shapes]
    return spec, build_plain_mlp(spec, wq), build_plain_mlp(spec, wt, name="target"), wq, wt


def _huber(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax < 1.0, 0.5 * x * x, ax - 0.5)


@pytest.mark.parametrize("double", [True, False])
def test_update_loss_matches_a_numpy_double_dqn_reference(double):
    from dqnc.keras import keras

    spec, q, target, wq, wt = _nets()
    cfg = build_train_config("CartPole-v1", {}, {"double_dqn": double, "gamma": 0.9, "target_update_interval": 1000})
    update = train._make_update_fn(q, target, keras().optimizers.SGD(learning_rate=0.0), cfg, jit=False)
    rng = np.random.default_rng(1)
    k, b = 2, 8
    obs = rng.normal(size=(k, b, 3)).astype(np.float32)
    nxt = rng.normal(size=(k, b, 3)).astype(np.float32)
    actions = rng.integers(0, 3, (k, b)).astype(np.int32)
    rewards = rng.normal(size=(k, b)).astype(np.float32)
    terminated = (rng.random((k, b)) < 0.3).astype(np.float32)
    loss = float(update(obs, actions, rewards, nxt, terminated))
    fq, ft = NumpyMLP(wq, "relu"), NumpyMLP(wt, "relu")
    losses = []
    for i in range(k):
        qt = ft(nxt[i])
        a_next = (fq(nxt[i]) if double else qt).argmax(axis=1)
        y = rewards[i] + 0.9 * (1 - terminated[i]) * qt[np.arange(b), a_next]
        losses.append(_huber(y - fq(obs[i])[np.arange(b), actions[i]]).mean())
    assert loss == pytest.approx(float(np.mean(losses)), rel=1e-5, abs=1e-6)


def test_double_and_vanilla_targets_differ_where_the_online_argmax_differs():
    from dqnc.keras import keras

    losses = {}
    for double in (True, False):
        spec, q, target, _, _ = _nets()
        cfg = build_train_config("CartPole-v1", {}, {"double_dqn": double, "gamma": 0.9})
        update = train._make_update_fn(q, target, keras().optimizers.SGD(learning_rate=0.0), cfg, jit=False)
        rng = np.random.default_rng(2)
        batch = (rng.normal(size=(1, 32, 3)).astype(np.float32), rng.integers(0, 3, (1, 32)).astype(np.int32),
                 np.zeros((1, 32), np.float32), rng.normal(size=(1, 32, 3)).astype(np.float32),
                 np.zeros((1, 32), np.float32))
        losses[double] = float(update(*batch))
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)


def test_target_network_is_copied_every_interval_gradient_steps():
    from dqnc.keras import keras

    spec, q, target, _, wt = _nets()
    cfg = build_train_config("CartPole-v1", {}, {"target_update_interval": 3, "tau": 1.0})
    update = train._make_update_fn(q, target, keras().optimizers.SGD(learning_rate=0.1), cfg, jit=False)
    rng = np.random.default_rng(3)

    def batch(k: int):
        return (rng.normal(size=(k, 4, 3)).astype(np.float32), rng.integers(0, 3, (k, 4)).astype(np.int32),
                rng.normal(size=(k, 4)).astype(np.float32), rng.normal(size=(k, 4, 3)).astype(np.float32),
                np.zeros((k, 4), np.float32))

    update(*batch(2))  # 2 gradient steps: no copy yet
    for a, b in zip(dense_weights(target), wt):
        np.testing.assert_array_equal(a, b)
    update(*batch(1))  # the 3rd step copies the online network
    for a, b in zip(dense_weights(target), dense_weights(q)):
        np.testing.assert_array_equal(a, b)
    update(*batch(1))  # the 4th moves the online network away from the copy
    assert any(not np.array_equal(a, b) for a, b in zip(dense_weights(target), dense_weights(q)))


def test_epsilon_schedule_is_linear_then_holds():
    assert linear(1.0, 0.04, 0.16, 100_000, 0) == 1.0
    assert linear(1.0, 0.04, 0.16, 100_000, 8_000) == pytest.approx(0.52)
    assert linear(1.0, 0.04, 0.16, 100_000, 16_000) == pytest.approx(0.04)
    assert linear(1.0, 0.04, 0.16, 100_000, 90_000) == pytest.approx(0.04)


def test_truncated_episodes_bootstrap_from_their_final_observation(monkeypatch):
    """A time-limit truncation is stored with its real final observation and terminated = 0."""
    import gymnasium as gym

    class Counter(gym.Env):
        observation_space = gym.spaces.Box(-100, 100, (1,), np.float32)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.array([0.0], np.float32), {}

        def step(self, action):
            self.t += 1
            return np.array([float(self.t)], np.float32), 1.0, False, False, {}

    gym.register("DqncCounter-v0", entry_point=lambda: gym.wrappers.TimeLimit(Counter(), 4))
    cfg = build_train_config("DqncCounter-v0", {}, {"total_steps": 12, "learning_starts": 100, "eval_freq": 10_000,
                                                    "hidden": [4], "buffer_size": 50})
    spec = train.env_spec(cfg.env, {})
    buffer = train.ReplayBuffer(50, 1)
    weights = [np.zeros((1, 4), np.float32), np.zeros(4, np.float32), np.zeros((4, 2), np.float32),
               np.zeros(2, np.float32)]
    loop = train._Loop(cfg, spec, lambda *a: 0.0, lambda: weights, ["relu"], np.random.default_rng(0), buffer,
                       train._State())
    train._run_loop(loop)
    obs, nxt, term = buffer.obs[:12, 0], buffer.next_obs[:12, 0], buffer.terminated[:12]
    np.testing.assert_array_equal(obs, [0, 1, 2, 3] * 3)
    np.testing.assert_array_equal(nxt, [1, 2, 3, 4] * 3)  # not the reset observation 0 after step 4
    assert not term.any()


def test_training_learns_cartpole_on_a_small_budget(tmp_path):
    """A learning test with a real threshold: 20k steps lift CartPole far above a random policy
    (~22) on held-out episodes."""
    from dqnc import artifact as art
    from dqnc import evaluate
    from dqnc.config import EvalConfig

    cfg = build_train_config("CartPole-v1", {}, {"total_steps": 20_000, "seed": 5, "eval_freq": 5000,
                                                 "eval_episodes": 5, "confirm_episodes": 10})
    a = train.run(cfg, tmp_path / "m")
    res = evaluate.run(EvalConfig(episodes=20, latency_samples=0), art.load(a.path))
    assert res["mean_return"] >= 150, res["mean_return"]
