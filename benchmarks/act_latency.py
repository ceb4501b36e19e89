"""Per-action host latency of the main job's policy against the fp32 TFLite files (issue 12).

    python benchmarks/act_latency.py                 # runs recipes/cartpole.yaml first (cached)
    python benchmarks/act_latency.py --rounds 15 --calls 2000

"Per action" is what a control loop on a host pays: a float observation in, the greedy action
out (`Policy.act`: input quantization in numpy, set, invoke, get, argmax; `CPolicy.act`: one
ctypes call into the compiled policy.c). "invoke" is the interpreter call alone on an already
quantized input. The forms are timed in interleaved rounds (every form once per round, in a
shuffled order), each round the p50 of ``--calls`` single calls on held-out states; the table
gives the mean of the round p50s with a 95% CI (Student t), and the paired difference of each
form against the parent's fp32 TFLite file, so load that drifts during the run hits all forms.

Forms: the parent's fp32 TFLite file (sample_models/cartpole, 128x128), the 16x16 student's
fp32 TFLite file, the main job's int8 bundle (int8 I/O: LiteRT, and its policy.c), and the same
student quantized with float I/O (the quantization inside the graph).
Writes benchmarks/results/act_latency.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ROOT, SAMPLE_MODEL, dqnc_command, finish, log, md_table

from dqnc import artifact as art
from dqnc.envs import collect_states
from dqnc.evaluate import latency_us
from dqnc.fidelity import mean_ci95
from dqnc.policy import runtime_q_function
from dqnc.seeds import EVAL_SEED

WORK = ROOT / "runs" / "act-latency"


def dqnc(*args: str) -> None:
    subprocess.run([*dqnc_command(), *args, "--quiet"], check=True, cwd=ROOT, stdin=subprocess.DEVNULL)


def build() -> dict[str, tuple[Path, str]]:
    log("dqnc run recipes/cartpole.yaml (cached stages are reused)")
    dqnc("run", "recipes/cartpole.yaml")
    student, bundle = ROOT / "runs/cartpole/student", ROOT / "runs/cartpole/bundle"
    forms = {"parent fp32 TFLite (128x128)": (WORK / "parent-fp32", "litert"),
             "student fp32 TFLite (16x16)": (WORK / "student-fp32", "litert"),
             "student int8, int8 I/O (the bundle), LiteRT": (bundle, "litert"),
             "student int8, int8 I/O (the bundle), policy.c": (bundle, "c"),
             "student int8, float I/O, LiteRT": (WORK / "student-int8-float-io", "litert")}
    for src, name, extra in ((SAMPLE_MODEL, "parent-fp32", ["--mode", "fp32"]),
                             (student, "student-fp32", ["--mode", "fp32"]),
                             (student, "student-int8-float-io", ["--mode", "int8", "--float-io"])):
        if not (WORK / name / art.MANIFEST).is_file():
            log(f"dqnc quantize {src.relative_to(ROOT)} {' '.join(extra)}")
            dqnc("quantize", str(src), "-o", str(WORK / name), *extra, "--force")
    return forms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS / "act_latency.json")
    args = ap.parse_args(argv)
    forms = build()
    parent = art.load(SAMPLE_MODEL)
    from dqnc.policy import q_function

    # Held-out states of the parent's own greedy episodes (the eval stage's default seeds).
    states = collect_states(q_function(parent), parent.env, args.calls, EVAL_SEED, 0.0)
    fns = {name: runtime_q_function(art.load(path), runtime) for name, (path, runtime) in forms.items()}
    sizes = {name: art.load(path).model_path.stat().st_size for name, (path, _) in forms.items()}
    p50: dict[str, list[float]] = {n: [] for n in fns}
    inv: dict[str, list[float]] = {n: [] for n in fns}
    order = list(fns)
    rng = random.Random(0)
    for r in range(args.rounds):
        rng.shuffle(order)
        for name in order:
            lat = latency_us(fns[name], states, args.calls)
            p50[name].append(lat["action"]["p50"])
            if "invoke" in lat:
                inv[name].append(lat["invoke"]["p50"])
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n.split(',')[0][:24]} {p50[n][-1]:.2f}" for n in fns))
    ref = next(iter(fns))
    rows = {}
    for name in fns:
        a = np.asarray(p50[name])
        rows[name] = {"bytes": sizes[name], "runtime": forms[name][1], "act_p50_us": mean_ci(a),
                      "invoke_p50_us": mean_ci(np.asarray(inv[name])) if inv[name] else None,
                      "act_minus_parent_us": mean_ci(a - np.asarray(p50[ref])), "rounds": p50[name]}
    doc = {"rounds": args.rounds, "calls_per_round": args.calls, "states": "held-out, episodes 10,000+",
           "forms": rows}

    def markdown(d: dict[str, Any]) -> str:
        def ci(m: dict[str, Any] | None) -> str:
            return "-" if m is None else f"{m['mean']:.2f} ({m['ci95'][0]:.2f}..{m['ci95'][1]:.2f})"

        return md_table(["form", "bytes", "per action p50, us (95% CI)", "invoke p50, us", "minus parent fp32, us"],
                        [[n, f"{v['bytes']:,}", ci(v["act_p50_us"]), ci(v["invoke_p50_us"]),
                          ci(v["act_minus_parent_us"]) if n != ref else "-"] for n, v in d["forms"].items()])

    return finish(doc, args.out, markdown)


def mean_ci(values: np.ndarray) -> dict[str, Any]:
    mean, lo, hi = mean_ci95(values)
    return {"mean": mean, "ci95": [lo, hi]}


if __name__ == "__main__":
    sys.exit(main())
