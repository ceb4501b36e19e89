"""Ape-X on Ray (dqnc.apex): the epsilon ladder and seed slices, and a tiny CartPole run on a local
Ray whose actor is killed mid-run and which is interrupted and resumed, ending with the planned env
steps. The learning run is long (DQNC_SLOW=1 runs it)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dqnc import apex
from dqnc.config import build_train_config
from dqnc.seeds import PER_SEED, episode_seed

pytest.importorskip("ray")


def test_epsilon_ladder_runs_from_0_4_to_0_4_to_the_8th():
    eps = [apex.actor_epsilon(i, 8) for i in range(8)]
    assert eps[0] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4 ** 8)
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert apex.actor_epsilon(0, 1) == pytest.approx(0.4)


def test_each_actor_has_its_own_slice_of_the_runs_training_seeds():
    cfg = build_train_config("CartPole-v1", {}, {"num_envs": 8, "seed": 2, "actors": apex.MAX_ACTORS})
    base = episode_seed("train", 2)
    starts = [apex.actor_seed(cfg, i, r) for i in range(apex.MAX_ACTORS) for r in range(3)]
    assert len(set(starts)) == len(starts)
    assert min(starts) > base + 3 * 8 and max(starts) + 8 <= base + PER_SEED  # inside the run's block
    slices = np.array([apex.actor_seed(cfg, i, 0) for i in range(apex.MAX_ACTORS)])
    assert (np.diff(slices) >= 100 * 8).all(), "a slice holds 100 restarts of 8 envs"


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level="ERROR")
    yield
    ray.shutdown()


def _cfg(**over):
    return build_train_config("CartPole-v1", {}, {"total_steps": 3000, "learning_starts": 500, "train_freq": 256,
                                                  "gradient_steps": 32, "eval_freq": 1500, "eval_episodes": 3,
                                                  "confirm_episodes": 0, "hidden": [16, 16], "buffer_size": 5000,
                                                  "replay": "prioritized", "n_step": 3, "actors": 2, **over})


def test_killed_actor_restarts_and_interrupted_run_resumes_to_the_planned_steps(ray_local, tmp_path):
    import ray

    from dqnc import train
    from dqnc.errors import Interrupted

    out, ckpt = tmp_path / "m", tmp_path / "m.ckpt"
    killed = []

    def chaos(p):
        if p.step >= 800 and not killed:
            name = sorted(n for n in ray.util.list_named_actors() if n.startswith(f"{apex.ACTOR_PREFIX}0-"))[0]
            ray.kill(ray.get_actor(name), no_restart=True)
            killed.append(name)
        if p.step >= 1800:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="--resume"):
        train.run(_cfg(), out, checkpoint_dir=ckpt, progress=chaos)
    assert killed
    with np.load(ckpt / "buffer.npz") as d:
        assert len(d["actions"]) > 1000 and d["priorities"][: len(d["actions"])].std() > 0
    a = train.run(_cfg(), out, checkpoint_dir=ckpt, resume=True)
    m = a.manifest["metrics"]
    assert m["env_steps"] >= 3000 and m["gradient_steps"] > 0
    # actor 0: started, killed and restarted, resumed; actor 1: started, resumed
    assert m["actor_starts"] == [3, 2]
    assert not [n for n in ray.util.list_named_actors() if n.startswith(apex.ACTOR_PREFIX)], "actors are stopped"


def test_frame_dedup_on_with_actors_is_refused():
    from dqnc.envs import env_spec
    from dqnc.errors import UsageError
    from dqnc.replay import build

    cfg = _cfg(frame_dedup="on")
    with pytest.raises(UsageError, match="actors"):
        build(cfg, env_spec("CartPole-v1"), images=True)


@pytest.mark.skipif(not os.environ.get("DQNC_SLOW"), reason="a learning run (~30 s): DQNC_SLOW=1 runs it")
def test_two_actors_learn_cartpole(ray_local, tmp_path):
    from dqnc import artifact as art
    from dqnc import evaluate, train
    from dqnc.config import EvalConfig

    cfg = build_train_config("CartPole-v1", {}, {"total_steps": 6000, "seed": 1, "eval_freq": 3000, "eval_episodes": 5,
                                                 "confirm_episodes": 5, "replay": "prioritized", "n_step": 3,
                                                 "actors": 2})
    a = train.run(cfg, tmp_path / "m")
    res = evaluate.run(EvalConfig(episodes=20, latency_samples=0), art.load(a.path))
    assert res["mean_return"] >= 100, res["mean_return"]


def test_an_actor_that_keeps_dying_before_delivering_ends_the_run():
    from dqnc.errors import EnvError

    fleet = apex.Fleet(remote=None, loop=None, actors={}, restarts=[0, 0], tasks={}, run_id="x")
    for _ in range(apex.MAX_DEATHS_IN_A_ROW):
        fleet.died(1, RuntimeError("node lost"))
    assert fleet.restarts == [0, apex.MAX_DEATHS_IN_A_ROW]
    with pytest.raises(EnvError, match="actor 1 died 4 times in a row.*node lost"):
        fleet.died(1, RuntimeError("node lost"))
