"""Print every figure that differs between two recipe reports (report.json), skipping what is
expected to move between runs: latencies, wall times, paths and timestamps. Stages are matched
by name, so an added row shows as one line.

    python benchmarks/compare_reports.py OLD/report.json NEW/report.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

SKIP = ("latency", "seconds", "wall", "time", "path", "created", "out_dir", "recipe", "_us")


def walk(x: Any, y: Any, at: str = "") -> None:
    if any(s in at for s in SKIP):
        return
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            walk(x.get(k), y.get(k), f"{at}.{k}")
    elif isinstance(x, list) and isinstance(y, list) and all(isinstance(v, dict) and "name" in v for v in x + y):
        walk({v["name"]: v for v in x}, {v["name"]: v for v in y}, at)
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y)):
            walk(u, v, f"{at}[{i}]")
    elif x != y:
        print(f"{at}: {x!r} -> {y!r}")


if __name__ == "__main__":
    with open(sys.argv[1]) as a, open(sys.argv[2]) as b:
        walk(json.load(a), json.load(b))
