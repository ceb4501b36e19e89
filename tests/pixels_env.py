"""A small uint8 image env (frames of noise, channels first, like a stacked Atari observation) for
conv-import tests; importing it registers ``Pixels-v0`` (use ``tests.pixels_env:Pixels-v0``).

An episode lasts 30 steps; action 1 pays when the frame is bright on average, action 0 when it is
dark, so a policy's return depends on what it sees."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

SHAPE = (4, 20, 20)


class Pixels(gym.Env):
    observation_space = gym.spaces.Box(0, 255, SHAPE, np.uint8)
    action_space = gym.spaces.Discrete(3)

    def _frame(self) -> np.ndarray:
        self._obs = self.np_random.integers(0, 256, SHAPE, dtype=np.uint8)
        return self._obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._t = 0
        return self._frame(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        bright = float(self._obs.mean()) > 127.5
        reward = 1.0 if int(action) == int(bright) else 0.0
        self._t += 1
        return self._frame(), reward, False, self._t >= 30, {}


if "Pixels-v0" not in gym.registry:
    gym.register("Pixels-v0", entry_point=Pixels)


class Pixels84(Pixels):
    """Atari-sized frames: (4, 84, 84) uint8, for the Nature DQN network."""

    observation_space = gym.spaces.Box(0, 255, (4, 84, 84), np.uint8)

    def _frame(self) -> np.ndarray:
        self._obs = self.np_random.integers(0, 256, (4, 84, 84), dtype=np.uint8)
        return self._obs


if "Pixels84-v0" not in gym.registry:
    gym.register("Pixels84-v0", entry_point=Pixels84)
