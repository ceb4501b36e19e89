"""Replay: where transitions wait to be learned from.

- :class:`ReplayBuffer` is a numpy ring of transitions ``(obs, action, reward, next_obs, terminated)``
  that keeps every observation as given (obs and next obs, each in full).
- :class:`FrameReplayBuffer` is the same ring for frame-stacked observations (gymnasium's
  ``FrameStackObservation``: a ``(k, ...)`` stack, newest frame last): each frame is stored once and
  a transition holds the indices of its ``2k`` frames, so the stacks come back exactly as the env
  gave them, reset padding included, at about 1/8 of the memory (Atari: 56 kB -> 7 kB a transition).
  It fills the same slots in the same order as :class:`ReplayBuffer` and samples with the same
  random draws, so a run trains identically with either.
- :class:`SumTree` (vectorized numpy) samples slots in proportion to their priorities.
- :class:`NStep` turns each env's steps into n-step transitions (reward sums, ``gamma**m`` discounts).
- :class:`Replay` is what the training loop holds: a storage, optional n-step queues and uniform or
  prioritized sampling (Schaul et al. 2016), saved and restored whole with a training checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dqnc.errors import UsageError

if TYPE_CHECKING:
    from dqnc.config import TrainConfig
    from dqnc.envs import EnvSpec

# Added to |TD error| so that no transition's priority (and chance to be replayed) reaches zero.
PRIORITY_EPS = 1e-6


class _Slots(ABC):
    """The ring of transition slots both buffers share: actions, rewards, terminated flags and
    (n-step) bootstrap discounts; what a slot keeps of its observations is the subclass's."""

    def __init__(self, capacity: int, discounted: bool) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.actions = np.zeros(capacity, np.int32)
        self.rewards = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.discounts = np.zeros(capacity, np.float32) if discounted else None
        self.pos = 0
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray, truncated: np.ndarray | None = None) -> None:
        """Add a batch of transitions (one per vectorized env)."""
        self.put(*self.handles(obs, next_obs, terminated, truncated), actions, rewards, terminated)

    @abstractmethod
    def handles(self, obs: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """What a transition keeps of its observations (the observations, or frame indices)."""

    @abstractmethod
    def put(self, obs: np.ndarray, next_obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            terminated: np.ndarray, discounts: np.ndarray | None = None) -> np.ndarray:
        """Write transitions (with what :meth:`handles` returned) into the next slots; the slots."""

    @abstractmethod
    def observations(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The obs and next obs of slots ``idx``, as stored (the subclass's form)."""

    def gather(self, idx: np.ndarray, as_float: bool = True) -> tuple[Any, ...]:
        """The transitions in slots ``idx``: obs, actions, rewards, next obs, terminated, discounts (or None)."""
        obs, next_obs = self.observations(idx)
        if as_float and obs.dtype != np.float32:
            obs, next_obs = obs.astype(np.float32), next_obs.astype(np.float32)
        disc = self.discounts[idx] if self.discounts is not None else None
        return obs, self.actions[idx], self.rewards[idx], next_obs, self.terminated[idx], disc

    def advance(self, actions: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
                discounts: np.ndarray | None) -> np.ndarray:
        """Write the transitions' scalars into the next slots (overwriting the oldest); the slots."""
        n = len(actions)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.actions[idx] = actions
        self.rewards[idx] = rewards
        self.terminated[idx] = terminated
        if self.discounts is not None:
            self.discounts[idx] = discounts
        self.pos = int((self.pos + n) % self.capacity)
        self.size = int(min(self.size + n, self.capacity))
        return idx


class ReplayBuffer(_Slots):
    """Fixed-capacity FIFO of transitions ``(obs, action, reward, next_obs, terminated)``.

    ``terminated`` is stored, not ``done``: a time-limit truncation still bootstraps.
    Observations keep the shape and dtype they are given (``obs_dim`` may be a shape): image
    observations are stored as bool/uint8 (1 byte a pixel, not 4) and sampled as float32.
    ``discounted`` adds each transition's bootstrap discount (n-step returns: ``gamma**m``).
    """

    kind = "flat"

    def __init__(self, capacity: int, obs_dim: int | tuple[int, ...], obs_dtype: Any = np.float32,
                 discounted: bool = False) -> None:
        super().__init__(capacity, discounted)
        shape = (obs_dim,) if isinstance(obs_dim, int) else tuple(obs_dim)
        self.obs = np.zeros((capacity, *shape), obs_dtype)
        self.next_obs = np.zeros((capacity, *shape), obs_dtype)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.obs, self.next_obs, self.actions, self.rewards, self.terminated,
                                      self.discounts) if a is not None)

    def handles(self, obs: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """What a transition keeps of its observations: here, the observations themselves."""
        return obs, next_obs

    def put(self, obs: np.ndarray, next_obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            terminated: np.ndarray, discounts: np.ndarray | None = None) -> np.ndarray:
        """Write transitions into the next slots (overwriting the oldest); returns the slots."""
        idx = self.advance(actions, rewards, terminated, discounts)
        self.obs[idx] = obs
        self.next_obs[idx] = next_obs
        return idx

    def end_episodes(self) -> None:
        """The envs start new episodes (a resumed run): nothing to forget here."""

    def observations(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.obs[idx], self.next_obs[idx]

    def sample(self, rng: np.random.Generator, num_batches: int, batch_size: int,
               as_float: bool = True) -> tuple[np.ndarray, ...]:
        """Return ``num_batches`` minibatches stacked as arrays of shape ``[num_batches, batch_size, ...]``.

        ``as_float=False`` keeps observations in the stored dtype, for a consumer that casts them itself.
        """
        return self.gather(uniform_slots(self, rng, num_batches, batch_size), as_float)[:5]

    def arrays(self) -> dict[str, np.ndarray]:
        n = self.size
        out = dict(obs=self.obs[:n], next_obs=self.next_obs[:n], actions=self.actions[:n],
                   rewards=self.rewards[:n], terminated=self.terminated[:n], pos=np.asarray(self.pos))
        if self.discounts is not None:
            out["discounts"] = self.discounts[:n]
        return out

    def restore(self, d: Any) -> None:
        n = len(d["actions"])
        self.obs[:n], self.next_obs[:n] = d["obs"], d["next_obs"]
        self.actions[:n], self.rewards[:n], self.terminated[:n] = d["actions"], d["rewards"], d["terminated"]
        if self.discounts is not None:
            self.discounts[:n] = d["discounts"]
        self.size, self.pos = n, int(d["pos"])

    def save(self, path: Path) -> None:
        np.savez(path, **self.arrays())

    @classmethod
    def load(cls, path: Path, capacity: int) -> ReplayBuffer:
        with np.load(path) as d:
            buf = cls(capacity, tuple(d["obs"].shape[1:]), d["obs"].dtype, "discounts" in d.files)
            buf.restore(d)
        return buf


def uniform_slots(storage: Any, rng: np.random.Generator, num_batches: int, batch_size: int) -> np.ndarray:
    if storage.size == 0:
        raise ValueError("cannot sample from an empty buffer")
    return rng.integers(0, storage.size, size=(num_batches, batch_size))


class FrameReplayBuffer(_Slots):
    """:class:`ReplayBuffer`'s slots, for observations that are stacks of the last ``k`` frames
    (axis 0, newest last), each frame stored once.

    A transition keeps ``2k`` frame indices (its obs stack, then its next-obs stack); ``-1`` is the
    all-zero frame. At an episode's first observation the stack's distinct frames are stored (a
    reset-padded stack repeats one frame, a zero-padded one refers to the zero frame), so every
    padding comes back exact; each later step stores its one new frame. Every observation added is
    checked against the frames held (and each next obs against its obs shifted by one frame): an env
    that does not stack frames is refused, never silently mis-stored. Frames live in a ring that
    grows if short episodes (one extra frame at each start) ever need more room than planned.
    """

    kind = "frames"

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: Any = np.uint8,
                 discounted: bool = False, n_step: int = 1) -> None:
        super().__init__(capacity, discounted)
        if len(obs_shape) < 2:
            raise ValueError("frame stacks need a stack axis and a frame: shape (k, ...)")
        self.obs_shape, self.n_step = tuple(obs_shape), n_step
        self.stack = k = self.obs_shape[0]
        self.refs = np.full((capacity, 2 * k), -1, np.int64)
        # Room for the live transitions' frames plus 1/16 (a full scan for the oldest frame still
        # needed happens once per room/16 frames written) and a few stacks per env.
        self.room = capacity + capacity // 16 + 64 * k
        self.frames = np.zeros((self.room + 1, *self.obs_shape[1:]), obs_dtype)  # last row: the zero frame
        self.frame_count = 0  # frames ever written; frame r lives at row r % room
        self.oldest = 0  # no frame older than this is needed (a lower bound)
        self.cur = np.zeros((0, k), np.int64)  # each env's current obs stack
        self.started = np.zeros(0, bool)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.frames, self.refs, self.actions, self.rewards, self.terminated,
                                      self.discounts, self.cur) if a is not None)

    def handles(self, obs: np.ndarray, next_obs: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Store the new frames of one step of every env; return the obs and next-obs frame indices."""
        n = len(obs)
        if len(self.started) != n:
            self.cur, self.started = np.zeros((n, self.stack), np.int64), np.zeros(n, bool)
        going = self.started.copy()
        if going.any() and not np.array_equal(self.frames[self.rows(self.cur[going])], obs[going]):
            raise UsageError("frame_dedup: an observation is not the stack the previous step ended with "
                             "(pass truncated= to add() at episode ends); set frame_dedup off for this env")
        if self.stack > 1 and not np.array_equal(next_obs[:, :-1], obs[:, 1:]):
            raise UsageError("frame_dedup: the env's observations are not frame stacks (axis 0, newest last, as "
                             "gymnasium's FrameStackObservation makes them): set frame_dedup off")
        for i in np.flatnonzero(~going):
            self.cur[i] = self.write_stack(obs[i])
        new = self.write(next_obs[:, -1])
        obs_h = self.cur.copy()
        next_h = np.concatenate([self.cur[:, 1:], new[:, None]], axis=1)
        done = np.asarray(terminated, bool) | (np.asarray(truncated, bool) if truncated is not None else False)
        self.cur, self.started = next_h.copy(), ~done
        return obs_h, next_h

    def put(self, obs_refs: np.ndarray, next_refs: np.ndarray, actions: np.ndarray, rewards: np.ndarray,
            terminated: np.ndarray, discounts: np.ndarray | None = None) -> np.ndarray:
        idx = self.advance(actions, rewards, terminated, discounts)
        self.refs[idx, : self.stack] = obs_refs
        self.refs[idx, self.stack:] = next_refs
        return idx

    def end_episodes(self) -> None:
        """The envs start new episodes: their next observations are reset stacks."""
        self.started[:] = False

    def rows(self, refs: np.ndarray) -> np.ndarray:
        return np.where(refs < 0, self.room, refs % self.room)

    def write(self, frames: np.ndarray) -> np.ndarray:
        """Store frames (a batch), returning their indices."""
        m = len(frames)
        self.make_room(m)
        refs = self.frame_count + np.arange(m, dtype=np.int64)
        self.frames[refs % self.room] = frames
        self.frame_count += m
        return refs

    def write_stack(self, stack: np.ndarray) -> np.ndarray:
        """The frame indices of an episode's first stack, its padding frames shared or zero."""
        refs = np.empty(self.stack, np.int64)
        refs[-1] = self.write(stack[-1:])[0]
        for j in range(self.stack - 2, -1, -1):
            if np.array_equal(stack[j], stack[j + 1]):
                refs[j] = refs[j + 1]
            elif not stack[j].any():
                refs[j] = -1
            else:
                refs[j] = self.write(stack[j:j + 1])[0]
        return refs

    def make_room(self, m: int) -> None:
        """Make sure writing ``m`` frames overwrites none still needed (growing the ring if it must)."""
        end = self.frame_count + m  # writing frame r overwrites frame r - room
        if end - self.room <= self.oldest:
            return
        held = self.refs[: self.size]
        held = held[held >= 0]
        # Stacks held outside the slots (each env's current one, the n-step queues') are no older
        # than the frames of the last n_step + k steps, each of which writes at most k + 1 per env.
        recent = self.frame_count - (self.n_step + self.stack + 1) * len(self.started) * (self.stack + 1)
        self.oldest = max(self.oldest, min(int(held.min()) if held.size else self.frame_count, recent))
        need = end - self.oldest
        if need > self.room:
            self.grow(need + need // 8)

    def grow(self, room: int) -> None:
        live = np.arange(max(self.oldest, self.frame_count - self.room), self.frame_count)
        frames = np.zeros((room + 1, *self.frames.shape[1:]), self.frames.dtype)
        frames[live % room] = self.frames[live % self.room]
        self.frames, self.room = frames, room

    def observations(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows(self.refs[idx])
        return self.frames[rows[..., : self.stack]], self.frames[rows[..., self.stack:]]

    def sample(self, rng: np.random.Generator, num_batches: int, batch_size: int,
               as_float: bool = True) -> tuple[np.ndarray, ...]:
        return self.gather(uniform_slots(self, rng, num_batches, batch_size), as_float)[:5]

    def arrays(self) -> dict[str, np.ndarray]:
        n = self.size
        out = dict(frames=self.frames, refs=self.refs[:n], actions=self.actions[:n], rewards=self.rewards[:n],
                   terminated=self.terminated[:n], pos=np.asarray(self.pos), cur=self.cur, started=self.started,
                   frame_count=np.asarray(self.frame_count), oldest=np.asarray(self.oldest))
        if self.discounts is not None:
            out["discounts"] = self.discounts[:n]
        return out

    def restore(self, d: Any) -> None:
        n = len(d["actions"])
        self.frames = np.array(d["frames"])
        self.room = len(self.frames) - 1
        self.refs[:n], self.actions[:n], self.rewards[:n] = d["refs"], d["actions"], d["rewards"]
        self.terminated[:n] = d["terminated"]
        if self.discounts is not None:
            self.discounts[:n] = d["discounts"]
        self.cur, self.started = np.array(d["cur"]), np.array(d["started"])
        self.size, self.pos = n, int(d["pos"])
        self.frame_count, self.oldest = int(d["frame_count"]), int(d["oldest"])


class SumTree:
    """Priorities of ``capacity`` slots in a binary tree of partial sums (float64, one numpy array):
    setting a batch of leaves and finding the leaves under a batch of prefix sums both cost one
    vectorized operation per tree level (log2 of the capacity)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.leaves = 1 << max(0, (capacity - 1).bit_length())
        self.depth = self.leaves.bit_length() - 1
        self.tree = np.zeros(2 * self.leaves)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.tree[self.leaves + np.asarray(idx)]

    def set(self, idx: np.ndarray, values: Any) -> None:
        """Set leaves ``idx`` (a repeated slot keeps its last value) and the sums above them."""
        tree = self.tree
        i = self.leaves + np.asarray(idx, np.int64).ravel()
        tree[i] = values if np.ndim(values) == 0 else np.asarray(values).ravel()
        for _ in range(self.depth):
            i >>= 1
            tree[i] = tree.take(2 * i) + tree.take(2 * i + 1)

    def find(self, mass: np.ndarray) -> np.ndarray:
        """The slot under each prefix sum in ``mass`` (in ``[0, total)``); never a zero-priority slot
        while the total is positive (rounding cannot steer the descent into an empty subtree)."""
        tree = self.tree
        v = np.array(mass, np.float64).ravel()
        i = np.ones(len(v), np.int64)
        for _ in range(self.depth):
            i <<= 1
            left = tree.take(i)
            right = (v >= left) & (tree.take(i + 1) > 0)
            v -= left * right  # exact: v - left, or v - 0
            i += right
        return (i - self.leaves).reshape(np.shape(mass))

    def rebuild(self, values: np.ndarray) -> None:
        """Every leaf at once (a restored checkpoint): the sums level by level."""
        self.tree[:] = 0.0
        self.tree[self.leaves: self.leaves + len(values)] = values
        for level in range(self.depth - 1, -1, -1):
            lo, hi = 1 << level, 2 << level
            self.tree[lo:hi] = self.tree[2 * lo: 2 * hi: 2] + self.tree[2 * lo + 1: 2 * hi: 2]


class NStep:
    """Per-env queues of the last steps, emitted as n-step transitions: the reward sum over up to
    ``n`` steps and the discount ``gamma**m`` to bootstrap with after its ``m`` steps. At an
    episode's end the queue empties into shorter transitions: a termination's are marked terminated
    (no bootstrap), a truncation's bootstrap from the final observation."""

    def __init__(self, n: int, gamma: float) -> None:
        self.n, self.gamma = n, gamma
        self.queues: list[list[tuple[np.ndarray, int, float]]] = []  # per env: (obs handle, action, reward)
        self.last_next: list[np.ndarray | None] = []  # per env: the latest next-obs handle

    def push(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
             terminated: np.ndarray, truncated: np.ndarray | None) -> list[tuple]:
        if len(self.queues) != len(actions):
            self.queues, self.last_next = [[] for _ in actions], [None] * len(actions)
        out: list[tuple] = []
        for i, q in enumerate(self.queues):
            q.append((obs[i], int(actions[i]), float(rewards[i])))
            self.last_next[i] = next_obs[i]
            if terminated[i] or (truncated is not None and truncated[i]):
                out += [self.emit(q, j, next_obs[i], float(terminated[i])) for j in range(len(q))]
                q.clear()
                self.last_next[i] = None
            elif len(q) == self.n:
                out.append(self.emit(q, 0, next_obs[i], 0.0))
                q.pop(0)
        return out

    def flush(self) -> list[tuple]:
        """Every queued step as a transition truncated at its env's latest observation (the episodes
        were cut: a resumed run starts new ones)."""
        out: list[tuple] = []
        for q, nxt in zip(self.queues, self.last_next):
            out += [self.emit(q, j, nxt, 0.0) for j in range(len(q))]
            q.clear()
        self.last_next = [None] * len(self.queues)
        return out

    def emit(self, q: list[tuple], j: int, next_obs: Any, terminated: float) -> tuple:
        m = len(q) - j
        ret = sum(self.gamma ** s * q[j + s][2] for s in range(m))
        return q[j][0], next_obs, q[j][1], ret, terminated, self.gamma ** m

    def arrays(self) -> dict[str, np.ndarray]:
        items = [(e, *step) for e, q in enumerate(self.queues) for step in q]
        out = {"nstep_envs": np.asarray(len(self.queues)), "nstep_env": np.array([it[0] for it in items], np.int64),
               "nstep_action": np.array([it[2] for it in items], np.int64),
               "nstep_reward": np.array([it[3] for it in items], np.float64)}
        if items:
            out["nstep_obs"] = np.stack([it[1] for it in items])
            owners = sorted({it[0] for it in items})
            out["nstep_next_env"] = np.array(owners, np.int64)
            out["nstep_next"] = np.stack([self.last_next[e] for e in owners])
        return out

    def restore(self, d: Any) -> None:
        n = int(d["nstep_envs"])
        self.queues, self.last_next = [[] for _ in range(n)], [None] * n
        for k, e in enumerate(d["nstep_env"]):
            self.queues[int(e)].append((np.array(d["nstep_obs"][k]), int(d["nstep_action"][k]),
                                        float(d["nstep_reward"][k])))
        if "nstep_next_env" in d:
            for k, e in enumerate(d["nstep_next_env"]):
                self.last_next[int(e)] = np.array(d["nstep_next"][k])


@dataclass
class Batch:
    """``num_batches`` minibatches for one compiled update call: ``discounts`` only with n-step
    returns, ``weights`` (importance) and ``slots`` only with prioritized replay."""

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    discounts: np.ndarray | None = None
    weights: np.ndarray | None = None
    slots: np.ndarray | None = None


class Replay:
    """A storage (:class:`ReplayBuffer` or :class:`FrameReplayBuffer`), n-step queues when
    ``n_step > 1``, and prioritized sampling when ``prioritized``: new transitions enter at the
    highest priority seen, sampled ones get ``(|TD error| + eps) ** alpha`` back from the update.
    With ``n_step=1`` and uniform sampling it fills and samples its storage exactly as the storage
    alone would."""

    def __init__(self, storage: ReplayBuffer | FrameReplayBuffer, *, n_step: int = 1, gamma: float = 0.99,
                 prioritized: bool = False, alpha: float = 0.6) -> None:
        self.storage = storage
        self.nstep = NStep(n_step, gamma) if n_step > 1 else None
        self.tree = SumTree(storage.capacity) if prioritized else None
        self.alpha = alpha
        self.max_priority = 1.0

    def __len__(self) -> int:
        return self.storage.size

    def add(self, obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, next_obs: np.ndarray,
            terminated: np.ndarray, truncated: np.ndarray | None = None) -> None:
        obs_h, next_h = self.storage.handles(obs, next_obs, terminated, truncated)
        if self.nstep is None:
            self.stored(self.storage.put(obs_h, next_h, actions, rewards, terminated))
        else:
            self.put(self.nstep.push(obs_h, actions, rewards, next_h, terminated, truncated))

    def put(self, transitions: list[tuple]) -> None:
        if transitions:
            obs, nxt, act, ret, term, disc = (np.asarray(c) for c in zip(*transitions))
            self.stored(self.storage.put(obs, nxt, act, ret, term, disc))

    def put_transitions(self, obs: np.ndarray, next_obs: np.ndarray, actions: np.ndarray, returns: np.ndarray,
                        terminated: np.ndarray, discounts: np.ndarray, td_errors: np.ndarray | None = None) -> None:
        """Store finished (n-step) transitions made elsewhere (Ape-X actors), at the priorities of
        their ``td_errors`` (or the highest seen). Needs a :class:`ReplayBuffer` storage."""
        slots = self.storage.put(obs, next_obs, actions, returns, terminated, discounts)
        if self.tree is not None and td_errors is not None:
            self.update_priorities(slots, td_errors)
        else:
            self.stored(slots)

    def stored(self, slots: np.ndarray) -> None:
        if self.tree is not None:
            self.tree.set(slots, self.max_priority)

    def end_episodes(self) -> None:
        """The envs are about to start new episodes (a fresh or resumed loop): queued steps become
        transitions truncated where their episodes were cut."""
        if self.nstep is not None:
            self.put(self.nstep.flush())
        self.storage.end_episodes()

    def sample(self, rng: np.random.Generator, num_batches: int, batch_size: int, as_float: bool = True,
               beta: float = 1.0) -> Batch:
        if self.tree is None:
            return Batch(*self.storage.gather(uniform_slots(self.storage, rng, num_batches, batch_size), as_float))
        if self.storage.size == 0:
            raise ValueError("cannot sample from an empty buffer")
        total = self.tree.total
        # Stratified: each minibatch takes one slot from each of batch_size equal slices of the mass.
        mass = (np.arange(batch_size) + rng.random((num_batches, batch_size))) * (total / batch_size)
        slots = self.tree.find(np.minimum(mass, np.nextafter(total, 0.0)))
        prob = self.tree.get(slots) / total
        weights = (self.storage.size * prob) ** -beta
        weights /= weights.max(axis=1, keepdims=True)  # each minibatch's largest step is the plain one
        return Batch(*self.storage.gather(slots, as_float), weights=weights.astype(np.float32), slots=slots)

    def update_priorities(self, slots: np.ndarray, td_errors: np.ndarray) -> None:
        assert self.tree is not None
        p = (np.abs(np.asarray(td_errors, np.float64)) + PRIORITY_EPS) ** self.alpha
        self.tree.set(slots, p)
        self.max_priority = max(self.max_priority, float(p.max()))

    def save(self, path: Path) -> None:
        """One ``.npz`` (the checkpoint's ``buffer.npz``): the storage's arrays, and the priorities
        and n-step queues when there are any."""
        arrays = self.storage.arrays()
        if self.tree is not None:
            arrays.update(priorities=self.tree.get(np.arange(self.storage.capacity)),
                          max_priority=np.asarray(self.max_priority))
        if self.nstep is not None:
            arrays.update(self.nstep.arrays())
        np.savez(path, kind=np.asarray(self.storage.kind), **arrays)

    def restore(self, path: Path) -> None:
        with np.load(path) as d:  # no pickles: a checkpoint file never runs code
            kind = str(d["kind"]) if "kind" in d.files else "flat"
            if kind != self.storage.kind:
                raise UsageError(f"--resume: the checkpoint's replay holds {kind} storage, this run {self.storage.kind}:"
                                 " resume with the same options (frame_dedup), or start afresh without --resume")
            self.storage.restore(d)
            if self.tree is not None:
                self.tree.rebuild(d["priorities"])
                self.max_priority = float(d["max_priority"])
            if self.nstep is not None:
                self.nstep.restore(d)


def frame_stacked(spec: EnvSpec) -> bool:
    """Whether the env's observations come out of gymnasium's FrameStackObservation (its last wrapper)."""
    wrappers = spec.wrappers
    if not wrappers:
        return False
    last = wrappers[-1]
    name = last if isinstance(last, str) else next(iter(last), None) if isinstance(last, dict) else None
    return name == "FrameStackObservation" and len(spec.obs_shape) >= 2


def build(cfg: TrainConfig, spec: EnvSpec, images: bool) -> Replay:
    """The replay a training run of ``cfg`` uses. Images keep their own dtype (conv nets); MLPs
    store flat float32 vectors."""
    if cfg.frame_dedup == "on" and cfg.actors:
        raise UsageError("frame_dedup on: Ape-X actors send whole stacks, which are stored as they come; "
                         "set frame_dedup auto or off with actors")
    dedup = cfg.frame_dedup == "on" or (cfg.frame_dedup == "auto" and images and frame_stacked(spec) and not cfg.actors)
    if dedup and not (images and len(spec.obs_shape) >= 2):
        raise UsageError(f"frame_dedup on: env {spec.id!r} gives {spec.obs_shape} observations to an MLP; frame "
                         "stacks are stored once only for image observations (a conv net): set frame_dedup auto or off")
    discounted = cfg.n_step > 1
    if dedup:
        storage: ReplayBuffer | FrameReplayBuffer = FrameReplayBuffer(
            cfg.buffer_size, spec.obs_shape, np.dtype(spec.obs_dtype), discounted, cfg.n_step)
    elif images:
        storage = ReplayBuffer(cfg.buffer_size, spec.obs_shape, np.dtype(spec.obs_dtype), discounted)
    else:
        storage = ReplayBuffer(cfg.buffer_size, spec.obs_dim, discounted=discounted)
    return Replay(storage, n_step=cfg.n_step, gamma=cfg.gamma, prioritized=cfg.replay == "prioritized",
                  alpha=cfg.per_alpha)
