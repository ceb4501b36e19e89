"""Replay costs (issue 26): the sum tree per learner step, Atari replay memory per 100k transitions
with stacked observations (today's layout) and with each frame stored once, and what storing and
reading frame stacks costs.

    .venv/bin/python benchmarks/replay_bench.py [--repeats 200]

A learner step here is one minibatch's prioritized sampling (stratified prefix sums, the descent,
the importance weights) and the priority update from its TD errors, the numpy work a compiled
update call adds per minibatch. Memory is the buffers' array sizes (np.zeros reserves address
space; pages are touched as transitions arrive, so a full buffer holds this much)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from dqnc.replay import FrameReplayBuffer, Replay, ReplayBuffer

ATARI = (4, 84, 84)


class _Slots:
    """A storage stand-in holding only its size, so the tree is timed without a 1M-transition buffer."""

    kind = "bench"

    def __init__(self, capacity: int) -> None:
        self.capacity = self.size = capacity

    def gather(self, idx: np.ndarray, as_float: bool = True) -> tuple:
        return (idx, idx, idx, idx, idx, None)


def tree_ms(leaves: int, batch: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    replay = Replay(_Slots(leaves), prioritized=True)  # type: ignore[arg-type]
    replay.update_priorities(np.arange(leaves), rng.exponential(1.0, leaves))
    td = rng.exponential(1.0, (1, batch))
    blocks = []  # the fastest of 10 blocks: on a shared machine the mean measures the neighbours
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(max(1, repeats // 10)):
            b = replay.sample(rng, 1, batch, beta=0.5)
            replay.update_priorities(b.slots, td)
        blocks.append((time.perf_counter() - t0) / max(1, repeats // 10))
    return min(blocks) * 1e3


def atari_bytes(transitions: int = 100_000) -> tuple[int, int]:
    return (ReplayBuffer(transitions, ATARI, np.uint8).nbytes, FrameReplayBuffer(transitions, ATARI, np.uint8).nbytes)


def stream_us(capacity: int, num_envs: int, steps: int, batch: int) -> dict[str, float]:
    """Per env step: add() of num_envs Atari transitions, timed over the second pass through the
    buffer (the first touches fresh pages); per minibatch: reading its stacks."""
    rng = np.random.default_rng(1)
    out: dict[str, float] = {}
    for name, buf in (("stacked", ReplayBuffer(capacity, ATARI, np.uint8)),
                      ("frames", FrameReplayBuffer(capacity, ATARI, np.uint8))):
        obs = rng.integers(0, 256, (num_envs, *ATARI), dtype=np.uint8)
        t_add = 0.0
        for t in range(2 * steps):
            nxt = np.concatenate([obs[:, 1:], rng.integers(0, 256, (num_envs, 1, 84, 84), dtype=np.uint8)], axis=1)
            t0 = time.perf_counter()
            buf.add(obs, np.zeros(num_envs), np.zeros(num_envs), nxt, np.zeros(num_envs), np.zeros(num_envs))
            t_add += (time.perf_counter() - t0) * (t >= steps)
            obs = nxt
        t0 = time.perf_counter()
        for _ in range(20):
            buf.sample(rng, 16, batch, as_float=False)
        out[f"{name}_add_us_per_env_step"] = t_add / steps * 1e6
        out[f"{name}_read_us_per_minibatch"] = (time.perf_counter() - t0) / (20 * 16) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    print("sum tree, ms per learner step (sample one minibatch + update its priorities; fastest of 10 blocks):")
    for leaves in (1 << 17, 1 << 20):
        for batch in (32, 256):
            print(f"  {leaves:>9,} leaves, batch {batch:>3}: {tree_ms(leaves, batch, args.repeats):.3f} ms")
    before, after = atari_bytes()
    print(f"Atari replay per 100k transitions (uint8 4x84x84): stacked obs + next obs {before / 1e9:.2f} GB, "
          f"each frame once {after / 1e9:.2f} GB ({before / after:.1f}x less)")
    s = stream_us(capacity=6_000, num_envs=8, steps=6_000 // 8, batch=32)
    print("Atari frames, 8 envs, 6k-transition buffers (us): "
          + ", ".join(f"{k} {v:.0f}" for k, v in s.items()))


if __name__ == "__main__":
    main()
