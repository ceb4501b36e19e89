"""The main job's policy in ONNX Runtime next to LiteRT (issue 25): runtime, bytes, per-action
latency, agreement, regret and return.

    python benchmarks/onnx_rows.py                   # runs recipes/cartpole.yaml first (cached)
    python benchmarks/onnx_rows.py --episodes 100 --rounds 9 --calls 2000

The recipe's int8 stage is exported again with ``--onnx`` (the same bundle plus model.onnx, QDQ
int8, checked in ONNX Runtime against LiteRT on 10,000 held-out states at export). Each runtime
then plays the same ``--episodes`` greedy episodes (the eval stage's seeds) with the 16x16 fp32
student as the reference: agreement and regret over every visited state, return with its 95% CI.
Latency is per action (float observation in, action out, input quantization included) and per
invoke (the runtime's call alone), timed in interleaved rounds on held-out states; the table
gives the mean of the round p50s with a 95% CI. Writes benchmarks/results/onnx_rows.json and
prints Markdown.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ROOT, dqnc_command, finish, log, md_table

from dqnc import artifact as art
from dqnc.config import EvalConfig
from dqnc.envs import collect_states
from dqnc.evaluate import latency_us
from dqnc.evaluate import run as evaluate
from dqnc.fidelity import mean_ci95
from dqnc.policy import runtime_q_function
from dqnc.seeds import EVAL_SEED

WORK = ROOT / "runs" / "onnx-rows"
RUNTIMES = ("litert", "onnxruntime")


def dqnc(*args: str) -> None:
    subprocess.run([*dqnc_command(), *args], check=True, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def build() -> tuple[Path, Path]:
    """The recipe's student and a bundle of its int8 stage with model.onnx."""
    recipe = WORK / "cartpole.yaml"
    WORK.mkdir(parents=True, exist_ok=True)
    text = (ROOT / "recipes" / "cartpole.yaml").read_text(encoding="utf-8")
    text = text.replace("../sample_models", str(ROOT / "sample_models")).replace("out_dir: ../runs/cartpole",
                                                                                  f"out_dir: {WORK / 'recipe'}")
    recipe.write_text(text, encoding="utf-8")
    log("dqnc run recipes/cartpole.yaml (cached stages are reused)")
    dqnc("run", str(recipe), "--quiet")
    bundle = WORK / "bundle-onnx"
    log("dqnc export int8 --onnx")
    dqnc("export", str(WORK / "recipe" / "int8"), "-o", str(bundle), "--onnx", "--force")
    return WORK / "recipe" / "student", bundle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS / "onnx_rows.json")
    args = ap.parse_args(argv)
    student, bundle = build()
    source, reference = art.load(bundle), art.load(student)
    files = {"litert": bundle / art.TFLITE, "onnxruntime": bundle / "model.onnx"}
    rows: dict[str, dict[str, Any]] = {}
    for rt in RUNTIMES:
        log(f"eval --runtime {rt}: {args.episodes} episodes against the fp32 student")
        res = evaluate(EvalConfig(runtime=rt, episodes=args.episodes, latency_samples=0), source, reference)
        ref = res["reference"]
        rows[rt] = {"bytes": files[rt].stat().st_size, "mean_return": res["mean_return"],
                    "return_ci95": res["return_ci95"], "agreement": ref["agreement"], "regret": ref["regret"],
                    "decisive_agreement": ref["decisive_agreement"], "states": ref["states"]}
    fns = {rt: runtime_q_function(source, rt) for rt in RUNTIMES}
    states = collect_states(fns["litert"], source.env, args.calls, EVAL_SEED + 10_000, 0.0)
    act: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    inv: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    order, rng = list(RUNTIMES), random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for rt in order:
            lat = latency_us(fns[rt], states, args.calls)
            act[rt].append(lat["action"]["p50"])
            inv[rt].append(lat["invoke"]["p50"])
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{rt} {act[rt][-1]:.2f} us" for rt in RUNTIMES))
    for rt in RUNTIMES:
        rows[rt]["act_p50_us"], rows[rt]["invoke_p50_us"] = mean_ci(act[rt]), mean_ci(inv[rt])
    check = source.manifest["metrics"]["onnx"]["check"]
    doc = {"bundle": str(bundle), "reference": str(student), "episodes": args.episodes, "rounds": args.rounds,
           "calls_per_round": args.calls, "export_check": check, "runtimes": rows}
    return finish(doc, args.out, markdown)


def markdown(d: dict[str, Any]) -> str:
    def ci(m: dict[str, Any]) -> str:
        return f"{m['mean']:.2f} ({m['ci95'][0]:.2f}..{m['ci95'][1]:.2f})"

    table = md_table(["runtime", "file bytes", "per action p50, us", "invoke p50, us", "agreement", "regret",
                      "return (95% CI)"],
                     [[rt, f"{v['bytes']:,}", ci(v["act_p50_us"]), ci(v["invoke_p50_us"]), f"{100 * v['agreement']:.2f}%",
                       f"{v['regret']:.4f}", f"{v['mean_return']:.1f} ({v['return_ci95'][0]:.1f}..{v['return_ci95'][1]:.1f})"]
                      for rt, v in d["runtimes"].items()])
    c = d["export_check"]
    return (f"{table}\n\nagreement/regret: over every state of {d['episodes']} episodes, against the fp32 16x16 student. "
            f"Export check: ONNX Runtime chose LiteRT's action on {c['actions_equal']:,} of {c['states']:,} held-out "
            f"states ({c.get('int_output_differences', 0)} int8 outputs differ, at most "
            f"{c.get('int_output_max_difference', 0)} step).")


def mean_ci(values: list[float]) -> dict[str, Any]:
    mean, lo, hi = mean_ci95(np.asarray(values))
    return {"mean": mean, "ci95": [lo, hi]}


if __name__ == "__main__":
    sys.exit(main())
