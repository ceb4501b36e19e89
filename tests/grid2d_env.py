"""A tiny env with 2-D observations, for the error a conv net gives on non-image observations.

Importing this module registers ``Grid2D-v0``; use it as ``tests.grid2d_env:Grid2D-v0``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class Grid2D(gym.Env):
    observation_space = gym.spaces.Box(0.0, 1.0, (5, 5), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return np.zeros((5, 5), np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return np.zeros((5, 5), np.float32), 1.0, True, False, {}


if "Grid2D-v0" not in gym.registry:
    gym.register("Grid2D-v0", entry_point=Grid2D)
