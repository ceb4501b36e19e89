"""Training with dqnc's defaults on seeds, judged on held-out episodes (issue: trustworthy numbers).

    python benchmarks/heldout_train.py --env CartPole-v1 --seeds 100-119
    python benchmarks/heldout_train.py --env Acrobot-v1 --seeds 100-109
    python benchmarks/heldout_train.py --env CartPole-v1 --seeds 20-39 --episode-seed 900000000  # validation

Each seed is trained in a fresh `dqnc train` process with defaults, then evaluated with
`dqnc eval` on 100 episodes starting at --episode-seed (default: the held-out range's 10,000;
defaults are tuned on the validation range, 900,000,000+). Writes
benchmarks/results/heldout_train_<env>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, dqnc_command, finish, fmt, log, md_table, run_json


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--seeds", default="100-119")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--episode-seed", type=int, default=10_000)
    ap.add_argument("--train-args", default="", help="extra `dqnc train` options, e.g. '--total-steps 150000'")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    seeds = parse_seeds(args.seeds)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            out = Path(tmp) / f"s{seed}"
            t0 = time.perf_counter()
            train = run_json([*dqnc_command(), "train", "--env", args.env, "--seed", str(seed), "-o", str(out),
                              "--json", "--quiet", *args.train_args.split()])
            wall = time.perf_counter() - t0
            ev = run_json([*dqnc_command(), "eval", str(out), "-n", str(args.episodes), "--seed",
                           str(args.episode_seed), "--latency-samples", "0", "--json"])
            m = train["metrics"]
            row = {"seed": seed, "wall_seconds": round(wall, 1), "train_seconds": m["train_seconds"],
                   "env_steps": m["env_steps"], "stopped_early": m["stopped_early"],
                   "mean_return": ev["mean_return"], "ci95": ev.get("return_ci95"), "min_return": ev["min_return"],
                   "solved": ev["mean_return"] >= (ev["reward_threshold"] if ev["reward_threshold"] is not None
                                                   else float("-inf"))}
            rows.append(row)
            log(f"seed {seed}: {row['mean_return']:.1f} (min {row['min_return']:.0f}) in {wall:.0f} s")
    solved = sum(r["solved"] for r in rows)
    walls = sorted(r["wall_seconds"] for r in rows)
    doc = {"env": args.env, "seeds": seeds, "episodes": args.episodes, "episode_seed": args.episode_seed,
           "train_args": args.train_args, "rows": rows, "solved": solved, "median_wall_seconds": walls[len(walls) // 2]}

    def markdown(d: dict[str, Any]) -> str:
        table = md_table(["seed", "mean return (100 eps)", "min", "env steps", "early stop", "wall s"],
                         [[r["seed"], fmt(r["mean_return"]), fmt(r["min_return"], ".0f"), r["env_steps"],
                           "yes" if r["stopped_early"] else "no", fmt(r["wall_seconds"])] for r in d["rows"]])
        return (f"{table}\n\n{d['env']}: {d['solved']} of {len(d['rows'])} seeds solved on episodes "
                f"{d['episode_seed']}-{d['episode_seed'] + d['episodes'] - 1}; median wall {d['median_wall_seconds']} s")

    finish(doc, args.out or RESULTS / f"heldout_train_{args.env}.json", markdown)


if __name__ == "__main__":
    main()
