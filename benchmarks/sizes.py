"""Model sizes, raw and gzipped, next to the floor of non-zero parameters x bits / 8.

Run with dqnc's python:

    python benchmarks/sizes.py                 # 80/90/95% sparsity
    python benchmarks/sizes.py --quick         # 80% only (the int8-sparse / fp32 ratio)
    python benchmarks/sizes.py --net256 random # 256x256 net with random weights instead of trained

Two CartPole networks: 256x256 (trained briefly with dqnc.train.run, or random weights with
--net256 random) and the default 128x128 sample model (sample_models/cartpole). For each: the
SavedModel directory, fp32 TFLite, int8 TFLite (dense), and int8 at each sparsity. Pruning is
one-shot (dqnc.prune.run, finetune='none', dqnc's default of keeping the first and last layers
dense): enough for *size* figures, not for policy quality; quantization uses dqnc.quantize.run
with its accuracy check disabled so it does not refuse one-shot-pruned models. The floor counts
non-zero weights and biases at 32 bits (fp32) or 8 bits (int8).

Writes benchmarks/results/sizes.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    finish,
    ENV_ID, RESULTS, SAMPLE_MODEL, kib, log, make_random_artifact, md_table,
    utc_now,
)

DEFAULT_OUT = RESULTS / "sizes.json"
FULL_SPARSITIES = (0.8, 0.9, 0.95)
QUICK_SPARSITIES = (0.8,)  # the one the int8-sparse / fp32 ratio needs


def _nonzero(artifact: Any) -> tuple[int, int]:
    """(non-zero parameters, parameters) of a SavedModel artifact, from its mlp.npz."""
    import numpy as np

    from dqnc.nets import load_mlp

    mlp = load_mlp(artifact.path / "mlp.npz")
    arrays = [a for layer in mlp.layers for a in layer]
    return sum(int(np.count_nonzero(a)) for a in arrays), sum(int(a.size) for a in arrays)


def _row(kind: str, path: Path, nonzero: int, params: int, bits: int, **extra: Any) -> dict[str, Any]:
    from dqnc.inspection import disk_size, gzip_size

    floor = nonzero * bits // 8
    size, gz = disk_size(path), gzip_size(path)
    return {"kind": kind, "bytes": size, "gzip_bytes": gz, "nonzero_params": nonzero, "params": params,
            "sparsity": 1 - nonzero / params, "floor_bits": bits, "floor_bytes": floor,
            "bytes_over_floor": size / floor, "gzip_over_floor": gz / floor, **extra}


def _train_256(out: Path) -> Any:
    from dqnc.config import build_train_config
    from dqnc.train import run as train

    cfg = build_train_config(ENV_ID, {}, {"hidden": [256, 256], "total_steps": 20_000})
    return train(cfg, out)


def measure(name: str, parent: Any, sparsities: tuple[float, ...], tmp: Path) -> dict[str, Any]:
    from dqnc.config import PruneConfig, QuantizeConfig
    from dqnc.prune import run as prune
    from dqnc.quantize import run as quantize

    def q(mode: str, source: Any, out: Path) -> Any:
        return quantize(QuantizeConfig(mode=mode, min_decisive_agreement=0.0, max_q_rel_error=1e9), source, out)

    nz, params = _nonzero(parent)
    rows = [_row("SavedModel (fp32)", parent.model_path, nz, params, 32)]
    fp32 = q("fp32", parent, tmp / f"{name}-fp32")
    rows.append(_row("fp32 TFLite", fp32.model_path, nz, params, 32))
    int8 = q("int8", parent, tmp / f"{name}-int8")
    rows.append(_row("int8 TFLite, dense", int8.model_path, nz, params, 8,
                     encoding=int8.manifest["metrics"].get("sparsity_encoding")))
    for s in sparsities:
        log(f"{name}: one-shot pruning to {s:.0%} and int8 ...")
        pruned = prune(PruneConfig(sparsity=s, finetune="none"), parent, tmp / f"{name}-pruned-{s}")
        pnz, pparams = _nonzero(pruned)
        qs = q("int8", pruned, tmp / f"{name}-pruned-{s}-int8")
        rows.append(_row(f"int8 TFLite, {s:.0%} sparse", qs.model_path, pnz, pparams, 8, target_sparsity=s,
                         prunable_sparsity=pruned.manifest["metrics"].get("prunable_sparsity"),
                         encoding=qs.manifest["metrics"].get("sparsity_encoding")))
    by_kind = {r["kind"]: r for r in rows}
    sparse80 = by_kind.get("int8 TFLite, 80% sparse")
    ratio = None
    if sparse80:
        f = by_kind["fp32 TFLite"]
        ratio = {"bytes": sparse80["bytes"] / f["bytes"], "gzip_bytes": sparse80["gzip_bytes"] / f["gzip_bytes"]}
    return {"rows": rows, "ratio_int8_80_sparse_over_fp32_tflite": ratio}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Model sizes (raw, gzip) vs the non-zero-parameter floor.")
    p.add_argument("--quick", action="store_true", help="80%% sparsity only")
    p.add_argument("--sparsities", default=None, help="comma-separated, e.g. 0.8,0.9,0.95 (overrides --quick)")
    p.add_argument("--net256", choices=("train", "random"), default="train",
                   help="256x256 net: dqnc.train.run for 20,000 steps (a weak policy is fine for sizes; "
                        "~15 s on 2 cores), or random weights")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    if args.sparsities:
        sparsities = tuple(float(s) for s in args.sparsities.split(",") if s.strip())
    else:
        sparsities = QUICK_SPARSITIES if args.quick else FULL_SPARSITIES
    if 0.8 not in sparsities:
        sparsities = (0.8, *sparsities)
    net256 = args.net256

    from dqnc import artifact as art

    doc: dict[str, Any] = {"benchmark": "sizes", "started_utc": utc_now(), "sparsities": list(sparsities), "nets": {}}
    with tempfile.TemporaryDirectory(prefix="dqnc-bench-sizes-") as tmp_s:
        tmp = Path(tmp_s)
        if net256 == "train":
            log("training a 256x256 CartPole net (dqnc.train.run, 20,000 steps) ...")
            parent256 = _train_256(tmp / "parent-256x256")
            m = parent256.manifest["metrics"]
            source256 = (f"trained with dqnc.train.run, hidden [256, 256], total_steps 20,000 "
                         f"({m['env_steps']:,} steps run; best eval mean return {m.get('best_eval_mean_return')})")
        else:
            parent256 = make_random_artifact((256, 256), tmp / "parent-256x256")
            source256 = "random weights (dqnc.nets.build_plain_mlp, He init), untrained"
        for name, parent, source in (("256x256", parent256, source256),
                                     ("128x128", art.load(SAMPLE_MODEL), "sample_models/cartpole (trained)")):
            log(f"{name}: converting ...")
            doc["nets"][name] = {"source": source, **measure(name, parent, sparsities, tmp)}
    return finish(doc, args.out, markdown, None)


def markdown(doc: dict[str, Any]) -> str:
    head = ["net", "model", "sparsity", "size", "gzip", "non-zero params", "floor (bits)", "size / floor",
            "gzip / floor"]
    rows = []
    for name, net in doc["nets"].items():
        for r in net["rows"]:
            kind = r["kind"] + (f" ({r['encoding']} encoding)" if r.get("encoding") and "sparse" in r["kind"] else "")
            rows.append([name, kind, f"{100 * r['sparsity']:.1f}%", kib(r["bytes"]), kib(r["gzip_bytes"]),
                         f"{r['nonzero_params']:,}", f"{kib(r['floor_bytes'])} ({r['floor_bits']})",
                         f"{r['bytes_over_floor']:.2f}", f"{r['gzip_over_floor']:.2f}"])
    out = [md_table(head, rows, text_columns=2), ""]
    for name, net in doc["nets"].items():
        ratio = net.get("ratio_int8_80_sparse_over_fp32_tflite")
        if ratio:
            out.append(f"{name}: int8 80%-sparse / fp32 TFLite = {ratio['bytes']:.3f} raw "
                       f"({1 / ratio['bytes']:.1f}x smaller), {ratio['gzip_bytes']:.3f} gzipped.")
    out.append("Sparsity is over all weights and biases; pruning targets the hidden layers only (first and "
               "last layers kept dense, dqnc's default), one-shot (finetune='none'). Floor = non-zero parameters "
               "x bits / 8 (int8 TFLite keeps biases as int32; the floor counts every parameter at 8 bits). "
               "gzip = gzip -9 of the file (of a tar of the SavedModel directory).")
    for name, net in doc["nets"].items():
        out.append(f"{name}: {net['source']}.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
