"""Learning quality across training seeds: MinAtar 1M-step runs of one dqnc checkout, per seed.

    python benchmarks/minatar_seeds.py --game Breakout --seeds 0,1,2 --out benchmarks/results/seeds-new.json
    python benchmarks/minatar_seeds.py --checkout /path/to/old/dqnc --seeds 1,2 --out benchmarks/results/seeds-old.json
    python benchmarks/minatar_seeds.py --table benchmarks/results/seeds-old.json benchmarks/results/seeds-new.json

For each seed, in fresh processes of the checkout's `dqnc` (`python -m dqnc` with that checkout
first on PYTHONPATH, so two code versions can be compared from one venv): `dqnc train --env
MinAtar/GAME-v1 --seed S` with the game's defaults, then `dqnc eval` of the kept weights on
--episodes held-out episodes (episode seeds 10,000+). One training seed is one draw: a code
change that alters floating-point rounding sends the same seed down another trajectory, so code
versions are compared on the mean over seeds, with a 95% confidence interval (Student t) of the
difference of means. Runs are sequential; to use both cores, start one invocation per checkout,
each pinned with `taskset -c N` (--cpu records it). Pinned runs share the machine: their wall
times are not speed figures (benchmarks/minatar.py measures speed on an idle machine).
--table prints the per-seed rows and the comparison of two result files as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, finish, fmt, log, md_table

from minatar import timed

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # dqnc.fidelity's t quantiles (TF-free)


def checkout_info(path: Path) -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True).stdout.strip()

    return {"path": str(path), "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain", "dqnc"))}


def run_seed(game: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    dqnc = [sys.executable, "-P", "-m", "dqnc"]  # -P: not the working directory's dqnc, the checkout's (PYTHONPATH)
    fp32 = args.work / f"{game.lower()}-seed{seed}"
    train_cmd = [*dqnc, "train", "--env", f"MinAtar/{game}-v1", "--seed", str(seed), "-o", str(fp32), "--json",
                 "--quiet", "--force"]
    if args.total_steps:
        train_cmd += ["--total-steps", str(args.total_steps)]
    log(f"{game} seed {seed}: training ({args.checkout})")
    train, proc = timed(train_cmd)
    m = train["metrics"]
    ev = timed([*dqnc, "eval", str(fp32), "-n", str(args.episodes), "--json", "--quiet"])[0]
    log(f"{game} seed {seed}: held-out {ev['mean_return']:.2f} after {proc['wall_seconds']} s")
    return {"seed": seed, "env_steps": m["env_steps"], "best_eval_step": m["best_eval_step"], **proc,
            "mean_return": ev["mean_return"], "return_ci95": ev["return_ci95"], "episodes": ev["episodes"],
            "eval_seed": ev["seed"]}


def t_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Difference of means b - a and its 95% Welch-t interval."""
    from dqnc.fidelity import t95

    diff = float(b.mean() - a.mean())
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else 1.0
    half = t95(df) * se
    return diff, diff - half, diff + half


def table(paths: list[Path]) -> str:
    docs = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
    rows = []
    for d in docs:
        for r in d["runs"]:
            rows.append([d["label"], d["env"], str(r["seed"]), f"{r['mean_return']:.2f} ({r['return_ci95'][0]:.2f}.."
                         f"{r['return_ci95'][1]:.2f})", f"{r['best_eval_step']:,}", fmt(r["wall_seconds"]),
                         fmt(r["cpu_seconds"]), d.get("cpu") or "-"])
    out = [md_table(["code", "env", "seed", f"held-out return over {docs[0]['runs'][0]['episodes']} (95% CI)",
                     "kept step", "wall s", "CPU s", "pinned to CPU"], rows, text_columns=4), ""]
    means = [np.array([r["mean_return"] for r in d["runs"]]) for d in docs]
    for d, m in zip(docs, means):
        out.append(f"- {d['label']} ({d['checkout']['commit']}{' + changes' if d['checkout']['dirty'] else ''}): "
                   f"mean over {len(m)} seeds {m.mean():.2f} (seed sd {m.std(ddof=1) if len(m) > 1 else float('nan'):.2f})")
    if len(docs) == 2 and all(len(m) > 1 for m in means):
        diff, lo, hi = t_interval(*means)
        out.append(f"- {docs[1]['label']} - {docs[0]['label']}: {diff:+.2f} (95% CI {lo:+.2f}..{hi:+.2f}, Welch t)")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--game", default="Breakout")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    ap.add_argument("--checkout", type=Path, default=REPO, help="the dqnc source tree to run (default: this one)")
    ap.add_argument("--label", default=None, help="name of this code version in the table (default: its commit)")
    ap.add_argument("--total-steps", type=int, default=0, help="override the defaults' 1M agent steps")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--work", type=Path, default=None, help="where the artifacts go")
    ap.add_argument("--out", type=Path, default=RESULTS / "minatar-seeds.json")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out (same checkout) and "
                    "run only the missing seeds")
    ap.add_argument("--table", type=Path, nargs="+", help="print the Markdown table of these result files and exit")
    args = ap.parse_args()
    if args.table:
        print(table(args.table), end="")
        return
    args.checkout = args.checkout.resolve()
    os.environ["PYTHONPATH"] = os.pathsep.join([str(args.checkout), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    info = checkout_info(args.checkout)
    args.work = args.work or RESULTS / f"seeds-{info['commit']}"
    cpu = sorted(os.sched_getaffinity(0))
    doc = {"env": f"MinAtar/{args.game}-v1", "label": args.label or info["commit"], "checkout": info,
           "cpu": ",".join(map(str, cpu)) if len(cpu) < (os.cpu_count() or 1) else None, "runs": []}
    if args.resume and args.out.is_file():
        before = json.loads(args.out.read_text(encoding="utf-8"))
        if before["checkout"]["path"] == info["path"] and before["env"] == doc["env"]:
            doc["runs"] = before["runs"]
    done = {r["seed"] for r in doc["runs"]}
    for seed in (int(s) for s in args.seeds.split(",")):
        if seed in done:
            log(f"{args.game} seed {seed}: kept from {args.out}")
            continue
        doc["runs"].append(run_seed(args.game, seed, args))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")  # after every seed: a long job
    finish(doc, args.out, lambda _: table([args.out]))


if __name__ == "__main__":
    main()
