"""Milliseconds per Double-DQN gradient step of a conv Q-network: TF's Conv2D kernels (plain
tf.function) against im2col convolutions under XLA, on random batches, in one process.

    python benchmarks/conv_step.py                        # MinAtar nets: Breakout (10x10x4) and SpaceInvaders (10x10x6)
    python benchmarks/conv_step.py --atari                # the Nature CNN on 4x84x84 frames, batch 32
    python benchmarks/conv_step.py --threads 1            # TF on one thread (what an update beside acting would get)

Each case builds the network of dqnc.nets_conv, wraps dqnc.train's update (``--steps`` gradient
steps per compiled call, as training does), warms it up, then times ``--calls`` calls: wall and
process CPU milliseconds per gradient step. The two paths alternate within each case, so both see
the same machine load; read the figures with the load average printed with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(spec, fast: bool, cfg, batch: int, k: int, seed: int = 0):
    from dqnc.keras import keras
    from dqnc.nets_conv import build_conv_q_network, use_im2col
    from dqnc.train import _make_update_fn

    q, target = build_conv_q_network(spec, "q"), build_conv_q_network(spec, "t")
    target.set_weights(q.get_weights())
    if fast:
        use_im2col(q)
        use_im2col(target)
    update = _make_update_fn(q, target, keras().optimizers.Adam(1e-4), cfg, jit=fast)
    rng = np.random.default_rng(seed)
    shape = (k, batch, *spec.obs_shape)
    if spec.obs_shape[0] == 4 and spec.layout == "CHW":
        obs = rng.integers(0, 255, shape, dtype=np.uint8)
    else:
        obs = rng.random(shape) < 0.1
    args = (obs, rng.integers(0, spec.n_actions, (k, batch)).astype(np.int32),
            rng.random((k, batch)).astype(np.float32), obs, np.zeros((k, batch), np.float32))
    if not fast:  # the TF-kernel path is fed float32, as training fed it before
        args = (obs.astype(np.float32), args[1], args[2], obs.astype(np.float32), args[4])
    return update, args


def time_calls(update, args, calls: int) -> tuple[float, float]:
    for _ in range(2):
        update(*args)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        float(update(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--atari", action="store_true", help="the Nature CNN on Atari frames instead of MinAtar nets")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two paths per case")
    ap.add_argument("--threads", type=int, default=0, help="TF intra- and inter-op threads (0: TF's default)")
    args = ap.parse_args()
    if args.threads:
        from dqnc.keras import tf

        tf().config.threading.set_intra_op_parallelism_threads(args.threads)
        tf().config.threading.set_inter_op_parallelism_threads(args.threads)
    from dqnc.config import build_train_config
    from dqnc.nets_conv import NATURE_CONV, ConvSpec

    cfg = build_train_config("MinAtar/Breakout-v1", {}, {})
    if args.atari:
        cases = [("Atari Nature CNN (4x84x84), batch 32", ConvSpec((4, 84, 84), 4, NATURE_CONV, (512,), layout="CHW"),
                  32, 4)]
    else:
        cases = [("MinAtar Breakout net (10x10x4), batch 64", ConvSpec((10, 10, 4), 3), 64, 16),
                 ("MinAtar SpaceInvaders net (10x10x6), batch 64", ConvSpec((10, 10, 6), 4), 64, 16)]
    print(f"1-min load {os.getloadavg()[0]:.2f}; TF threads: {args.threads or 'default'}")
    for name, spec, batch, k in cases:
        paths = {"TF Conv2D": build(spec, False, cfg, batch, k), "im2col + XLA": build(spec, True, cfg, batch, k)}
        totals = {p: [0.0, 0.0] for p in paths}
        for _ in range(args.rounds):
            for p, (update, a) in paths.items():
                wall, cpu = time_calls(update, a, args.calls)
                totals[p][0] += wall
                totals[p][1] += cpu
        steps = args.rounds * args.calls * k
        for p, (wall, cpu) in totals.items():
            print(f"{name}: {p}: {1e3 * wall / steps:.2f} ms wall, {1e3 * cpu / steps:.2f} ms CPU per gradient step")
    print(f"1-min load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
