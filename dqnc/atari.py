"""Atari wrappers that gymnasium does not have, with Stable-Baselines3's semantics.

SB3's ``AtariWrapper`` (what rl-baselines3-zoo's Atari models were trained and evaluated with)
differs from gymnasium's ``AtariPreprocessing`` in ways a Q-network sees: it max-pools the last two
RGB frames before converting to grayscale (``AtariPreprocessing`` pools ALE's grayscale frames), it
presses FIRE (then action 2) after every reset, and it ends an episode at each lost life while
training. These wrappers reproduce it step for step, so that an imported SB3 model sees the
observations it was trained on; :data:`dqnc.envs.ENV_PRESETS` chains them into the ``sb3-atari``
preset. They are named in ``env_kwargs['wrappers']`` like gymnasium's own wrappers
(:data:`WRAPPERS`), and only these classes can be named from here: nothing else is importable.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

NOOP, FIRE = 0, 1


def _meanings(env: gym.Env) -> list[str]:
    get = getattr(env.unwrapped, "get_action_meanings", None)
    if not callable(get):
        raise ValueError("needs an ALE environment (an Atari id such as BreakoutNoFrameskip-v4)")
    return [str(m) for m in get()]


class NoopReset(gym.Wrapper):
    """After each reset, 1..noop_max no-op frames drawn from the env's own seeded RNG."""

    def __init__(self, env: gym.Env, noop_max: int = 30) -> None:
        super().__init__(env)
        if int(noop_max) < 1:
            raise ValueError(f"noop_max must be >= 1, got {noop_max}")
        if _meanings(env)[NOOP] != "NOOP":
            raise ValueError("action 0 is not NOOP")
        self.noop_max = int(noop_max)

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        for _ in range(int(self.unwrapped.np_random.integers(1, self.noop_max + 1))):
            obs, _, terminated, truncated, info = self.env.step(NOOP)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        return obs, info


class MaxAndSkip(gym.Wrapper):
    """Repeat each action ``skip`` frames, sum the rewards, return the pixel-wise max of the last two
    frames (Atari sprites flicker between frames). The two-frame buffer lives across steps, as in SB3:
    an episode that ends early in a skip returns a max with the frame of an earlier step."""

    def __init__(self, env: gym.Env, skip: int = 4) -> None:
        super().__init__(env)
        if int(skip) < 2:
            raise ValueError(f"skip must be >= 2, got {skip}")
        space = env.observation_space
        self.skip = int(skip)
        self._frames = np.zeros((2, *space.shape), dtype=space.dtype)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        total, terminated, truncated, info = 0.0, False, False, {}
        for i in range(self.skip):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if i >= self.skip - 2:
                self._frames[i - (self.skip - 2)] = obs
            total += float(reward)
            if terminated or truncated:
                break
        return self._frames.max(axis=0), total, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """A lost life ends the episode (a training signal); reset then continues the same game with one
    no-op step, and only a real game over resets the emulator. For training envs: evaluating with
    it would report one life's return."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.lives = 0
        self.real_done = True

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.real_done = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        if self.real_done:
            obs, info = self.env.reset(**kwargs)
        else:
            obs, _, terminated, truncated, info = self.env.step(NOOP)
            if terminated or truncated:
                obs, info = self.env.reset(**kwargs)
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE, then action 2, after each reset, in games whose action 1 is FIRE (Breakout waits
    for FIRE to serve: a greedy policy that never learnt to press it would idle until the episode
    cap). A game without FIRE passes through unchanged, as under SB3's AtariWrapper."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        meanings = _meanings(env)
        self.fires = "FIRE" in meanings
        if self.fires and (meanings[FIRE] != "FIRE" or len(meanings) < 3):
            raise ValueError(f"this game has FIRE but not as action 1 of 3 or more (actions: {meanings})")

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        if not self.fires:
            return obs, info
        for action in (FIRE, 2):
            obs, _, terminated, truncated, _ = self.env.step(action)
            if terminated or truncated:
                self.env.reset(**kwargs)
        return obs, {}


class WarpFrame(gym.ObservationWrapper):
    """RGB frame -> grayscale (OpenCV's RGB2GRAY) -> ``size`` x ``size`` (area interpolation), uint8,
    without a channel axis (a frame stack adds the channels-first axis)."""

    def __init__(self, env: gym.Env, size: int = 84) -> None:
        super().__init__(env)
        try:
            import cv2
        except ModuleNotFoundError:
            raise gym.error.DependencyNotInstalled(
                "WarpFrame resizes frames with opencv: pip install 'dqnc[atari]' (opencv-python-headless)") from None
        shape = env.observation_space.shape
        if len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"needs RGB frames (H, W, 3), got observations of shape {shape}")
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = int(size)
        self._cv2 = cv2
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size), np.uint8)

    def observation(self, frame: np.ndarray) -> np.ndarray:
        gray = self._cv2.cvtColor(np.asarray(frame, np.uint8), self._cv2.COLOR_RGB2GRAY)
        return self._cv2.resize(gray, (self.size, self.size), interpolation=self._cv2.INTER_AREA)


# The classes env_kwargs['wrappers'] may name besides gymnasium.wrappers'.
WRAPPERS: dict[str, type[gym.Wrapper]] = {cls.__name__: cls for cls in (NoopReset, MaxAndSkip, EpisodicLife,
                                                                          FireReset, WarpFrame)}
