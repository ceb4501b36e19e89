from __future__ import annotations

import numpy as np
import pytest

from dqnc.replay import ReplayBuffer
from dqnc.schedules import linear


def test_buffer_wraps_around_and_keeps_newest():
    buf = ReplayBuffer(capacity=5, obs_dim=2)
    for i in range(7):
        buf.add(np.full((1, 2), i), np.array([i]), np.array([float(i)]), np.full((1, 2), i + 1), np.array([0.0]))
    assert len(buf) == 5
    assert sorted(buf.rewards.tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert buf.pos == 2


def test_buffer_batch_add_wraps():
    buf = ReplayBuffer(capacity=4, obs_dim=1)
    buf.add(np.arange(3)[:, None], np.arange(3), np.arange(3, dtype=float), np.arange(3)[:, None], np.zeros(3))
    buf.add(np.arange(3, 6)[:, None], np.arange(3, 6), np.arange(3, 6, dtype=float), np.arange(3, 6)[:, None], np.zeros(3))
    assert len(buf) == 4
    assert buf.rewards.tolist() == [4.0, 5.0, 2.0, 3.0]


def test_sample_shapes_and_only_filled_slots():
    buf = ReplayBuffer(capacity=100, obs_dim=3)
    buf.add(np.ones((10, 3)), np.ones(10), np.ones(10), np.ones((10, 3)), np.ones(10))
    obs, act, rew, nxt, term = buf.sample(np.random.default_rng(0), 4, 8)
    assert obs.shape == (4, 8, 3) and nxt.shape == (4, 8, 3)
    assert act.shape == rew.shape == term.shape == (4, 8)
    assert (obs == 1).all() and (rew == 1).all()  # never the empty (zero) slots


def test_sample_is_reproducible_for_a_seed():
    buf = ReplayBuffer(capacity=100, obs_dim=1)
    buf.add(np.arange(50)[:, None], np.arange(50), np.arange(50, dtype=float), np.arange(50)[:, None], np.zeros(50))
    a = buf.sample(np.random.default_rng(7), 2, 5)[2]
    b = buf.sample(np.random.default_rng(7), 2, 5)[2]
    assert (a == b).all()


def test_empty_buffer_refuses_to_sample():
    with pytest.raises(ValueError):
        ReplayBuffer(10, 2).sample(np.random.default_rng(0), 1, 1)


def test_buffer_save_load_round_trip(tmp_path):
    buf = ReplayBuffer(capacity=8, obs_dim=2)
    for i in range(11):
        buf.add(np.full((1, 2), i), np.array([i % 2]), np.array([float(i)]), np.full((1, 2), i), np.array([i % 3 == 0]))
    buf.save(tmp_path / "b.npz")
    back = ReplayBuffer.load(tmp_path / "b.npz", 8)
    assert back.size == buf.size and back.pos == buf.pos
    for name in ("obs", "next_obs", "actions", "rewards", "terminated"):
        assert (getattr(back, name) == getattr(buf, name)).all()


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 1.0), (50, 0.55), (100, 0.1), (1000, 0.1), (-5, 1.0)],
)
def test_linear_schedule(step, expected):
    assert linear(1.0, 0.1, 0.1, 1000, step) == pytest.approx(expected)
