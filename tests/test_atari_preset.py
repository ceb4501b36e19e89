"""The ``sb3-atari`` env preset: SB3's AtariWrapper + VecFrameStack + VecTransposeImage rebuilt from
dqnc.atari's wrappers (the frame-by-frame comparison with SB3 itself is
benchmarks/atari_preset_vs_sb3.py, which needs benchmarks/.venv-sb3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc.cli import app

pytest.importorskip("ale_py", reason="Atari needs the atari extra: pip install 'dqnc[atari]'")
pytest.importorskip("cv2", reason="WarpFrame resizes frames with opencv: pip install 'dqnc[atari]'")

ENV = "BreakoutNoFrameskip-v4"
PRESET = {"preset": "sb3-atari"}


def _recorded(env_id: str, kwargs: dict) -> tuple[object, list[int]]:
    """The env made as make_env makes it, with every action the emulator receives recorded."""
    import gymnasium as gym

    from dqnc.envs import apply_wrappers, register_on_demand, resolve_env_kwargs

    actions: list[int] = []

    class Record(gym.Wrapper):
        def step(self, action):
            actions.append(int(action))
            return self.env.step(action)

    register_on_demand(env_id)
    kw = resolve_env_kwargs(env_id, kwargs)
    wrappers = kw.pop("wrappers")
    kw.pop("preset")
    return apply_wrappers(Record(gym.make(env_id, **kw)), env_id, wrappers), actions


def test_preset_gives_channels_first_uint8_stacks_and_records_its_wrappers():
    from dqnc.envs import env_spec, resolve_env_kwargs

    spec = env_spec(ENV, PRESET)
    assert spec.obs_shape == (4, 84, 84) and spec.obs_dtype == "uint8" and spec.obs_layout == "CHW"
    assert spec.action_meanings == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    assert spec.kwargs["preset"] == "sb3-atari" and spec.kwargs["frameskip"] == 1
    assert [next(iter(w)) for w in spec.wrappers] == ["NoopReset", "MaxAndSkip", "FireReset", "WarpFrame",
                                                      "FrameStackObservation"]
    assert spec.wrappers[-1]["FrameStackObservation"] == {"stack_size": 4, "padding_type": "zero"}
    # A manifest's kwargs resolve to themselves: every stage remakes the same env.
    assert resolve_env_kwargs(ENV, spec.kwargs) == spec.kwargs


def test_stack_is_zero_filled_at_reset_and_the_newest_frame_is_last():
    from dqnc.envs import make_env

    env = make_env(ENV, PRESET)
    try:
        first, _ = env.reset(seed=5)
        assert first.shape == (4, 84, 84) and first.dtype == np.uint8
        assert not first[:3].any() and first[3].any()  # SB3's VecFrameStack: zeros, then the first frame
        again, _ = env.reset(seed=5)
        np.testing.assert_array_equal(first, again)
        step, *_ = env.step(0)
        np.testing.assert_array_equal(step[:3], first[1:])
        assert not step[:2].any() and step[3].any()
    finally:
        env.close()


def test_reset_presses_fire_after_the_noops_and_each_action_repeats_four_frames():
    env, actions = _recorded(ENV, PRESET)
    try:
        env.reset(seed=11)
        noops = len(actions) - 8
        assert 1 <= noops <= 30 and actions[:noops] == [0] * noops
        assert actions[noops:] == [1] * 4 + [2] * 4  # FIRE then action 2, each through the 4-frame skip
        del actions[:]
        env.step(3)
        assert actions == [3] * 4
    finally:
        env.close()


def test_games_without_fire_reset_with_noops_only():
    from dqnc.envs import env_spec

    assert "FIRE" not in env_spec("MsPacmanNoFrameskip-v4", PRESET).action_meanings
    env, actions = _recorded("MsPacmanNoFrameskip-v4", PRESET)
    try:
        env.reset(seed=2)
        assert 1 <= len(actions) <= 30 and set(actions) == {0}
    finally:
        env.close()


def test_episode_cap_counts_agent_steps_so_an_idle_policy_stops():
    from dqnc.envs import env_spec, make_env, resolve_env_kwargs

    spec = env_spec(ENV, {**PRESET, "max_episode_steps": 60})
    assert spec.max_episode_steps == 60 and spec.wrappers[-1] == {"TimeLimit": {"max_episode_steps": 60}}
    assert "max_episode_steps" not in spec.kwargs and resolve_env_kwargs(ENV, spec.kwargs) == spec.kwargs
    env = make_env(spec.id, spec.kwargs)
    try:
        env.reset(seed=0)
        steps, done = 0, False
        while not done:  # never FIRE: the ball is lost once, then nothing happens until the cap
            _, _, terminated, truncated, _ = env.step(0)
            steps, done = steps + 1, terminated or truncated
        assert (steps, terminated, truncated) == (60, False, True)
    finally:
        env.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "sb3-atary"}, "unknown env preset 'sb3-atary': did you mean 'sb3-atari'?"),
    ({"preset": "sb3-atari", "wrappers": ["FireReset"]}, "names preset 'sb3-atari' and its own 'wrappers'"),
    ({"preset": "sb3-atari", "frameskip": 4}, "MaxAndSkip's frame skip would skip frames twice"),
    ({"wrappers": [{"NoopReset": {"noop_max": 0}}]}, "wrapper NoopReset with {'noop_max': 0}: noop_max must be >= 1"),
    ({"wrappers": ["FireRest"]}, "unknown wrapper 'FireRest': did you mean 'FireReset'?"),
])
def test_bad_presets_and_wrappers_are_one_line_errors(kwargs, message, tmp_path):
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "none"), "--env", ENV, "--env-kwargs", json.dumps(kwargs)])
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and len(r.output.strip().splitlines()) <= 3


def test_preset_on_a_non_atari_env_is_refused():
    from dqnc.envs import resolve_env_kwargs
    from dqnc.errors import EnvError

    with pytest.raises(EnvError, match="preset 'sb3-atari' wraps Atari games"):
        resolve_env_kwargs("CartPole-v1", PRESET)


def test_episodic_life_ends_an_episode_per_life_and_reset_continues_the_game():
    from dqnc.envs import make_env

    train_stack = ["NoopReset", "MaxAndSkip", "EpisodicLife", "FireReset", "WarpFrame"]
    env = make_env(ENV, {"wrappers": train_stack})
    try:
        env.reset(seed=0)
        ale = env.unwrapped.ale
        assert ale.lives() == 5
        terminated = truncated = False
        while not (terminated or truncated):  # never move: the served ball is lost
            _, _, terminated, truncated, _ = env.step(0)
        assert terminated and ale.lives() == 4 and not ale.game_over()
        env.reset()  # the same game goes on (FIRE serves the next ball), not a new one with 5 lives
        assert ale.lives() == 4
    finally:
        env.close()
