"""Ape-X throughput on Ray (issue 26): actor env steps/s, learner updates/s, replay ratio and peak
memory at 1, 2 and 4 actors, against single-process `dqnc train`, on CartPole-v1 and MinAtar
Breakout-v1, each a short fixed budget of env steps.

    .venv/bin/python benchmarks/apex_throughput.py [--steps 30000] [--actors 1,2,4]

Every run is its own process (a fresh Ray, a clean peak RSS). All runs use one replay setting
(prioritized, 3-step returns) and the env's tuned train_freq/gradient_steps/batch, so the replay
ratio is the same with and without actors and only who acts differs. Measured per run:

- env steps/s: env steps over the training loop's wall time (the manifest's train_seconds);
- per actor core: env steps an actor made per CPU-second it used, counted from each actor's first
  delivered chunk (its imports and env start excluded), read from /proc: what one core of acting
  supplies when it is not starved;
- learner updates/s: gradient steps over the wall time spent inside the learner's training calls
  (sampling, the compiled update, priority updates; the first call, which compiles, left out); with actors on the same 2 cores the learner
  shares them, so this is a lower bound of a learner with a core of its own;
- peak RSS (VmHWM) of the driver and the largest actor.

This machine has 2 cores shared with other work: 2 and 4 actors oversubscribe them (4 actors get
4 Ray CPU slots on 2 cores). The load average before each run is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Not this folder on the path: benchmarks/minatar.py would shadow the minatar package (for Ray's workers too).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
from benchmarks._common import RESULTS, fmt, log, md_table, run_json, utc_now, write_json  # noqa: E402

ENVS = ("CartPole-v1", "MinAtar/Breakout-v1")
TICKS = os.sysconf("SC_CLK_TCK")


# --- /proc: the actor processes of this run, their CPU time and peak RSS --------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _actor_pids() -> list[int]:
    """This process's descendants whose title Ray set to the dqnc actor class (``ray::Actor...``)."""
    kids, todo, found = _children(), [os.getpid()], []
    while todo:
        for c in kids.get(todo.pop(), []):
            todo.append(c)
            try:
                if Path(f"/proc/{c}/cmdline").read_bytes().startswith(b"ray::Actor"):
                    found.append(c)
            except OSError:
                pass
    return found


def _cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICKS


def _peak_rss_mb(pid: int | str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class ActorWatch:
    """Samples the actors' CPU time and peak RSS every 0.2 s (they are gone once the run ends)."""

    def __init__(self) -> None:
        self.cpu: dict[int, float] = {}
        self.cpu_at_first_chunk: dict[int, float] | None = None
        self.rss: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def sample(self) -> None:
        for pid in _actor_pids():
            try:
                self.cpu[pid], self.rss[pid] = _cpu_seconds(pid), max(self.rss.get(pid, 0.0), _peak_rss_mb(pid))
            except (OSError, IndexError, ValueError):
                pass

    def loop(self) -> None:
        while not self.stop.wait(0.2):
            self.sample()


# --- one run (a child process) ----------------------------------------------------------------------

def one_run(env: str, actors: int, steps: int) -> dict[str, Any]:
    from dqnc import apex, train
    from dqnc.config import build_train_config

    cfg = build_train_config(env, {}, {"total_steps": steps, "learning_starts": 2000, "eval_freq": steps,
                                       "eval_episodes": 2, "confirm_episodes": 0, "replay": "prioritized",
                                       "n_step": 3, "actors": actors})
    learner = {"seconds": 0.0, "calls": 0}
    learn = apex.learn

    def timed_learn(loop: Any, address: Any, train_step: Any, evaluate: Any, report: Any) -> None:
        def timed_step(*a: Any, **k: Any) -> None:
            t0 = time.perf_counter()
            train_step(*a, **k)
            if learner["calls"]:  # the first call traces and compiles the update
                learner["seconds"] += time.perf_counter() - t0
            learner["calls"] += 1

        learn(loop, address, timed_step, evaluate, report)

    apex.learn = timed_learn  # the learner's own time, without touching the run
    watch = ActorWatch()
    first: dict[str, int] = {}

    def progress(p: Any) -> None:
        if actors and not first:
            watch.sample()
            watch.cpu_at_first_chunk, first["step"] = dict(watch.cpu), p.step

    if actors:
        import ray

        ray.init(address="local", num_cpus=max(2, actors), include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="ERROR")
        watch.thread.start()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        a = train.run(cfg, Path(d) / "m", progress=progress)
    wall = time.perf_counter() - t0
    watch.stop.set()
    m = a.manifest["metrics"]
    row: dict[str, Any] = {
        "env": env, "actors": actors, "env_steps": m["env_steps"], "gradient_steps": m["gradient_steps"],
        "batch_size": cfg.batch_size, "num_envs": cfg.num_envs, "train_freq": cfg.train_freq,
        "train_seconds": m["train_seconds"], "wall_seconds": round(wall, 2), "load_avg_1min_before": load,
        "env_steps_per_s": m["env_steps"] / m["train_seconds"],
        "updates_per_s": m["gradient_steps"] / m["train_seconds"],
        "replay_ratio": m["gradient_steps"] * cfg.batch_size / m["env_steps"],
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "actor_starts": m.get("actor_starts"),
    }
    if actors:
        import ray

        ray.shutdown()
        start = watch.cpu_at_first_chunk or {}
        cpu = sum(c - start.get(pid, 0.0) for pid, c in watch.cpu.items())
        row["actor_cpu_seconds"] = cpu
        row["env_steps_per_actor_cpu_s"] = (m["env_steps"] - first.get("step", 0)) / cpu if cpu > 0 else None
        row["actor_peak_rss_mb"] = max(watch.rss.values()) if watch.rss else None
        timed_updates = (learner["calls"] - 1) * cfg.gradient_steps
        row["learner_updates_per_s"] = timed_updates / learner["seconds"] if learner["seconds"] else None
        row["learner_busy"] = learner["seconds"] / m["train_seconds"]
    return row


# --- the table -------------------------------------------------------------------------------------

def markdown(doc: dict[str, Any]) -> str:
    head = ["env", "acting", "env steps/s", "per actor core", "updates/s", "learner updates/s", "learner busy",
            "replay ratio", "driver RSS MB", "actor RSS MB", "load before"]
    rows = []
    for r in doc["runs"]:
        rows.append([r["env"], f"{r['actors']} actors" if r["actors"] else "single process",
                     fmt(r["env_steps_per_s"], ".0f"), fmt(r.get("env_steps_per_actor_cpu_s"), ".0f"),
                     fmt(r["updates_per_s"], ".0f"), fmt(r.get("learner_updates_per_s"), ".0f"),
                     fmt(r.get("learner_busy"), ".0%"), fmt(r["replay_ratio"], ".1f"),
                     fmt(r["driver_peak_rss_mb"], ".0f"), fmt(r.get("actor_peak_rss_mb"), ".0f"),
                     fmt(r["load_avg_1min_before"], ".1f")])
    return md_table(head, rows, text_columns=2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30000, help="env steps per run")
    p.add_argument("--actors", default="1,2,4", help="actor counts to run besides the single-process baseline")
    p.add_argument("--envs", default=",".join(ENVS))
    p.add_argument("--out", type=Path, default=RESULTS / "apex_throughput.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: env,actors,steps of one run, printed as JSON
    args = p.parse_args()
    if args.one:
        env, actors, steps = args.one.rsplit(",", 2)
        print(json.dumps(one_run(env, int(actors), int(steps))))
        return 0
    doc: dict[str, Any] = {"started_utc": utc_now(), "steps": args.steps, "cpu_count": os.cpu_count(), "runs": []}
    for env in args.envs.split(","):
        for actors in [0] + [int(a) for a in args.actors.split(",")]:
            log(f"{env}: {actors or 'no'} actors, {args.steps} env steps (load {os.getloadavg()[0]:.1f})")
            doc["runs"].append(run_json([sys.executable, __file__, "--one", f"{env},{actors},{args.steps}"],
                                        timeout=900))
            write_json(args.out, doc)  # a partial table survives an interrupted run
    doc["finished_utc"], doc["load_avg_after"] = utc_now(), os.getloadavg()
    write_json(args.out, doc)
    print(markdown(doc))
    print(f"\n{os.cpu_count()} cores; results written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
