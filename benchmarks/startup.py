"""Start-up cost of the dqnc CLI: wall time and peak RSS per command, median of N runs.

Run with dqnc's python (its venv's `dqnc` script is the one measured):

    python benchmarks/startup.py            # 5 timed runs per command
    python benchmarks/startup.py --runs 9

Commands: `dqnc --help`, `dqnc recipe validate recipes/cartpole.yaml`, and
`dqnc eval BUNDLE -n 1 --latency-samples 0` on an int8 bundle of sample_models/cartpole (made
first with `dqnc quantize` + `dqnc export` in a temporary directory). Each command runs once
untimed (warm file cache), then N times; every run is a fresh process, timed from the outside
(wall clock from spawn to exit) and its peak RSS read from os.wait4's rusage (that process only).

Writes benchmarks/results/startup.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    finish,
    RESULTS, ROOT, dqnc_command, log, md_table, utc_now,
)

DEFAULT_OUT = RESULTS / "startup.json"


def measure(cmd: list[str], cwd: Path, log_path: Path) -> dict[str, Any]:
    """One run: wall seconds and peak RSS (KiB) of exactly this child process."""
    with open(log_path, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped above; keep Popen from waiting again
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-10:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return {"wall_seconds": wall, "max_rss_kib": usage.ru_maxrss, "user_seconds": usage.ru_utime,
            "sys_seconds": usage.ru_stime}


def make_bundle(tmp: Path) -> Path:
    dqnc = dqnc_command()
    int8, bundle = tmp / "int8", tmp / "bundle"
    subprocess.run([*dqnc, "quantize", str(ROOT / "sample_models" / "cartpole"), "-o", str(int8), "--json"],
                   check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    subprocess.run([*dqnc, "export", str(int8), "-o", str(bundle), "--json"],
                   check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return bundle


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dqnc CLI start-up: wall time and peak RSS, median of N runs.")
    p.add_argument("--runs", type=int, default=5, help="timed runs per command (after one untimed run)")
    p.add_argument("--quick", action="store_true", help="accepted for run.py; the same 5 runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)

    dqnc = dqnc_command()
    doc: dict[str, Any] = {"benchmark": "startup", "started_utc": utc_now(), "runs": args.runs, "dqnc": dqnc,
                           "cwd": str(ROOT), "commands": []}
    with tempfile.TemporaryDirectory(prefix="dqnc-bench-startup-") as tmp_s:
        tmp = Path(tmp_s)
        log("making an int8 bundle of sample_models/cartpole (dqnc quantize + dqnc export) ...")
        bundle = make_bundle(tmp)
        commands = [
            ("dqnc --help", ["--help"]),
            ("dqnc recipe validate recipes/cartpole.yaml", ["recipe", "validate", "recipes/cartpole.yaml"]),
            ("dqnc eval BUNDLE -n 1 --latency-samples 0", ["eval", str(bundle), "-n", "1", "--latency-samples", "0"]),
        ]
        for label, extra in commands:
            cmd = [*dqnc, *extra]
            log(f"{label}: 1 untimed + {args.runs} timed runs ...")
            measure(cmd, ROOT, tmp / "out.log")
            runs = [measure(cmd, ROOT, tmp / "out.log") for _ in range(args.runs)]
            walls = [r["wall_seconds"] for r in runs]
            rss = [r["max_rss_kib"] for r in runs]
            doc["commands"].append({
                "command": label, "argv": cmd, "runs": runs,
                "median_wall_seconds": statistics.median(walls), "min_wall_seconds": min(walls),
                "max_wall_seconds": max(walls), "median_max_rss_kib": statistics.median(rss),
                "median_user_seconds": statistics.median(r["user_seconds"] for r in runs),
            })
    return finish(doc, args.out, markdown, None)


def markdown(doc: dict[str, Any]) -> str:
    head = ["command", "median wall s", "min - max wall s", "median CPU user s", "median peak RSS"]
    rows = [[f"`{c['command']}`", f"{c['median_wall_seconds']:.2f}",
             f"{c['min_wall_seconds']:.2f} - {c['max_wall_seconds']:.2f}", f"{c['median_user_seconds']:.2f}",
             f"{c['median_max_rss_kib'] / 1024:.0f} MiB"] for c in doc["commands"]]
    return "\n".join([md_table(head, rows), "",
                      f"Median of {doc['runs']} runs after one untimed run; each run a fresh process (wall clock from "
                      "spawn to exit; peak RSS from os.wait4). BUNDLE = `dqnc export` of an int8 `dqnc quantize` of "
                      "sample_models/cartpole; eval runs 1 episode without latency sampling."])


if __name__ == "__main__":
    sys.exit(main())
