from __future__ import annotations

from pathlib import Path

import pytest

from dqnc.config import build_train_config

TINY = dict(total_steps=3000, learning_starts=500, train_freq=250, gradient_steps=50, eval_freq=1500,
            eval_episodes=3, hidden=[16, 16], buffer_size=5000)


def tiny_config(**over):
    return build_train_config("CartPole-v1", {}, {**TINY, **over})


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CartPole artifact trained on a tiny budget, shared by tests that only read it."""
    from dqnc import train

    out = tmp_path_factory.mktemp("trained") / "cartpole"
    train.run(tiny_config(seed=3), out)
    return out
