"""Where a training run's wall time goes: inside the compiled updates, or acting, stepping the
envs and evaluating (everything else in the training loop).

    python benchmarks/train_breakdown.py --env MinAtar/SpaceInvaders-v1            # 1M steps, the env's defaults
    python benchmarks/train_breakdown.py --env MinAtar/Breakout-v1 --total-steps 100000

Runs `dqnc.train.run` in this process with the env's defaults at --seed, timing each call of the
compiled update (the first call, which traces and compiles, is reported apart). Prints one line:
train_seconds (the loop's own wall time, as the manifest records it), the first call, the other
update calls (count and ms per call) and the rest of the loop.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# The repository instead of this directory: benchmarks/minatar.py would shadow the minatar package.
sys.path[0] = str(Path(__file__).resolve().parents[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="MinAtar/SpaceInvaders-v1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--total-steps", type=int, default=0, help="override the defaults' total steps")
    args = ap.parse_args()
    from dqnc import train
    from dqnc.config import build_train_config

    acc = {"first": None, "seconds": 0.0, "calls": 0}
    make = train._make_update_fn

    def timed_update_fn(*a, **k):
        update = make(*a, **k)

        def call(*batch):
            t = time.perf_counter()
            loss = float(update(*batch))
            dt = time.perf_counter() - t
            if acc["first"] is None:
                acc["first"] = dt
            else:
                acc["seconds"] += dt
                acc["calls"] += 1
            return loss

        call.counter = update.counter
        return call

    train._make_update_fn = timed_update_fn
    overrides = {"seed": args.seed, **({"total_steps": args.total_steps} if args.total_steps else {})}
    cfg = build_train_config(args.env, {}, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        m = train.run(cfg, Path(tmp) / "model").manifest["metrics"]
    rest = m["train_seconds"] - acc["seconds"] - (acc["first"] or 0.0)
    print(f"{args.env} seed {args.seed}: {m['env_steps']:,} steps, train_seconds {m['train_seconds']:.1f}; "
          f"first update call {acc['first']:.2f} s; {acc['calls']:,} more calls {acc['seconds']:.1f} s "
          f"({1e3 * acc['seconds'] / max(acc['calls'], 1):.1f} ms per call of {cfg.gradient_steps} gradient steps); "
          f"acting, env steps and evaluation {rest:.1f} s; {len(m['evals'])} evaluations, {len(m['confirms'])} confirmations; "
          f"kept step {m['best_eval_step']:,} (score {m['best_score']})")


if __name__ == "__main__":
    main()
