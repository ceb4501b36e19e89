"""README's main job, cold, against an older dqnc in the same run (alternating).

    python benchmarks/mainjob_vs_old.py --old 8180d62 --rounds 2

The old revision is checked out with `git worktree` into a temporary folder and run with the same
venv (its package first on PYTHONPATH); each round runs `dqnc run recipes/cartpole.yaml --force
--json` for the old and the new checkout, one after the other, in fresh processes timed from the
outside. Prints the wall times and each final artifact's bytes and held-out return.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT, finish, log, md_table


def run_main_job(tree: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dqnc", "run", "recipes/cartpole.yaml", "--force", "--json"],
                          cwd=tree, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    report = json.loads([ln for ln in proc.stdout.splitlines() if ln.strip()][-1])
    last = [s for s in report["stages"] if s["stage"] != "eval" and s.get("metrics")][-1]["metrics"]
    return {"wall_seconds": round(wall, 1), "exit_code": proc.returncode, "bytes": last.get("size_bytes"),
            "mean_return": last.get("mean_return"), "episodes_from": "recipe eval defaults",
            "passed": report.get("passed")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="8180d62", help="git revision of the older dqnc")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old], check=True,
                       capture_output=True)
        try:
            for r in range(args.rounds):
                for name, tree in (("old " + args.old, old), ("new (this checkout)", ROOT)):
                    log(f"round {r + 1}: {name} ...")
                    rows.append({"round": r + 1, "dqnc": name, **run_main_job(tree)})
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    doc = {"old": args.old, "rows": rows}

    def markdown(d: dict[str, Any]) -> str:
        return md_table(["round", "dqnc", "wall s (cold)", "final bytes", "mean return", "passed"],
                        [[x["round"], x["dqnc"], x["wall_seconds"], f"{x['bytes']:,}", f"{x['mean_return']:.1f}",
                          x["passed"]] for x in d["rows"]], text_columns=2)

    return finish(doc, RESULTS / "mainjob_vs_old.json", markdown)


if __name__ == "__main__":
    sys.exit(main())
