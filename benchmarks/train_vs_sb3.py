"""Side-by-side training benchmark: dqnc vs Stable-Baselines3 DQN (rl-zoo tuned config).

Run with dqnc's python; SB3 runs in its own venv (benchmarks/setup_venv.sh creates it):

    python benchmarks/train_vs_sb3.py --envs CartPole-v1 --seeds 0,1,2,3,4
    python benchmarks/train_vs_sb3.py --envs CartPole-v1 --seeds 0 --quick   # smoke test only

For each env and seed the two tools alternate (dqnc, then SB3), so slow drift in machine load hits
both about equally. Every run is a fresh subprocess timed from the outside, so start-up costs
(importing TensorFlow or torch) count, as they do for a user. Prints a Markdown table and a
per-tool summary, and writes every row plus machine info to benchmarks/results/train_vs_sb3.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _common import machine_info, machine_line  # benchmarks/ is this script's sys.path[0]

HERE = Path(__file__).resolve().parent
DEFAULT_SB3_PYTHON = HERE / ".venv-sb3" / "bin" / "python"
DEFAULT_OUT = HERE / "results" / "train_vs_sb3.json"
# Smoke-test budget: enough steps to pass learning_starts and run a few updates, nothing more.
QUICK_STEPS = 2000
QUICK_EPISODES = 10

Row = dict[str, Any]


class RunFailed(RuntimeError):
    """A subprocess exited non-zero or printed no JSON; the message carries its stderr tail."""


def dqnc_command() -> list[str]:
    """The `dqnc` console script of the running venv (the harness must run with dqnc's python)."""
    script = Path(sys.executable).parent / "dqnc"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dqnc"]


def run_json(cmd: list[str]) -> tuple[dict[str, Any], float]:
    """Run ``cmd``, return (the JSON object on the last stdout line, wall seconds of the whole process)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RunFailed(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    try:
        return json.loads(lines[-1]), wall
    except json.JSONDecodeError as e:
        raise RunFailed(f"no JSON on stdout of {' '.join(cmd)}: {lines[-1][:200]!r}") from e


def run_dqnc(env: str, seed: int, steps: int | None, episodes: int) -> Row:
    """Train with dqnc (tuned per-env defaults, as a user would run it), then evaluate the artifact."""
    row: Row = {"tool": "dqnc", "env": env, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="dqnc-bench-") as tmp:
        out = Path(tmp) / "model"
        cmd = [*dqnc_command(), "train", "--env", env, "--seed", str(seed), "-o", str(out), "--json", "--quiet"]
        if steps is not None:
            cmd += ["--total-steps", str(steps)]
        train, wall = run_json(cmd)
        m = train["metrics"]
        ev, eval_wall = run_json([*dqnc_command(), "eval", str(out), "--json", "-n", str(episodes),
                                  "--seed", "10000", "--latency-samples", "0"])
    threshold = ev.get("reward_threshold")
    row.update(
        # The train process ends with the artifact on disk; that is the time a user waits.
        wall_seconds=round(wall, 3),
        process_seconds=round(wall, 3),
        train_seconds=m["train_seconds"],
        eval_process_seconds=round(eval_wall, 3),
        env_steps=m["env_steps"],
        steps_per_second=m["steps_per_second"],
        stopped_early=m.get("stopped_early"),
        episodes=ev["episodes"],
        mean_return=ev["mean_return"],
        std_return=ev["std_return"],
        reward_threshold=threshold,
        solved=None if threshold is None else ev["mean_return"] >= threshold,
    )
    return row


def run_sb3(sb3_python: Path, env: str, seed: int, steps: int | None, episodes: int,
            torch_threads: int | None = None) -> Row:
    """Train SB3 DQN with the zoo config (sb3_train.py), which also runs the greedy evaluation."""
    with tempfile.TemporaryDirectory(prefix="sb3-bench-") as tmp:
        cmd = [str(sb3_python), str(HERE / "sb3_train.py"), "--env", env, "--seed", str(seed),
               "--episodes", str(episodes), "--episode-seed", "10000", "--eval-callback",
               "--save", str(Path(tmp) / "model.zip")]
        if steps is not None:
            cmd += ["--steps", str(steps)]
        if torch_threads is not None:
            cmd += ["--torch-threads", str(torch_threads)]
        res, wall = run_json(cmd)
    # sb3_train.py trains, saves and then evaluates in one process. The final evaluation is taken
    # out of wall_seconds so both tools' wall time means "start to trained model on disk";
    # process_seconds keeps the raw whole-process time.
    res["process_seconds"] = round(wall, 3)
    res["wall_seconds"] = round(wall - res["eval_seconds"], 3)
    return res


def failed_row(tool: str, env: str, seed: int, err: Exception) -> Row:
    """A row that records a failure, so one bad run does not lose the rest of a long benchmark."""
    return {"tool": tool, "env": env, "seed": seed, "error": str(err)}


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_rows(rows: list[Row]) -> str:
    head = ["tool", "env", "seed", "wall s", "env steps", "steps/s", "mean return", "solved"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['tool']} | {r['env']} | {r['seed']} | failed: {r['error'].splitlines()[-1][:60]} "
                       "| | | | |")
            continue
        eps = r.get("episodes", 100)
        out.append(
            f"| {r['tool']} | {r['env']} | {r['seed']} | {fmt(r['wall_seconds'], '.1f')} | {fmt(r['env_steps'], ',')} "
            f"| {fmt(r['steps_per_second'], ',.0f')} | {r['mean_return']:.1f} ± {r['std_return']:.1f} ({eps} eps) "
            f"| {'yes' if r['solved'] else 'no'} |"
        )
    return "\n".join(out)


def summarize(rows: list[Row], envs: list[str]) -> tuple[str, list[Row]]:
    """Per env and tool: median wall time, seeds solved; plus the dqnc/SB3 ratio of median wall times."""
    summary: list[Row] = []
    for env in envs:
        medians: dict[str, float] = {}
        for tool in ("dqnc", "sb3"):
            mine = [r for r in rows if r["env"] == env and r["tool"] == tool]
            ok = [r for r in mine if "error" not in r]
            med = statistics.median(r["wall_seconds"] for r in ok) if ok else None
            if med is not None:
                medians[tool] = med
            summary.append({
                "env": env, "tool": tool, "runs": len(mine), "failed_runs": len(mine) - len(ok),
                "median_wall_seconds": med,
                "median_steps_per_second": statistics.median(r["steps_per_second"] for r in ok) if ok else None,
                "seeds_solved": sum(bool(r["solved"]) for r in ok),
            })
        ratio = medians["dqnc"] / medians["sb3"] if len(medians) == 2 and medians["sb3"] > 0 else None
        for s in summary[-2:]:
            s["wall_ratio_dqnc_over_sb3"] = ratio

    head = ["env", "tool", "median wall s", "median steps/s", "solved / seeds", "wall dqnc / sb3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        lines.append(
            f"| {s['env']} | {s['tool']} | {fmt(s['median_wall_seconds'], '.1f')} "
            f"| {fmt(s['median_steps_per_second'], ',.0f')} | {s['seeds_solved']} / {s['runs']} "
            f"| {fmt(s['wall_ratio_dqnc_over_sb3'], '.2f')} |"
        )
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dqnc vs SB3 DQN (rl-zoo config): wall time and returns.")
    p.add_argument("--envs", default="CartPole-v1", help="comma-separated env ids (CartPole-v1, Acrobot-v1)")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--sb3-python", type=Path, default=DEFAULT_SB3_PYTHON,
                   help="python of the SB3 venv (benchmarks/setup_venv.sh creates the default)")
    p.add_argument("--episodes", type=int, default=100, help="greedy evaluation episodes per run")
    p.add_argument("--sb3-torch-threads", type=int, default=None,
                   help="pass torch.set_num_threads(N) to SB3 (default: torch's own, as users run it)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_STEPS} training steps and {QUICK_EPISODES} eval episodes; "
                        "the numbers mean nothing")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)

    envs = [e.strip() for e in args.envs.split(",") if e.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not args.sb3_python.is_file():
        p.error(f"no SB3 python at {args.sb3_python}: run `bash benchmarks/setup_venv.sh` first")
    steps = QUICK_STEPS if args.quick else None
    episodes = QUICK_EPISODES if args.quick else args.episodes

    info = machine_info(args.sb3_python)
    if info["loadavg"][0] > 0.5 * (info["nproc"] or 1):
        # Measured here: torch's 2 threads on 2 contended cores ran ~60x slower, TF far less so,
        # so a busy machine skews the ratio, not just the absolute times.
        print(f"WARNING: machine busy (1-min load {info['loadavg'][0]:.2f} on {info['nproc']} cores); "
              "timings, SB3's above all, will be inflated. Run on a quiet machine.", file=sys.stderr, flush=True)
    doc: dict[str, Any] = {
        "benchmark": "train_vs_sb3",
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "envs": envs, "seeds": seeds, "episodes": episodes, "steps_override": steps,
        "sb3_torch_threads": args.sb3_torch_threads,
        "wall_seconds_note": "dqnc: whole `dqnc train` process (import, train, save); sb3: whole "
                             "sb3_train.py process minus its final greedy evaluation (import, train, save). "
                             "process_seconds is the raw subprocess time.",
        "machine": info,
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # Rewritten after every run, so an interrupted benchmark keeps what it measured.
        args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    rows: list[Row] = doc["rows"]
    for env in envs:
        for seed in seeds:
            for tool in ("dqnc", "sb3"):
                print(f"[{tool}] {env} seed {seed} ...", file=sys.stderr, flush=True)
                # Kept per row: torch's threads in particular slow down many-fold when another
                # process competes for the 2 cores, so a busy moment must be visible afterwards.
                load = round(os.getloadavg()[0], 2)
                try:
                    row = (run_dqnc(env, seed, steps, episodes) if tool == "dqnc"
                           else run_sb3(args.sb3_python, env, seed, steps, episodes, args.sb3_torch_threads))
                except RunFailed as e:
                    print(f"[{tool}] FAILED: {e}", file=sys.stderr, flush=True)
                    row = failed_row(tool, env, seed, e)
                row["loadavg_1m_before"] = load
                rows.append(row)
                save()

    table, summary = summarize(rows, envs)
    doc["summary"] = summary
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    save()

    if args.quick:
        print("**--quick smoke run: tiny step budgets, the numbers below mean nothing.**\n")
    print(markdown_rows(rows))
    print()
    print(table)
    print(f"\nmachine: {machine_line(info)}")
    print(f"rows written to {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
