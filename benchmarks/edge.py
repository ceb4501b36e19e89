"""Edge figures for recipes: TFLM verification, arena and flash, the C policy, the emulated
Cortex-M4, the return through each runtime, and the sparse --target linux bundle beside it.

Run with dqnc's python (from the repository root):

    python benchmarks/edge.py                          # README's main job (recipes/cartpole.yaml)
    python benchmarks/edge.py recipes/*.yaml           # every shipped recipe (trains those that train)
    python benchmarks/edge.py --episodes 20 --vectors 200   # a short run

For each recipe: ``dqnc run`` (cached stages are reused), then from the recipe's export bundle
(target mcu): the manifest's TFLM check (actions equal to LiteRT's of N), arena and flash; the C
policy re-checked against TFLM on the bundle's model; the C policy bare-metal on QEMU's Cortex-M4
(``dqnc.mcu.verify_bundle``: arm-none-eabi-size sections, actions, instructions per action from
``-icount``, a proxy for cycles); the mean return of held-out episodes (seeds from
``dqnc.seeds.EVAL_SEED``) through LiteRT, TFLM and the host-compiled C policy. Then the recipe's
quantize stage is re-run with ``target: linux`` (sparse encoding where >= 30% of the weights are
zero) and exported with ``--target linux``: its size and host latency per action (LiteRT) beside
the mcu bundle's.

Writes benchmarks/results/edge.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stage_dirs(loaded: Any) -> dict[str, tuple[str, Path, Path | None]]:
    """name -> (stage type, output dir, input dir) for every stage of a loaded recipe."""
    out, previous = {}, None
    source = loaded.recipe.source
    if getattr(source, "artifact", None):
        previous = loaded.resolve(source.artifact)
    elif getattr(source, "savedmodel", None):
        previous = loaded.resolve(source.savedmodel)
    else:
        previous = loaded.out_dir / "train"
    for st in loaded.recipe.stages:
        inp = loaded.out_dir / st.input if st.input else previous
        out[st.name] = (st.stage, loaded.out_dir / st.name, inp)
        if st.stage != "eval":
            previous = loaded.out_dir / st.name
    return out


def returns(bundle: Path, episodes: int) -> dict[str, float]:
    from dqnc import artifact as art
    from dqnc.config import EvalConfig
    from dqnc.evaluate import run as run_eval
    from dqnc.seeds import EVAL_SEED

    out = {}
    for rt in ("litert", "tflm", "c"):
        cfg = EvalConfig(episodes=episodes, seed=EVAL_SEED, latency_samples=2000, runtime=rt)
        r = run_eval(cfg, art.load(bundle))
        out[rt] = {"mean_return": r["mean_return"], "latency_p50_us": r["latency_us"]["action"]["p50"]}
    return out


def one_recipe(path: Path, episodes: int, vectors: int, work: Path) -> dict[str, Any]:
    from dqnc import artifact as art
    from dqnc import export, mcu, quantize, recipe
    from dqnc.config import ExportConfig, QuantizeConfig

    loaded = recipe.load(path)
    log(f"{path}: dqnc run (cached stages reused)")
    recipe.run(loaded, log=lambda m: None)
    stages = stage_dirs(loaded)
    bundle = next(d for t, d, _ in stages.values() if t == "export")
    q_name, (_, _, q_input) = next((n, v) for n, v in stages.items() if v[0] == "quantize")
    m = json.loads((bundle / "manifest.json").read_text())
    metrics = m["metrics"]
    row: dict[str, Any] = {"recipe": str(path), "env": m["env"]["id"], "bundle": str(bundle),
                           "tflite_bytes": metrics["size_bytes"], "ops": metrics["ops"],
                           "tflm_compatible": metrics["tflm_compatible"]}
    if metrics["tflm_compatible"]:
        row.update(tflm_check=metrics["tflm_check"], arena=metrics["tflm_arena_bytes"],
                   arena_shipped=metrics["tflm_arena_shipped_bytes"], c_policy=metrics.get("c_policy"))
    if (bundle / "policy.c").is_file():
        missing = mcu.missing_tools()
        if missing:
            row["m4"] = {"skipped": f"missing {', '.join(missing)}"}
        else:
            log(f"{path}: Cortex-M4 on QEMU, {vectors} vectors")
            row["m4"] = mcu.verify_bundle(bundle, n_vectors=vectors)
    log(f"{path}: {episodes} held-out episodes through LiteRT, TFLM, C")
    row["returns"] = returns(bundle, episodes)
    # The sparse linux bundle: the same quantize stage with target linux.
    opts = {k: v for k, v in next(s for s in loaded.recipe.stages if s.name == q_name).model_dump().items()
            if k in QuantizeConfig.model_fields}
    sparse_q = quantize.run(QuantizeConfig(**{**opts, "target": "linux"}), art.load(q_input), work / f"{path.stem}-q-linux",
                            force=True)
    sparse_b = export.run(ExportConfig(target="linux"), sparse_q, work / f"{path.stem}-bundle-linux", force=True)
    from dqnc.config import EvalConfig
    from dqnc.evaluate import run as run_eval
    from dqnc.seeds import EVAL_SEED

    r = run_eval(EvalConfig(episodes=min(episodes, 20), seed=EVAL_SEED, latency_samples=2000), sparse_b)
    row["linux"] = {"encoding": sparse_q.manifest["metrics"]["sparsity_encoding"],
                    "tflite_bytes": sparse_b.manifest["metrics"]["size_bytes"],
                    "gzip_bytes": sparse_b.manifest["metrics"]["gzip_bytes"],
                    "latency_p50_us": r["latency_us"]["action"]["p50"], "mean_return": r["mean_return"],
                    "episodes": min(episodes, 20)}
    return row


def tables(rows: list[dict[str, Any]]) -> str:
    lines = ["| recipe | .tflite bytes | TFLM actions = LiteRT | arena (measured / shipped) | ops | policy.c const + RAM | "
             "C = TFLM int8 | M4 flash / RAM (policy.o) | M4 actions = TFLM / LiteRT | M4 instructions/action (proxy) | "
             "return LiteRT / TFLM / C |", "|" + "---|" * 11]
    for r in rows:
        c, t, m4 = r.get("c_policy") or {}, r.get("tflm_check") or {}, r.get("m4") or {}
        ret = r["returns"]
        lines.append(
            f"| {Path(r['recipe']).name} | {r['tflite_bytes']:,} | "
            + (f"{t['actions_equal']:,} / {t['states']:,} | {r['arena']['total']:,} / {r['arena_shipped']:,} | " if t else "- | - | ")
            + f"{', '.join(r['ops'])} | "
            + (f"{c['const_data_bytes']:,} + {c['activation_ram_bytes']} | "
               f"{'yes, ' + format(c['states'], ',') + ' states' if c.get('host_verified') else 'not checked'} | "
               if c.get("written") else "- | - | ")
            + (f"{m4['flash_bytes']:,} / {m4['ram_bytes']:,} | {m4['actions_equal']} / {m4['actions_equal_litert']} of "
               f"{m4['vectors']} | {m4['instructions_per_action']:,.0f} | " if "flash_bytes" in m4
               else f"{m4.get('skipped', '-')} | - | - | ")
            + f"{ret['litert']['mean_return']:.1f} / {ret['tflm']['mean_return']:.1f} / {ret['c']['mean_return']:.1f} |")
    lines += ["", "| recipe | mcu bundle (dense) bytes | host p50 us/action (LiteRT) | linux bundle bytes | encoding | "
              "host p50 us/action (LiteRT) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lx = r["linux"]
        lines.append(f"| {Path(r['recipe']).name} | {r['tflite_bytes']:,} | {r['returns']['litert']['latency_p50_us']:.1f} | "
                     f"{lx['tflite_bytes']:,} | {lx['encoding'].split(' (')[0]} | {lx['latency_p50_us']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", type=Path, default=[ROOT / "recipes" / "cartpole.yaml"])
    p.add_argument("--episodes", type=int, default=100, help="held-out episodes per runtime")
    p.add_argument("--vectors", type=int, default=1000, help="test vectors on the emulated Cortex-M4")
    p.add_argument("--work", type=Path, default=HERE / "results" / "edge-work", help="where the linux variants go")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [one_recipe(r, args.episodes, args.vectors, args.work) for r in args.recipes]
    out = HERE / "results" / "edge.json"
    out.write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=2, default=str) + "\n")
    print(tables(rows))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
