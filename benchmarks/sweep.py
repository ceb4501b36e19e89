"""`dqnc sweep` on CartPole: parallel on Ray vs the same trials one after another, cache hits, the
front, interrupt + resume, best.yaml reproduced, and a separately started Ray cluster.

Run from the repository root with dqnc's python (2 cores: ~10 minutes):

    python benchmarks/sweep.py                          # local Ray, sequential baseline, best.yaml
    python benchmarks/sweep.py --parts cluster          # `ray start --head`, --address, Ctrl-C, resume

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


def run_sweep(out: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(sweep_cmd(out, *extra), capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
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


def interrupt_and_resume(out: Path, address: str, after: int, env: dict[str, str]) -> dict[str, Any]:
    """Ctrl-C the sweep once ``after`` trials are journaled; resume; count what ran again."""
    # SIGINT back to its default in the child: a background job inherits it ignored (no Ctrl-C at all).
    proc = subprocess.Popen(sweep_cmd(out, "--address", address), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    journal = out / "journal.jsonl"
    while proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= after:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    err = proc.communicate(timeout=120)[1]
    code = proc.returncode
    stop_s = time.perf_counter() - t0
    if not journal.is_file():
        raise RuntimeError(f"the sweep against {address} exited {code} before any trial finished:\n{err[-2000:]}")
    before = [json.loads(x)["id"] for x in journal.read_text().splitlines() if x.strip()]
    d, wall, rc = run_sweep(out, "--address", address, env=env)
    lines = [json.loads(x)["id"] for x in journal.read_text().splitlines() if x.strip()]
    return {"exit_code_on_interrupt": code, "stop_seconds": round(stop_s, 1), "journaled_before": len(before),
            "resumed": d["trials_resumed"], "ran_after_resume": len(lines) - len(before),
            "rerun_of_done_trials": len(set(before) & set(lines[len(before):])), "resume_wall_seconds": round(wall, 1),
            "sweep": d}


def table_key(d: dict[str, Any]) -> dict[str, Any]:
    return {t["id"]: {k: (t.get("metrics") or {}).get(k) for k in SAME} | {"status": t["status"]} for t in d["trials"]}


PARTS = ("local", "sequential", "best", "cluster")


def start_cluster(port: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """`ray start --head --block` on this machine with a token made for it (Ray >= 2.59 requires
    token auth on local clusters); stopped by terminating this one process."""
    import secrets

    ray = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", f"--port={port}", f"--num-cpus={os.cpu_count()}",
                             "--include-dashboard=false"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while subprocess.run([str(ray), "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True).returncode:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("the Ray cluster did not come up")
        time.sleep(2)
    return proc, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-sweep")
    ap.add_argument("--out", type=Path, default=RESULTS / "sweep.json")
    ap.add_argument("--parts", default="local,sequential,best",
                    help=f"comma-separated, of {','.join(PARTS)} (cluster: `ray start --head`, --address, Ctrl-C, resume); "
                    "later parts reuse the local sweep of an earlier run")
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    doc: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update({"when": utc_now(), "machine": machine_line(machine_info(None)), "recipe": str(RECIPE.relative_to(ROOT)),
                "grid": GRID, "seeds": SEEDS, "command": " ".join(sweep_cmd(Path("OUT")))})

    if "local" in parts:
        shutil.rmtree(args.work / "local", ignore_errors=True)
        log("sweep on a local Ray (this machine's cores) ...")
        local, wall, rc = run_sweep(args.work / "local")
        doc["local"] = {"wall_seconds": round(wall, 1), "exit_code": rc, "counts": local["counts"],
                        "stage_runs": local["stage_runs"], "trial_seconds_sum": local["trial_seconds_sum"],
                        "pick": local["pick"], "pareto": local["pareto"]}
        log(f"sweep: {wall:.1f} s, {local['counts']}, stages {local['stage_runs']}")
        write_json(args.out, doc)
    local = json.loads((args.work / "local" / "sweep.json").read_text())
    doc.setdefault("local", {"wall_seconds": local["wall_seconds"], "counts": local["counts"],
                             "stage_runs": local["stage_runs"], "trial_seconds_sum": local["trial_seconds_sum"],
                             "pick": local["pick"], "pareto": local["pareto"]})

    if "sequential" in parts:
        shutil.rmtree(args.work / "sequential", ignore_errors=True)
        log("the same trials one after another in one process ...")
        seq = sequential(args.work / "sequential")
        doc["sequential_seconds"] = round(seq, 1)
        doc["ratio_sequential_over_sweep"] = round(seq / doc["local"]["wall_seconds"], 2)
        log(f"sequential: {seq:.1f} s (ratio {doc['ratio_sequential_over_sweep']:.2f})")
        write_json(args.out, doc)

    pick = local["pick"]
    if "best" in parts and pick is not None:
        log("dqnc run best.yaml ...")
        shutil.rmtree(args.work / "local" / "best", ignore_errors=True)
        proc = subprocess.run([*dqnc_command(), "run", str(args.work / "local" / "best.yaml"), "--json", "--quiet"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        rep = json.loads(proc.stdout.splitlines()[-1])
        rows = [r for r in rep["stages"] if "size_bytes" in (r.get("metrics") or {})]
        row = next(t for t in local["trials"] if t["id"] == pick["id"])
        mine, theirs = {k: row["metrics"].get(k) for k in SAME}, {k: rows[-1]["metrics"].get(k) for k in SAME}
        doc["best_yaml"] = {"exit_code": proc.returncode, "trial": pick["id"], "same_row": mine == theirs,
                            "sweep_row": mine, "dqnc_run_row": theirs}
        log(f"best.yaml: exit {proc.returncode}, same row: {mine == theirs}")
        write_json(args.out, doc)

    if "cluster" in parts:
        shutil.rmtree(args.work / "cluster", ignore_errors=True)
        port = "6390"
        log("ray start --head --block ...")
        cluster, env = start_cluster(port)
        try:
            log("sweep against it with --address, Ctrl-C after 4 trials, resume ...")
            res = interrupt_and_resume(args.work / "cluster", f"127.0.0.1:{port}", 4, env)
        finally:
            cluster.terminate()
            try:
                cluster.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cluster.kill()
        a, b = table_key(res["sweep"]), table_key(local)
        doc["cluster"] = {k: v for k, v in res.items() if k != "sweep"} | {
            "same_table_as_local": a == b, "differences": {k: [v, b.get(k)] for k, v in a.items() if v != b.get(k)}}
        log(f"cluster: {doc['cluster']}")
        write_json(args.out, doc)
    print(json.dumps(doc, indent=1, default=str))
    print((args.work / "local" / "sweep.md").read_text())


if __name__ == "__main__":
    main()
