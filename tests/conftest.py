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


@pytest.fixture(scope="session")
def pruned(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import artifact as art
    from dqnc import prune

    out = tmp_path_factory.mktemp("pruned") / "p"
    cfg = prune.PruneConfig(sparsity=0.5, states=1000, epochs=4, dagger_rounds=1, check_states=300)
    prune.run(cfg, art.load(trained), out)
    return out


@pytest.fixture(scope="session")
def int8(pruned: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import artifact as art
    from dqnc import quantize

    out = tmp_path_factory.mktemp("int8") / "q"
    # The default check (regret and closed-loop return) is on: a barely trained policy must pass it too.
    cfg = quantize.QuantizeConfig(calibration_states=300, check_states=300)
    quantize.run(cfg, art.load(pruned), out)
    return out


@pytest.fixture(scope="session")
def bundle(int8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import artifact as art
    from dqnc import export

    out = tmp_path_factory.mktemp("bundle") / "b"
    export.run(export.ExportConfig(), art.load(int8), out)
    return out
