"""Every dqnc benchmark in one command; Markdown tables ready for BENCHMARKS.md.

Run from the repository root with dqnc's python:

    python benchmarks/run.py --quick            # smoke run, a few minutes on 2 cores
    python benchmarks/run.py --quick --no-train # without the training comparison
    python benchmarks/run.py                    # full: more samples, 3 sparsities, CartPole + Acrobot x 3 seeds

Parts (each a fresh subprocess, so one does not load or warm anything for another):
inference.py (latency per action), sizes.py (model sizes), startup.py (CLI start-up), and
train_vs_sb3.py (training wall time and returns vs Stable-Baselines3; `--no-train` skips it).
SB3 runs in benchmarks/.venv-sb3 (`bash benchmarks/setup_venv.sh`); tflite-runtime in
benchmarks/.venv-edge (created on first use). Each part writes its JSON under benchmarks/results/;
this script adds results/run.json (index, machine, command) and results/benchmarks.md (the
Markdown printed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import EDGE_VENV, RESULTS, ROOT, SB3_PYTHON, log, machine_info, machine_line, utc_now, write_json  # noqa: E402

PARTS = ("inference", "sizes", "startup", "train")
TRAIN_QUICK = {"envs": "CartPole-v1", "seeds": "0"}
TRAIN_FULL = {"envs": "CartPole-v1,Acrobot-v1", "seeds": "0,1,2"}


def part_command(part: str, args: argparse.Namespace, out: Path) -> list[str]:
    py = sys.executable
    if part == "train":
        t = TRAIN_QUICK if args.quick else TRAIN_FULL
        cmd = [py, str(HERE / "train_vs_sb3.py"), "--envs", t["envs"], "--seeds", t["seeds"],
               "--sb3-python", str(args.sb3_python), "--out", str(out)]
        return cmd + (["--quick"] if args.quick else [])
    cmd = [py, str(HERE / f"{part}.py"), "--out", str(out)] + (["--quick"] if args.quick else [])
    if part == "inference":
        cmd += ["--sb3-python", str(args.sb3_python)]
        if args.edge_python:
            cmd += ["--edge-python", str(args.edge_python)]
    return cmd


def render(part: str, doc: dict[str, Any]) -> str:
    if part == "inference":
        import inference

        return inference.markdown(doc)
    if part == "sizes":
        import sizes

        return sizes.markdown(doc)
    if part == "startup":
        import startup

        return startup.markdown(doc)
    import train_vs_sb3

    table, _ = train_vs_sb3.summarize(doc["rows"], doc["envs"])
    note = ("**--quick smoke run: tiny step budgets, the training numbers mean nothing.**\n\n"
            if doc.get("quick") else "")
    return f"{note}{train_vs_sb3.markdown_rows(doc['rows'])}\n\n{table}"


TITLES = {
    "inference": "Inference latency per action (one observation)",
    "sizes": "Model sizes",
    "startup": "CLI start-up",
    "train": "Training: dqnc vs Stable-Baselines3 DQN (rl-zoo config)",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run every dqnc benchmark and print Markdown tables.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: fewer latency samples, 80%% sparsity only, training on CartPole seed 0 "
                        "with tiny budgets (train_vs_sb3.py --quick)")
    p.add_argument("--no-train", action="store_true", help="skip the training comparison")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--sb3-python", type=Path, default=SB3_PYTHON, help="python of the SB3 venv")
    p.add_argument("--edge-python", type=Path, default=None,
                   help="python of a numpy<2 + tflite-runtime venv [default: benchmarks/.venv-edge, created if missing]")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)

    parts = [s.strip() for s in args.only.split(",")] if args.only else list(PARTS)
    unknown = [s for s in parts if s not in PARTS]
    if unknown:
        p.error(f"unknown part {unknown[0]!r}: choose from {', '.join(PARTS)}")
    if args.no_train:
        parts = [s for s in parts if s != "train"]
    if "train" in parts and not args.sb3_python.is_file():
        p.error(f"no SB3 python at {args.sb3_python}: run `bash benchmarks/setup_venv.sh`, or pass --no-train")

    command = shlex.join(["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                          if Path(sys.argv[0]).resolve().is_relative_to(ROOT) else sys.argv[0], *(argv or sys.argv[1:])])
    started = utc_now()
    index: dict[str, Any] = {"benchmark": "run", "command": command, "started_utc": started, "quick": args.quick,
                             "parts": {}}
    args.results.mkdir(parents=True, exist_ok=True)
    edge_python = args.edge_python or (EDGE_VENV / "bin" / "python")
    index["machine"] = machine_info(args.sb3_python, edge_python)  # load average before any part runs
    t_all = time.perf_counter()
    for part in parts:
        out = args.results / ("train_vs_sb3.json" if part == "train" else f"{part}.json")
        if out.exists():
            out.unlink()  # never render a stale result of an earlier run
        cmd = part_command(part, args, out)
        log(f"== {part}: {shlex.join(cmd)}")
        t0 = time.perf_counter()
        with open(args.results / f"{part}.log", "w", encoding="utf-8") as stdout_log:
            # Progress goes to our stderr; each part's own stdout (its tables) to results/PART.log.
            rc = subprocess.run(cmd, cwd=ROOT, stdout=stdout_log, stdin=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - t0
        index["parts"][part] = {"command": cmd, "exit_code": rc, "wall_seconds": round(wall, 1),
                                "json": str(out) if out.exists() else None}
        log(f"== {part}: exit {rc} after {wall:.0f} s")
    index["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    if index["machine"].get("edge_venv") is None:  # created by the inference part
        index["machine"]["edge_venv"] = machine_info(None, edge_python)["edge_venv"]
    index["machine"]["loadavg_end"] = list(os.getloadavg())
    index["finished_utc"] = utc_now()

    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    md = [f"## Benchmarks, {date}", "",
          f"Command: `{command}` (repository root; git {index['machine']['git_commit']}"
          f"{', uncommitted changes' if index['machine']['git_dirty'] else ''}; total {index['wall_seconds']:.0f} s).", "",
          f"Machine: {machine_line(index['machine'])}.", ""]
    if args.quick:
        md += ["*`--quick`: fewer latency samples and only the sparsity the ratio needs; timings are indicative.*", ""]
    for part in parts:
        info = index["parts"][part]
        md += [f"### {TITLES[part]}", ""]
        if info["json"] is None:
            md += [f"**failed** (exit {info['exit_code']}); see results/{part}.log and the messages above.", ""]
            continue
        doc = json.loads(Path(info["json"]).read_text())
        md += [render(part, doc), ""]
        if info["exit_code"] != 0:
            md += [f"**exit {info['exit_code']}**: some runs failed; see results/{part}.log.", ""]
    text = "\n".join(md).rstrip() + "\n"
    (args.results / "benchmarks.md").write_text(text, encoding="utf-8")
    write_json(args.results / "run.json", index)
    print(text)
    log(f"results in {args.results} (run.json, benchmarks.md, one JSON per part)")
    return 0 if all(v["exit_code"] == 0 for v in index["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
