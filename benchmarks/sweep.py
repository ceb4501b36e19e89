"""`dqnc sweep` on CartPole: parallel on Ray vs the same trials one after another, cache hits, the
front, interrupt + resume, best.yaml reproduced, and a separately started Ray cluster.

Run from the repository root with dqnc's python (2 cores: ~10 minutes):

    python benchmarks/sweep.py                 # local Ray + sequential baseline + best.yaml check
    python benchmarks/sweep.py --cluster       # also: `ray start --head`, --address, Ctrl-C and resume

The sweep is recipes/cartpole.yaml with student.hidden in [8,8],[16,16],[32,32] x int8.mode in
int8,int16x8 x 2 distill seeds = 12 trials. The sequential baseline runs the same 12 trials in one
process, one after another, with the same shared stage cache (so the ratio is parallelism alone).
Writes benchmarks/results/sweep.json and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS, ROOT, dqnc_command, log, machine_info, machine_line, utc_now, write_json  # noqa: E402

RECIPE = ROOT / "recipes" / "cartpole.yaml"
GRID = ["student.hidden=[8,8],[16,16],[32,32]", "int8.mode=int8,int16x8"]
SEEDS = 2
# What must agree between two sweeps of the same trials (latency and wall time may not).
SAME = ("size_bytes", "mean_return", "regret", "agreement", "decisive_agreement", "precision")


def sweep_cmd(out: Path, *extra: str) -> list[str]:
    grid = [a for g in GRID for a in ("--grid", g)]
    return [*dqnc_command(), "sweep", str(RECIPE), *grid, "--seeds", str(SEEDS), "--pick", "smallest-passing",
            "--out", str(out), "--json", *extra]


def run_sweep(out: Path, *extra: str) -> tuple[dict[str, Any], float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(sweep_cmd(out, *extra), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"dqnc sweep exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads((out / "sweep.json").read_text()), wall, proc.returncode


def sequential(out: Path) -> float:
    """The same trials in this one process, one after another (no Ray), sharing one stage cache."""
    from dqnc import recipe, sweep
    from dqnc.recipe.cache import SharedCache

    loaded = recipe.load(RECIPE)
    trials = sweep.expand(RECIPE.read_text(), loaded.data, sweep.parse_grid(GRID), SEEDS)
    shared = SharedCache(out / "cache")
    t0 = time.perf_counter()
    for t in trials:
        one = recipe.load(RECIPE, [*t.sets, f"out_dir={json.dumps(str(out / 'trials' / t.id))}"])
        try:
            recipe.run(one, shared_cache=shared)
        except Exception as e:  # a gate failure is a result here, as in the sweep
            log(f"sequential {t.id}: {type(e).__name__}: {str(e)[:120]}")
    return time.perf_counter() - t0


def interrupt_and_resume(out: Path, address: str, after: int) -> dict[str, Any]:
    """Ctrl-C the sweep once ``after`` trials are journaled; resume; count what ran again."""
    # SIGINT back to its default in the child: a background job inherits it ignored (no Ctrl-C at all).
    proc = subprocess.Popen(sweep_cmd(out, "--address", address), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    journal = out / "journal.jsonl"
    while proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= after:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    code = proc.wait(timeout=120)
    stop_s = time.perf_counter() - t0
    before = [json.loads(x)["id"] for x in journal.read_text().splitlines() if x.strip()]
    d, wall, rc = run_sweep(out, "--address", address)
    lines = [json.loads(x)["id"] for x in journal.read_text().splitlines() if x.strip()]
    return {"exit_code_on_interrupt": code, "stop_seconds": round(stop_s, 1), "journaled_before": len(before),
            "resumed": d["trials_resumed"], "ran_after_resume": len(lines) - len(before),
            "rerun_of_done_trials": len(set(before) & set(lines[len(before):])), "resume_wall_seconds": round(wall, 1),
            "sweep": d}


def table_key(d: dict[str, Any]) -> dict[str, Any]:
    return {t["id"]: {k: (t.get("metrics") or {}).get(k) for k in SAME} | {"status": t["status"]} for t in d["trials"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-sweep")
    ap.add_argument("--out", type=Path, default=RESULTS / "sweep.json")
    ap.add_argument("--cluster", action="store_true", help="also a `ray start --head` cluster: --address, Ctrl-C, resume")
    ap.add_argument("--no-sequential", action="store_true")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    doc: dict[str, Any] = {"when": utc_now(), "machine": machine_line(machine_info(None)), "recipe": str(RECIPE.relative_to(ROOT)),
                           "grid": GRID, "seeds": SEEDS, "command": " ".join(sweep_cmd(Path("OUT")))}

    log("sweep on a local Ray (this machine's cores) ...")
    local, wall, rc = run_sweep(args.work / "local")
    doc["local"] = {"wall_seconds": round(wall, 1), "exit_code": rc, "counts": local["counts"],
                    "stage_runs": local["stage_runs"], "trial_seconds_sum": local["trial_seconds_sum"],
                    "pick": local["pick"], "pareto": local["pareto"]}
    log(f"sweep: {wall:.1f} s, {local['counts']}, stages {local['stage_runs']}")

    if not args.no_sequential:
        log("the same trials one after another in one process ...")
        seq = sequential(args.work / "sequential")
        doc["sequential_seconds"] = round(seq, 1)
        doc["ratio_sequential_over_sweep"] = round(seq / wall, 2)
        log(f"sequential: {seq:.1f} s (ratio {seq / wall:.2f})")

    pick = local["pick"]
    if pick is not None:
        log("dqnc run best.yaml ...")
        proc = subprocess.run([*dqnc_command(), "run", str(args.work / "local" / "best.yaml"), "--json", "--quiet"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        rep = json.loads(proc.stdout.splitlines()[-1])
        rows = [r for r in rep["stages"] if "size_bytes" in (r.get("metrics") or {})]
        row = next(t for t in local["trials"] if t["id"] == pick["id"])
        doc["best_yaml"] = {"exit_code": proc.returncode, "trial": pick["id"],
                            "sweep_row": {k: row["metrics"].get(k) for k in SAME},
                            "dqnc_run_row": {k: rows[-1]["metrics"].get(k) for k in SAME}}

    if args.cluster:
        ray = Path(sys.executable).parent / "ray"
        port = "6390"
        log("ray start --head ...")
        subprocess.run([str(ray), "start", "--head", f"--port={port}", f"--num-cpus={os.cpu_count()}",
                        "--include-dashboard=false"], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        try:
            address = f"127.0.0.1:{port}"
            log("sweep against it, Ctrl-C after 4 trials, resume ...")
            res = interrupt_and_resume(args.work / "cluster", address, after=4)
            same = table_key(res["sweep"]) == table_key(local)
            diff = {k: (v, table_key(local).get(k)) for k, v in table_key(res["sweep"]).items() if v != table_key(local).get(k)}
            doc["cluster"] = {k: v for k, v in res.items() if k != "sweep"} | {"same_table_as_local": same,
                                                                             "differences": diff}
        finally:
            subprocess.run([str(ray), "stop"], capture_output=True)
    write_json(args.out, doc)
    md = (args.work / "local" / "sweep.md").read_text()
    print(json.dumps({k: v for k, v in doc.items()}, indent=1, default=str))
    print(md)


if __name__ == "__main__":
    main()
