"""A numpy ring replay buffer that samples many minibatches in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class ReplayBuffer:
    """Fixed-capacity FIFO of transitions ``(obs, action, reward, next_obs, terminated)``.

    ``terminated`` is stored, not ``done``: a time-limit truncation still bootstraps.
    Observations keep the shape and dtype they are given (``obs_dim`` may be a shape): image
    observations are stored as bool/uint8 (1 byte a pixel, not 4) and sampled as float32.
    """

    def __init__(self, capacity: int, obs_dim: int | tuple[int, ...], obs_dtype: Any = np.float32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        shape = (obs_dim,) if isinstance(obs_dim, int) else tuple(obs_dim)
        self.obs = np.zeros((capacity, *shape), obs_dtype)
        self.next_obs = np.zeros((capacity, *shape), obs_dtype)
        self.actions = np.zeros(capacity, np.int32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray) -> None:
        """Add a batch of transitions (one per vectorized env)."""
        n = len(actions)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx] = obs
        self.next_obs[idx] = next_obs
        self.actions[idx] = actions
        self.rewards[idx] = rewards
        self.terminated[idx] = terminated
        self.pos = int((self.pos + n) % self.capacity)
        self.size = int(min(self.size + n, self.capacity))

    def sample(self, rng: np.random.Generator, num_batches: int, batch_size: int,
               as_float: bool = True) -> tuple[np.ndarray, ...]:
        """Return ``num_batches`` minibatches stacked as arrays of shape ``[num_batches, batch_size, ...]``.

        ``as_float=False`` keeps observations in the stored dtype, for a consumer that casts them itself.
        """
        if self.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        idx = rng.integers(0, self.size, size=(num_batches, batch_size))
        obs, next_obs = self.obs[idx], self.next_obs[idx]
        if as_float and obs.dtype != np.float32:
            obs, next_obs = obs.astype(np.float32), next_obs.astype(np.float32)
        return obs, self.actions[idx], self.rewards[idx], next_obs, self.terminated[idx]

    def save(self, path: Path) -> None:
        n = self.size
        np.savez(path, obs=self.obs[:n], next_obs=self.next_obs[:n], actions=self.actions[:n],
                 rewards=self.rewards[:n], terminated=self.terminated[:n], pos=self.pos)

    @classmethod
    def load(cls, path: Path, capacity: int) -> ReplayBuffer:
        with np.load(path) as d:
            n = len(d["actions"])
            buf = cls(capacity, tuple(d["obs"].shape[1:]), d["obs"].dtype)
            buf.obs[:n], buf.next_obs[:n] = d["obs"], d["next_obs"]
            buf.actions[:n], buf.rewards[:n], buf.terminated[:n] = d["actions"], d["rewards"], d["terminated"]
            buf.size, buf.pos = n, int(d["pos"])
        return buf
