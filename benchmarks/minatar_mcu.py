"""MinAtar pixel policies on the microcontroller: filter pruning vs conv students, int8, TFLM + policy.c.

    python benchmarks/minatar_mcu.py --parent Breakout=runs/minatar-breakout/source   # one trained fp32 parent
    python benchmarks/minatar_mcu.py --parent Breakout=P1 --parent SpaceInvaders=P2 --shapes 4x32,4x64
    python benchmarks/minatar_mcu.py --parent Breakout=P --episodes 50 --epochs 3 --states 5000   # smoke run

For each game's fp32 parent (a `dqnc train` artifact with MinAtar's default net: one 3x3 conv of 16
filters, 128 units) and each shape FxU in --shapes, in fresh `dqnc` processes:
- "filters": `prune --structure units` keeping F of the 16 filters and U of the 128 units (first-order
  Taylor importance, distillation + DAgger between rounds), then int8;
- "student": `distill --conv [[F,3,1]] --hidden U` (the same shape, trained from scratch by policy
  distillation + DAgger), then int8;
then `export --target mcu` (TFLite Micro against LiteRT on held-out states, the arena, policy.c checked
bit-exact against TFLM) and `eval` of the int8 file on --episodes held-out episodes (seeds 10,000+, never
used by any stage) against the fp32 parent: return, share of the parent's return with its paired 95% CI,
decisive agreement, regret, bytes. Compression wall time is the sum of the stages' processes. With
--verify-mcu the bundle's policy.c also runs on the emulated Cortex-M4 (flash, RAM, instructions per action).
Writes benchmarks/results/minatar_mcu.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, dqnc_command, finish, fmt, log, md_table, run_json


def stage(cmd: list[str]) -> tuple[str | None, float]:
    """Run a stage; (None or the refusal line of a gate, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode == 1:
        return (proc.stderr.strip().splitlines() or ["refused (exit 1)"])[-1], wall
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return None, wall


def chain(game: str, kind: str, shape: tuple[int, int], parent: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    dqnc = dqnc_command()
    f, u = shape
    d = work / game.lower() / f"{kind}-{f}x{u}"
    filters = parent_filters(parent)
    common = ["--epochs", str(args.epochs), "--states", str(args.states)] if kind == "filters" else \
        ["--states", str(args.states), "--steps", str(args.steps)]
    if kind == "filters":
        first = ["prune", str(parent), "--structure", "units", "--layer-sparsity", f"conv_0={1 - f / filters[0]:.6f}",
                 "--layer-sparsity", f"dense_0={1 - u / parent_units(parent)[0]:.6f}", *common]
    else:
        first = ["distill", str(parent), "--conv", f"[[{f}, 3, 1]]", "--hidden", str(u), *common]
    record: dict[str, Any] = {"game": game, "kind": kind, "filters": f, "units": u, "commands": []}
    wall = 0.0
    done = d / "record.json"
    if args.reuse and done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    for name, cmd in (("fp32", first), ("int8", ["quantize", str(d / "fp32")]),
                      ("bundle", ["export", str(d / "int8"), "--target", "mcu"])):
        full = [*dqnc, *cmd, "-o", str(d / name), "--force", "--quiet"]
        record["commands"].append(" ".join(["dqnc", *cmd]))
        if args.reuse and (d / name / "manifest.json").is_file():
            log(f"{game} {kind} {f}x{u}: {name} reused (its time is not counted)")
            record["reused"] = True
            continue
        why, seconds = stage(full)
        wall += seconds
        log(f"{game} {kind} {f}x{u}: {name} in {seconds:.0f} s" + (f" - refused: {why}" if why else ""))
        if why:
            record["refused"] = {"stage": name, "why": why}
            record["compress_seconds"] = round(wall, 1)
            return record
    record["compress_seconds"] = round(wall, 1)
    record["bundle"] = json.loads((d / "bundle" / "manifest.json").read_text(encoding="utf-8"))["metrics"]
    record["eval"] = run_json([*dqnc, "eval", str(d / "int8"), "-n", str(args.episodes), "--reference", str(parent),
                               "--runtime", "litert", "--json", "--quiet"])
    if args.verify_mcu:  # the bundle's policy.c on the emulated Cortex-M4 (a separate export: timing apart)
        record["mcu"] = run_json([*dqnc, "export", str(d / "int8"), "--target", "mcu", "-o", str(d / "bundle-m4"),
                                  "--verify-mcu", "--force", "--json", "--quiet"])["mcu"]
    done.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def parent_filters(parent: Path) -> list[int]:
    net = json.loads((parent / "manifest.json").read_text(encoding="utf-8"))["network"]
    return [int(c[0]) for c in net["conv"]]


def parent_units(parent: Path) -> list[int]:
    return [int(h) for h in json.loads((parent / "manifest.json").read_text(encoding="utf-8"))["network"]["hidden"]]


def fidelity(e: dict[str, Any]) -> dict[str, Any]:
    """The comparison with the reference from `eval --json` (at its top level; under "reference" before 0.4)."""
    return {**e, **(e.get("reference") or {}), "mean_return": e["mean_return"],
            "reference_return": (e.get("reference") or {}).get("mean_return")}


def markdown(doc: dict[str, Any]) -> str:
    rows = []
    for r in doc["runs"]:
        shape = f"{r['filters']} filters, {r['units']} units"
        if "refused" in r:
            rows.append([r["game"], r["kind"], shape, f"refused at {r['refused']['stage']}: {r['refused']['why']}",
                         "-", "-", "-", "-", "-", fmt(r["compress_seconds"], ".0f")])
            continue
        e, b = r["eval"], r["bundle"]
        ref = fidelity(e)
        lo, hi = ref["return_drop_frac_ci95"]
        c = b.get("c_policy") or {}
        mcu = r.get("mcu") or {}
        rows.append([r["game"], r["kind"], shape, f"{e['mean_return']:.2f} (fp32 {ref['reference_return']:.2f})",
                     f"{100 * (1 - ref['return_drop_frac']):.1f}% ({100 * (1 - hi):.1f}..{100 * (1 - lo):.1f}%)",
                     f"{100 * ref['decisive_agreement']:.1f}%", f"{e['size_bytes']:,}",
                     f"{b['tflm_arena_bytes']['total']:,}",
                     (f"bit-exact on {c['states']:,} states" if c.get("host_verified") else "not checked (no host compiler)")
                     + (f"; M4: {mcu['actions_equal']}/{mcu['vectors']} = TFLM, {mcu['flash_bytes']:,} B flash, "
                        f"{mcu['ram_bytes']:,} B RAM, {mcu['instructions_per_action']:,.0f} instr/action" if mcu else "")
                     if c.get("written") else c.get("reason", "-"),
                     "reused" if r.get("reused") else fmt(r["compress_seconds"], ".0f")])
    return md_table(["game", "method", "shape", f"int8 return over {doc['episodes']:,} held-out episodes",
                     "share of fp32 (paired 95% CI)", "decisive agreement", ".tflite bytes", "TFLM arena B",
                     "policy.c vs TFLM", "compress wall s"], rows, text_columns=3) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", action="append", required=True, help="GAME=PATH of a trained fp32 parent (repeatable)")
    ap.add_argument("--shapes", default="4x32,4x64", help="filters x units to compress to, comma-separated")
    ap.add_argument("--methods", default="filters,student")
    ap.add_argument("--episodes", type=int, default=1000, help="held-out episodes (seeds 10,000+)")
    ap.add_argument("--epochs", type=int, default=30, help="prune: distillation epochs")
    ap.add_argument("--states", type=int, default=60_000, help="teacher rollout states to distill on")
    ap.add_argument("--steps", type=int, default=20_000, help="distill: minibatch steps on the teacher's states")
    ap.add_argument("--verify-mcu", action="store_true", help="run each bundle's policy.c on the emulated Cortex-M4")
    ap.add_argument("--work", type=Path, default=RESULTS / "minatar-mcu-runs")
    ap.add_argument("--reuse", action="store_true", help="keep chains already finished in --work (their record.json)")
    ap.add_argument("--out", type=Path, default=RESULTS / "minatar_mcu.json")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    runs = []
    for item in args.parent:
        game, _, path = item.partition("=")
        for shape in shapes:
            for kind in args.methods.split(","):
                runs.append(chain(game, kind, shape, Path(path).resolve(), args.work, args))  # type: ignore[arg-type]
    doc = {"episodes": args.episodes, "epochs": args.epochs, "states": args.states, "steps": args.steps, "runs": runs}
    finish(doc, args.out, markdown)


if __name__ == "__main__":
    main()
