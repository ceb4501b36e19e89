"""Atari Breakout on a small budget: recipes/atari-breakout.yaml end to end, then the figures of
BENCHMARKS.md "Atari Breakout" (run with dqnc's python; needs the atari extra).

    python benchmarks/atari.py                      # 25k agent steps (BENCHMARKS.md: --steps 50000)
    python benchmarks/atari.py --steps 50000        # a larger small budget
    python benchmarks/atari.py --skip-run           # re-measure the outputs of an earlier run
    python benchmarks/atari.py --speed 8000         # training speed of the 10M-frame recipe's schedule

1. `dqnc run recipes/atari-breakout.yaml --force --set ...` with the small-budget overrides below
   (train -> int8 -> export --target mcu, TFLM verified -> held-out greedy eval), in a child
   process whose wall and CPU seconds are measured.
2. Agreement of the int8 model (and of the fp32 TFLite file) with its fp32 parent on 10,000
   held-out states: visited by the parent, epsilon 0.05 (the Nature DQN evaluation's epsilon; a
   barely trained greedy Breakout policy that never presses FIRE idles until its episode cap),
   from the held-out episode seeds 10,000+ that no stage rolls out from (dqnc.seeds).
3. Sizes (int8 vs an fp32 TFLite conversion of the same parent) and per-action latency of the
   84x84x4 network: LiteRT int8 and fp32, the numpy forward, and TFLite Micro's reference kernels
   on the int8 file (its arena, and its actions against LiteRT's on 1,000 of the states).

Writes benchmarks/results/atari.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import RESULTS, ROOT, dqnc_command, log, utc_now, write_json

RECIPE = ROOT / "recipes" / "atari-breakout.yaml"
# Episodes are capped at 10,000 frames (2,500 agent steps) so that an idle greedy policy cannot
# stall evaluation for the ALE's 108,000 frames.
CAP_FRAMES = 10_000


def small_budget_sets(steps: int, out_dir: Path) -> list[str]:
    """The --set overrides that turn the 10M-frame recipe into the small-budget run."""
    wrappers = ("[{AtariPreprocessing: {frame_skip: 4, screen_size: 84, noop_max: 30, grayscale_obs: true, "
                "terminal_on_life_loss: false, scale_obs: false}}, {FrameStackObservation: {stack_size: 4}}]")
    return [
        f"out_dir={out_dir}",
        f"source.train.total_steps={steps}",
        f"source.train.learning_starts={min(5000, steps // 5)}",
        f"source.train.buffer_size={steps}",          # every transition: 50k = 2.8 GB
        "source.train.gradient_steps=8",              # one gradient step per 8 agent steps
        "source.train.eps_fraction=0.4",
        f"source.train.eval_freq={steps}",
        "source.train.eval_episodes=4",
        f"source.train.env_kwargs={{frameskip: 1, max_num_frames_per_episode: {CAP_FRAMES}, wrappers: {wrappers}}}",
        "int8.calibration_states=2000",
        "int8.check_states=2000",
        "int8.check_episodes=4",
        "bundle.check_states=1000",
        "eval.episodes=8",
        "eval.latency_samples=500",
        # A barely trained policy's return is near 0, so a relative return drop means nothing here.
        "gates.max_return_drop=null",
        "gates.min_decisive_agreement=null",
    ]


def run_chain(steps: int, out_dir: Path, cached: bool = False) -> dict[str, Any]:
    cmd = [*dqnc_command(), "run", str(RECIPE), "--json", "--quiet", *([] if cached else ["--force"])]
    for s in small_budget_sets(steps, out_dir):
        cmd += ["--set", s]
    log(" ".join(cmd))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode not in (0, 1) or not lines:
        raise SystemExit(f"dqnc run: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1])
    return {"command": cmd, "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
            "cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "report": report}


def speed(steps: int, out_dir: Path) -> dict[str, Any]:
    """Training speed with the recipe's own (default) Atari schedule, for the 10M-frame estimate:
    agent steps/s and CPU seconds per agent step once learning has started."""
    from dqnc import train
    from dqnc.config import build_train_config

    marks: list[tuple[int, float, float]] = []

    def progress(p: Any) -> None:
        marks.append((p.step, time.perf_counter(), time.process_time()))

    warmup = steps // 4
    cfg = build_train_config("ALE/Breakout-v5", {}, dict(
        total_steps=steps, learning_starts=warmup, buffer_size=steps, eval_freq=10 * steps, eval_episodes=1,
        env_kwargs={"max_num_frames_per_episode": 2000}))
    train.run(cfg, out_dir / "speed", force=True, progress=progress)
    learn = [m for m in marks if m[0] >= warmup + cfg.train_freq]
    (s0, w0, c0), (s1, w1, c1) = learn[0], learn[-1]
    per_s = (s1 - s0) / (w1 - w0)
    cpu_per_step = (c1 - c0) / (s1 - s0)
    total = 2_500_000
    return {"config": {k: getattr(cfg, k) for k in ("num_envs", "batch_size", "train_freq", "gradient_steps")},
            "measured_steps": s1 - s0, "steps_per_second": round(per_s, 1),
            "cpu_ms_per_agent_step": round(1000 * cpu_per_step, 2),
            "hours_for_10M_frames": {"wall_at_measured_rate": round(total / per_s / 3600, 1),
                                     "cpu": round(total * cpu_per_step / 3600, 1)}}


def _chunked(q_fn: Any, states: np.ndarray, chunk: int = 500) -> np.ndarray:
    return np.concatenate([np.asarray(q_fn(states[i:i + chunk])) for i in range(0, len(states), chunk)])


def _latency(q_fn: Any, states: np.ndarray, samples: int) -> dict[str, float]:
    from dqnc.evaluate import latency_us

    return latency_us(q_fn, states, samples)["action"]


def measure(out_dir: Path, n_states: int, latency_samples: int) -> dict[str, Any]:
    from dqnc import artifact as art
    from dqnc import quantize
    from dqnc.envs import collect_states
    from dqnc.fidelity import actions_of, fidelity
    from dqnc.policy import load_keras_model, q_function
    from dqnc.runtime import Policy
    from dqnc.seeds import EVAL_SEED, purpose_of

    parent = art.load(out_dir / "train")
    int8 = art.load(out_dir / "int8")
    bundle = art.load(out_dir / "bundle")
    from dqnc import tflm
    q_parent = q_function(parent)
    log(f"collecting {n_states:,} held-out states (parent, epsilon 0.05, episode seeds {EVAL_SEED:,}+)")
    t0 = time.perf_counter()
    states = collect_states(q_parent, parent.env, n_states, EVAL_SEED, epsilon=0.05)
    collect_s = time.perf_counter() - t0
    q_ref = _chunked(q_parent, states)
    lite8 = q_function(int8, runtime="litert")
    fp32_bytes = quantize.convert(load_keras_model(parent.model_path), "fp32")
    lite32 = Policy(model_content=fp32_bytes)
    out: dict[str, Any] = {
        "states": {"count": int(len(states)), "seed": EVAL_SEED, "seed_range": purpose_of(EVAL_SEED), "epsilon": 0.05,
                   "collect_seconds": round(collect_s, 1),
                   "parent_action_share": (np.bincount(actions_of(q_ref), minlength=parent.env.n_actions)
                                           / len(q_ref)).round(4).tolist(),
                   "action_meanings": parent.env.action_meanings},
        "int8_vs_parent": fidelity(q_ref, actions_of(_chunked(lite8, states))),
        "fp32_tflite_vs_parent": fidelity(q_ref, actions_of(_chunked(lite32, states))),
        "params": int(sum(w.size + b.size for w, b in q_parent.layers)),
        "sizes": {"int8_tflite_bytes": int8.model_path.stat().st_size, "fp32_tflite_bytes": len(fp32_bytes),
                  "savedmodel_bytes": sum(f.stat().st_size for f in parent.model_path.rglob("*") if f.is_file()),
                  "bundle_target": bundle.manifest["metrics"].get("target"),
                  "tflm_arena": tflm.arena(int8.model_path.read_bytes())},
    }
    out["sizes"]["int8_vs_fp32"] = round(out["sizes"]["fp32_tflite_bytes"] / out["sizes"]["int8_tflite_bytes"], 2)
    log("latency per action")
    out["latency_us"] = {
        "int8_litert": _latency(lite8, states, latency_samples),
        "fp32_tflite_litert": _latency(lite32, states, latency_samples),
        "fp32_numpy": _latency(q_parent, states, latency_samples),
        "int8_tflm": _latency(q_function(int8, runtime="tflm"), states, max(20, latency_samples // 10)),
    }
    # TFLite Micro's reference kernels against LiteRT on the same int8 file (what export --target
    # mcu checks, with its 1% allowance for near-ties); 1,000 of the states (~11 ms each).
    sub = states[:: max(1, len(states) // 1000)][:1000]
    a_tflm = actions_of(_chunked(q_function(int8, runtime="tflm"), sub))
    a_lite = actions_of(_chunked(lite8, sub))
    out["tflm_vs_litert"] = {"states": int(len(sub)), "actions_equal": int((a_tflm == a_lite).sum())}
    return out


def markdown(doc: dict[str, Any]) -> str:
    m = doc["measured"]
    s, lat, i8, f32 = m["sizes"], m["latency_us"], m["int8_vs_parent"], m["fp32_tflite_vs_parent"]
    rows = [
        "| model | file bytes | agreement vs fp32 parent (all / decisive) | regret | latency p50 per action |",
        "|---|---:|---|---:|---|",
        f"| fp32 (numpy forward) | {s['savedmodel_bytes']:,} (SavedModel) | - | - | {lat['fp32_numpy']['p50']:.0f} us |",
        f"| fp32 TFLite | {s['fp32_tflite_bytes']:,} | {100 * f32['agreement']:.2f}% / {100 * f32['decisive_agreement']:.2f}% "
        f"| {f32['regret']:.4f} | {lat['fp32_tflite_litert']['p50']:.0f} us LiteRT |",
        f"| int8 (per-channel conv) | {s['int8_tflite_bytes']:,} | {100 * i8['agreement']:.2f}% / "
        f"{100 * i8['decisive_agreement']:.2f}% of {i8['decisive_states']:,} | {i8['regret']:.4f} "
        f"| {lat['int8_litert']['p50']:.0f} us LiteRT |",
        f"| int8 on TFLM (host, reference kernels) | {s['int8_tflite_bytes']:,}; arena "
        f"{s['tflm_arena']['shipped']:,} | {m['tflm_vs_litert']['actions_equal']:,} of {m['tflm_vs_litert']['states']:,} "
        f"actions equal LiteRT's | - | {lat['int8_tflm']['p50']:.0f} us TFLM |",
    ]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25_000, help="agent steps of training")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "atari-breakout-small")
    p.add_argument("--states", type=int, default=10_000, help="held-out states for the agreement")
    p.add_argument("--latency-samples", type=int, default=500)
    p.add_argument("--skip-run", action="store_true", help="measure the outputs of an earlier run")
    p.add_argument("--cached", action="store_true", help="re-use the recipe's cached stages (no --force)")
    p.add_argument("--speed", type=int, metavar="STEPS", help="only measure training speed with the recipe's "
                   "Atari defaults over STEPS agent steps (a quarter of them before learning starts)")
    args = p.parse_args()
    out_dir = args.out_dir.resolve()
    if args.speed:
        doc_speed = {"date": utc_now(), **speed(args.speed, out_dir)}
        write_json(RESULTS / "atari-speed.json", doc_speed)
        print(json.dumps(doc_speed, indent=2))
        return
    doc: dict[str, Any] = {"date": utc_now(), "steps": args.steps, "out_dir": str(out_dir)}
    if not args.skip_run:
        doc["chain"] = run_chain(args.steps, out_dir, args.cached)
        log(f"chain: exit {doc['chain']['exit_code']}, {doc['chain']['wall_seconds']} s wall, "
            f"{doc['chain']['cpu_seconds']} CPU s")
    train_manifest = json.loads((out_dir / "train" / "manifest.json").read_text())
    doc["train_metrics"] = {k: train_manifest["metrics"].get(k) for k in (
        "env_steps", "gradient_steps", "episodes", "train_seconds", "steps_per_second", "best_eval_mean_return",
        "mean_return_last_100_train_episodes")}
    t0, c0 = time.perf_counter(), time.process_time()
    doc["measured"] = measure(out_dir, args.states, args.latency_samples)
    doc["measure_seconds"] = {"wall": round(time.perf_counter() - t0, 1), "cpu": round(time.process_time() - c0, 1)}
    write_json(RESULTS / "atari.json", doc)
    print(markdown(doc))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
