"""The shipped recipes end to end, with dqnc's fidelity vocabulary (BENCHMARKS.md section 2).

    python benchmarks/recipes.py                         # every recipes/*.yaml, cold (--force)
    python benchmarks/recipes.py recipes/cartpole.yaml   # some of them
    python benchmarks/recipes.py --cached                # re-use cached stages (timing = cached run)

Each recipe runs as `dqnc run RECIPE --json [--force]` in a fresh process (wall time measured
from the outside). Every stage is evaluated by the recipe on its held-out episodes (seeds 10,000+:
no stage rolls out from them) against the recipe's source policy. Writes
benchmarks/results/recipes.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT, dqnc_command, finish, log, md_table

import json


def run_recipe(path: Path, cached: bool) -> dict[str, Any]:
    cmd = [*dqnc_command(), "run", str(path), "--json", "--quiet", *([] if cached else ["--force"])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise SystemExit(f"{path}: exit {proc.returncode}, no report\n{proc.stderr[-2000:]}")
    report = json.loads(lines[-1])
    report["exit_code"], report["outside_wall_seconds"] = proc.returncode, round(wall, 1)
    return report


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def rows_of(name: str, report: dict[str, Any]) -> list[list[Any]]:
    out = []
    for st in report["stages"]:
        m = st.get("metrics") or {}
        if not m or st["stage"] == "eval":
            continue
        ci = m.get("return_ci95")
        ret = "-" if m.get("mean_return") is None else (
            f"{m['mean_return']:.1f} ± {(ci[1] - ci[0]) / 2:.1f}" if ci else f"{m['mean_return']:.1f}")
        regret = "-" if m.get("regret") is None or m.get("states") is None else f"{m['regret']:.4f} / {m['regret_p99']:.3f}"
        agree = "-" if m.get("states") is None else f"{_pct(m['agreement'])} of {m['states']:,}"
        dec = "-" if m.get("decisive_states") is None else (
            f"{_pct(m['decisive_agreement'])} of {m['decisive_states']:,} ({_pct(m['decisive_share'])})")
        lat = "-" if m.get("latency_p50_us") is None else f"{m['latency_p50_us']:.1f} ({m.get('runtime')})"
        out.append([name, st["name"], m.get("precision"), f"{m['size_bytes']:,}" if m.get("size_bytes") else "-",
                    ret, regret, agree, dec, lat])
        name = ""
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", type=Path)
    ap.add_argument("--cached", action="store_true", help="do not pass --force")
    ap.add_argument("--out", type=Path, default=RESULTS / "recipes.json")
    args = ap.parse_args()
    paths = args.recipes or sorted((ROOT / "recipes").glob("*.yaml"))
    doc: dict[str, Any] = {"cached": args.cached, "recipes": {}}
    for p in paths:
        log(f"running {p} ...")
        rep = run_recipe(p, args.cached)
        doc["recipes"][Path(p).name] = rep
        log(f"{p}: {rep.get('verdict')} (exit {rep['exit_code']}) in {rep['outside_wall_seconds']} s")

    def markdown(d: dict[str, Any]) -> str:
        head = ["recipe (verdict, wall s)", "stage", "prec.", "bytes", "return ± 95% CI", "regret mean / p99",
                "agreement (states)", "decisive agreement (states, share)", "p50 us"]
        rows: list[list[Any]] = []
        for name, rep in d["recipes"].items():
            rows += rows_of(f"`{name}` ({rep.get('verdict')}, {rep['outside_wall_seconds']} s)", rep)
        return md_table(head, rows, text_columns=len(head))

    finish(doc, args.out, markdown)


if __name__ == "__main__":
    sys.exit(main())
