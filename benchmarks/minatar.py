"""MinAtar Breakout and SpaceInvaders: 1M-step training speed, held-out return, int8 and pruned + int8.

    python benchmarks/minatar.py                                  # both games, 1M agent steps each
    python benchmarks/minatar.py --games SpaceInvaders            # one game
    python benchmarks/minatar.py --total-steps 50000 --episodes 10 --work /tmp/m   # a quick smoke run

For each game, in fresh `dqnc` processes: train with the game's defaults (dqnc/config.py) at
--seed (wall and CPU seconds of the training process, steps/s, 1-min load average before and
after); evaluate the fp32 model on --episodes held-out episodes (default episode seeds 10,000+);
quantize it to int8, and to an fp32 TFLite file as the size reference; prune 80% (10 distillation
epochs) and quantize that to int8; evaluate both compressed models against the fp32 parent (return
with 95% CI, regret, agreement and decisive agreement, file size vs the fp32 TFLite file, per-action
LiteRT latency). Writes benchmarks/results/minatar.json and prints (and writes) a Markdown table.
The machine is usually shared: compare CPU seconds, and read wall times with the load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, dqnc_command, finish, fmt, kib, log, md_table, run_json

GAMES = ("Breakout", "SpaceInvaders")


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run a `--json` dqnc command; return its JSON and the process's wall/CPU seconds and load."""
    load0, cpu0, t0 = os.getloadavg()[0], _children_cpu(), time.perf_counter()
    doc = run_json(cmd)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    return doc, {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "load_before": round(load0, 2),
                 "load_after": round(os.getloadavg()[0], 2)}


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def bench_game(game: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    dqnc = dqnc_command()
    env = f"MinAtar/{game}-v1"
    d = work / game.lower()
    fp32 = d / "fp32"
    train_cmd = [*dqnc, "train", "--env", env, "--seed", str(args.seed), "-o", str(fp32), "--json", "--quiet",
                 "--force"]
    if args.total_steps:
        train_cmd += ["--total-steps", str(args.total_steps)]
    log(f"{game}: training ({' '.join(train_cmd[len(dqnc):])})")
    train, proc = timed(train_cmd)
    m = train["metrics"]
    steps = m["env_steps"]
    training = {**proc, "env_steps": steps, "gradient_steps": m["gradient_steps"], "episodes": m["episodes"],
                "train_seconds": m["train_seconds"], "steps_per_second": m["steps_per_second"],
                "process_steps_per_second": round(steps / proc["wall_seconds"], 1),
                "cpu_seconds_per_1k_steps": round(1000 * proc["cpu_seconds"] / steps, 3),
                "best_eval_step": m["best_eval_step"], "best_score": m["best_score"]}
    log(f"{game}: {steps:,} steps in {proc['wall_seconds']} s wall, {proc['cpu_seconds']} CPU s "
        f"({training['process_steps_per_second']} steps/s; load {proc['load_before']} -> {proc['load_after']})")

    ev = ["eval", "-n", str(args.episodes), "--json", "--quiet"]
    models = {"fp32": run_json([*dqnc, *ev, str(fp32)])}
    log(f"{game}: fp32 held-out return {models['fp32']['mean_return']:.2f}")
    run([*dqnc, "quantize", str(fp32), "--mode", "fp32", "-o", str(d / "fp32-tflite"), "--force", "--quiet"])
    run([*dqnc, "quantize", str(fp32), "-o", str(d / "int8"), "--force", "--quiet"])
    run([*dqnc, "prune", str(fp32), "--sparsity", "0.8", "--epochs", str(args.prune_epochs), "-o", str(d / "pruned"),
         "--force", "--quiet"])
    run([*dqnc, "quantize", str(d / "pruned"), "-o", str(d / "pruned-int8"), "--force", "--quiet"])
    tflite_bytes = (d / "fp32-tflite" / "model.tflite").stat().st_size
    for name in ("int8", "pruned-int8"):
        models[name] = run_json([*dqnc, *ev, str(d / name), "--reference", str(fp32), "--runtime", "litert"])
        ref = models[name]["reference"]
        log(f"{game}: {name} return {models[name]['mean_return']:.2f}, decisive agreement "
            f"{100 * ref['decisive_agreement']:.2f}%, {models[name]['size_bytes']:,} bytes")
    return {"env": env, "seed": args.seed, "training": training, "fp32_tflite_bytes": tflite_bytes, "eval": models,
            "train_command": " ".join(train_cmd[len(dqnc):])}


def markdown(doc: dict[str, Any]) -> str:
    speed = [[g["env"], f"{g['training']['env_steps']:,}", fmt(g["training"]["wall_seconds"]),
              fmt(g["training"]["cpu_seconds"]), fmt(g["training"]["process_steps_per_second"], ",.0f"),
              fmt(g["training"]["cpu_seconds_per_1k_steps"], ".2f"),
              f"{g['training']['load_before']} / {g['training']['load_after']}"] for g in doc["games"]]
    out = [md_table(["env", "agent steps", "wall s", "CPU s", "steps/s", "CPU s per 1k steps", "load before / after"],
                    speed), ""]
    rows = []
    for g in doc["games"]:
        tfl = g["fp32_tflite_bytes"]
        for name, e in g["eval"].items():
            ref = e.get("reference") or {}
            ci = e.get("return_ci95") or [None, None]
            lat = (e.get("latency_us") or {}).get("action", {}).get("p50")
            rows.append([g["env"], name, f"{e['mean_return']:.2f} ({ci[0]:.2f}..{ci[1]:.2f})",
                         f"{100 * ref['agreement']:.1f}% / {100 * ref['decisive_agreement']:.1f}%" if ref else "-",
                         fmt(ref.get("regret"), ".4f") if ref else "-",
                         f"{e['size_bytes']:,} ({tfl / e['size_bytes']:.2f}x smaller)" if name != "fp32" else
                         f"{kib(tfl)} TFLite",
                         f"{lat:.1f} us {e.get('runtime')}" if lat is not None else "-"])
    out.append(md_table(["env", "model", f"held-out return over {doc['episodes']} (95% CI)",
                         "agreement vs fp32 (all / decisive)", "regret", "file bytes (vs fp32 TFLite)",
                         "latency p50 per action"], rows, text_columns=2))
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--games", default=",".join(GAMES), help="comma-separated MinAtar games")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--total-steps", type=int, default=0, help="override the defaults' 1M agent steps")
    ap.add_argument("--episodes", type=int, default=100, help="held-out episodes (seeds 10,000+)")
    ap.add_argument("--prune-epochs", type=int, default=10)
    ap.add_argument("--work", type=Path, default=RESULTS / "minatar-runs", help="where the artifacts go")
    ap.add_argument("--out", type=Path, default=RESULTS / "minatar.json")
    args = ap.parse_args()
    games = []
    for game in args.games.split(","):
        games.append(bench_game(game.strip(), args.work, args))
        # Each game is written as soon as it finishes: a later failure keeps the earlier results.
        doc = {"benchmark": "minatar", "episodes": args.episodes, "games": games, "argv": sys.argv[1:]}
        finish(doc, args.out, markdown)


if __name__ == "__main__":
    main()
