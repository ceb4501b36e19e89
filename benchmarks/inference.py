"""Per-action inference latency of one observation, p50/p99 in microseconds, runtime by runtime.

Run with dqnc's python:

    python benchmarks/inference.py            # 10,000 timed calls per row
    python benchmarks/inference.py --quick    # 2,000 timed calls per row

Two networks: the default 128x128 CartPole net (sample_models/cartpole, trained) and a 512x512 net
(random weights, dqnc.nets.build_plain_mlp written as an artifact). Each is converted with
dqnc.quantize.run to int8 (full integer) and to fp32 TFLite. Every row times single calls on the
same observations (states the sample policy visits), warm-up first, ``time.perf_counter_ns``
around each call:

- LiteRT int8 / fp32, ``Policy.act`` (float observation in, greedy action out) and
  ``Policy.invoke_quantized`` (interpreter only); timed in a TF-free subprocess, like ``dqnc eval``;
- tflite-runtime 2.14 int8 in a numpy<2 venv (benchmarks/.venv-edge, created on first use);
- Keras ``model(x)`` (tf_keras, eager) and the SavedModel ``serving_default`` signature, argmax included;
- SB3 ``model.predict(obs, deterministic=True)`` (untrained DQN of the same layout, in .venv-sb3),
  with torch's default thread count and with one thread;
- numpy forward pass (dqnc.nets.NumpyMLP), the floor.

Writes benchmarks/results/inference.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    finish,
    ENV_ID, RESULTS, SAMPLE_MODEL, SB3_PYTHON, ensure_edge_venv, fmt, log, make_random_artifact, md_table, run_json, utc_now,
)
from _timing import time_calls  # noqa: E402

NETS = ("128x128", "512x512")
ROWS = [  # key, label
    ("litert_int8_act", "LiteRT int8, `Policy.act` (float obs in, action out)"),
    ("litert_int8_invoke", "LiteRT int8, interpreter only (`Policy.invoke_quantized`)"),
    ("litert_fp32_act", "LiteRT fp32, `Policy.act`"),
    ("litert_fp32_invoke", "LiteRT fp32, interpreter only"),
    ("tflite_runtime_int8_act", "tflite-runtime 2.14 int8, `Policy.act` (numpy<2 venv)"),
    ("tflite_runtime_int8_invoke", "tflite-runtime 2.14 int8, interpreter only"),
    ("keras_call", "Keras `model(x)`, eager (tf_keras)"),
    ("savedmodel_signature", "SavedModel `signatures['serving_default']`"),
    ("sb3_predict", "SB3 `model.predict(obs, deterministic=True)`, torch default threads"),
    ("sb3_predict_1thread", "SB3 `model.predict(obs, deterministic=True)`, torch 1 thread"),
    ("numpy", "numpy forward pass (`dqnc.nets.NumpyMLP`), floor"),
]
DEFAULT_OUT = RESULTS / "inference.json"


def _relaxed(mode: str) -> Any:
    """Quantize settings for timing: the accuracy check cannot refuse (a random net has no policy)."""
    from dqnc.config import QuantizeConfig

    return QuantizeConfig(mode=mode, min_decisive_agreement=0.0, max_q_rel_error=1e9)


def _keras_rows(parent: Any, rows: list[Any], warmup: int) -> dict[str, Any]:
    """Keras eager call and SavedModel signature call, in this process (TensorFlow is loaded here)."""
    import numpy as np

    from dqnc.keras import tf
    from dqnc.policy import load_keras_model

    t = tf()
    model = load_keras_model(parent.model_path)
    keras_fn = lambda o: int(np.argmax(model(o[None, :], training=False).numpy()))  # noqa: E731
    out = {"keras_call": time_calls(keras_fn, rows, warmup)}
    sig = t.saved_model.load(str(parent.model_path)).signatures["serving_default"]
    (in_name,) = list(sig.structured_input_signature[1].keys())

    def sig_fn(o: Any) -> int:
        result = sig(**{in_name: t.constant(o[None, :])})
        return int(np.argmax(next(iter(result.values())).numpy()))

    out["savedmodel_signature"] = time_calls(sig_fn, rows, warmup)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Per-action inference latency (p50/p99 us) across runtimes.")
    p.add_argument("--quick", action="store_true", help="2,000 timed calls per row instead of 10,000")
    p.add_argument("--samples", type=int, default=None, help="timed calls per row (overrides --quick)")
    p.add_argument("--warmup", type=int, default=200, help="untimed calls before each row")
    p.add_argument("--sb3-python", type=Path, default=SB3_PYTHON, help="python of the SB3 venv")
    p.add_argument("--edge-python", type=Path, default=None,
                   help="python of a numpy<2 + tflite-runtime venv [default: benchmarks/.venv-edge, created if missing]")
    p.add_argument("--no-sb3", action="store_true", help="skip the SB3 row")
    p.add_argument("--no-edge", action="store_true", help="skip the tflite-runtime rows")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = p.parse_args(argv)
    samples = args.samples or (2000 if args.quick else 10_000)

    import numpy as np

    from dqnc import artifact as art
    from dqnc.envs import collect_states, env_spec
    from dqnc.policy import q_function
    from dqnc.quantize import run as quantize

    errors: dict[str, str] = {}
    edge_python = None
    if not args.no_edge:
        try:
            edge_python = args.edge_python or ensure_edge_venv()
        except Exception as e:  # noqa: BLE001 -- no network, no wheel: report and go on
            errors["tflite_runtime"] = f"edge venv unavailable: {e}"
    doc: dict[str, Any] = {
        "benchmark": "inference",
        "started_utc": utc_now(),
        "samples": samples,
        "warmup": args.warmup,
        "nets": {},
        "results": {n: {} for n in NETS},
        "errors": errors,
        "notes": [
            "single observation per call; time.perf_counter_ns around each call; microseconds",
            "observations: states visited by sample_models/cartpole (epsilon 0.1), the same for every row",
            "LiteRT and tflite-runtime: 1 interpreter thread (dqnc's default), default delegates (XNNPACK); "
            "TF and torch: their default thread counts",
            "Keras, SavedModel and numpy rows include the argmax; SB3 predict includes its own obs preprocessing",
            "int8/fp32 models from dqnc.quantize.run with the accuracy check disabled (timing only)",
            "512x512 net: random weights (untrained); SB3 DQNs: untrained",
        ],
    }
    spec = env_spec(ENV_ID)
    with tempfile.TemporaryDirectory(prefix="dqnc-bench-inference-") as tmp_s:
        tmp = Path(tmp_s)
        log("building models ...")
        parents = {"128x128": art.load(SAMPLE_MODEL), "512x512": make_random_artifact((512, 512), tmp / "parent-512x512")}
        pool = collect_states(q_function(parents["128x128"]), spec, 2000, seed=1234, epsilon=0.1)
        obs = pool[np.random.default_rng(0).integers(0, len(pool), samples)].astype(np.float32)
        obs_path = tmp / "obs.npy"
        np.save(obs_path, obs)
        rows = [r for r in obs]
        tflite: dict[str, dict[str, Path]] = {}
        for name, parent in parents.items():
            tflite[name] = {}
            for mode in ("int8", "fp32"):
                a = quantize(_relaxed(mode), parent, tmp / f"{mode}-{name}")
                tflite[name][mode] = a.path
            layers = [int(h) for h in name.split("x")]
            dims = [spec.obs_dim, *layers, spec.n_actions]
            doc["nets"][name] = {
                "source": "sample_models/cartpole (trained)" if name == "128x128" else "random weights (build_plain_mlp)",
                "params": sum(dims[i] * dims[i + 1] + dims[i + 1] for i in range(len(dims) - 1)),
                "int8_bytes": (tflite[name]["int8"] / "model.tflite").stat().st_size,
                "fp32_bytes": (tflite[name]["fp32"] / "model.tflite").stat().st_size,
            }

        def tflite_job(name: str, mode: str) -> dict[str, Any]:
            d = tflite[name][mode]
            return {"name": f"{name}/{mode}", "kind": "tflite", "model": str(d / "model.tflite"),
                    "manifest": str(d / "manifest.json")}

        # LiteRT and numpy: dqnc's venv, in a process that never imports TensorFlow (as dqnc eval).
        jobs = [tflite_job(n, m) for n in NETS for m in ("int8", "fp32")]
        jobs += [{"name": f"{n}/numpy", "kind": "numpy", "mlp": str(parents[n].path / "mlp.npz")} for n in NETS]
        spec_path = tmp / "lite_jobs.json"
        spec_path.write_text(json.dumps(jobs))
        log(f"timing LiteRT and numpy ({samples:,} calls per row) ...")
        lite = run_json([sys.executable, str(HERE / "_lite_timing.py"), "--spec", str(spec_path), "--obs", str(obs_path),
                         "--warmup", str(args.warmup), "--runtime", "ai_edge_litert"])
        doc["litert_versions"] = lite["versions"]
        for n in NETS:
            r = lite["results"]
            doc["results"][n]["litert_int8_act"] = r[f"{n}/int8"]["action"]
            doc["results"][n]["litert_int8_invoke"] = r[f"{n}/int8"]["invoke"]
            doc["results"][n]["litert_fp32_act"] = r[f"{n}/fp32"]["action"]
            doc["results"][n]["litert_fp32_invoke"] = r[f"{n}/fp32"]["invoke"]
            doc["results"][n]["numpy"] = r[f"{n}/numpy"]["action"]
            doc["nets"][n]["litert_delegate_int8"] = r[f"{n}/int8"].get("delegate")

        if edge_python is not None:
            log("timing tflite-runtime (numpy<2 venv) ...")
            edge_jobs = [tflite_job(n, "int8") for n in NETS]
            edge_spec = tmp / "edge_jobs.json"
            edge_spec.write_text(json.dumps(edge_jobs))
            try:
                edge = run_json([str(edge_python), str(HERE / "_lite_timing.py"), "--spec", str(edge_spec),
                                 "--obs", str(obs_path), "--warmup", str(args.warmup), "--runtime", "tflite_runtime"])
                doc["edge_versions"] = edge["versions"]
                for n in NETS:
                    doc["results"][n]["tflite_runtime_int8_act"] = edge["results"][f"{n}/int8"]["action"]
                    doc["results"][n]["tflite_runtime_int8_invoke"] = edge["results"][f"{n}/int8"]["invoke"]
            except (RuntimeError, OSError, ValueError) as e:
                errors["tflite_runtime"] = str(e)

        if not args.no_sb3:
            if not args.sb3_python.is_file():
                errors["sb3"] = f"no SB3 python at {args.sb3_python}: run `bash benchmarks/setup_venv.sh`"
            else:
                # Torch's default (one intra-op thread per core) is what users get; on a busy
                # machine those threads contend for the cores, so one thread is timed as well.
                for key, threads in (("sb3_predict", None), ("sb3_predict_1thread", 1)):
                    log(f"timing SB3 predict (SB3 venv, torch threads: {threads or 'default'}) ...")
                    try:
                        sb3 = run_json([str(args.sb3_python), str(HERE / "_sb3_timing.py"), "--nets", ",".join(NETS),
                                        "--obs", str(obs_path), "--warmup", str(args.warmup)]
                                       + ([] if threads is None else ["--torch-threads", str(threads)]))
                        doc["sb3_versions"] = sb3["versions"]
                        doc.setdefault("sb3_torch_threads", {})[key] = sb3["torch_threads"]
                        for n in NETS:
                            doc["results"][n][key] = sb3["results"][n]["action"]
                    except (RuntimeError, OSError, ValueError) as e:
                        errors[key] = str(e)

        log("timing Keras and SavedModel calls ...")
        for n in NETS:
            doc["results"][n].update(_keras_rows(parents[n], rows, args.warmup))

    for n in NETS:
        r = doc["results"][n]
        if "keras_call" in r and "litert_int8_act" in r:
            doc["nets"][n]["ratio_keras_over_litert_int8_p50"] = r["keras_call"]["p50"] / r["litert_int8_act"]["p50"]
    return finish(doc, args.out, markdown, args.sb3_python if not args.no_sb3 else None, edge_python)


def markdown(doc: dict[str, Any]) -> str:
    head = ["path"]
    for n in NETS:
        head += [f"{n} p50 us", f"{n} p99 us"]
    rows = []
    for key, label in ROWS:
        cells: list[Any] = [label]
        for n in NETS:
            r = doc["results"].get(n, {}).get(key)
            cells += [fmt(r and r["p50"]), fmt(r and r["p99"])]
        if all(c == "-" for c in cells[1:]):
            continue
        rows.append(cells)
    out = [md_table(head, rows), ""]
    ratios = [f"{n}: {doc['nets'][n]['ratio_keras_over_litert_int8_p50']:.0f}x" for n in NETS
              if doc["nets"].get(n, {}).get("ratio_keras_over_litert_int8_p50")]
    if ratios:
        out.append("Keras `model(x)` p50 / LiteRT int8 `Policy.act` p50: " + ", ".join(ratios) + ".")
    nets = "; ".join(f"{n}: {d['source']}, {d['params']:,} parameters, int8 {d['int8_bytes']:,} B, "
                     f"fp32 {d['fp32_bytes']:,} B" for n, d in doc["nets"].items())
    out.append(f"{doc['samples']:,} timed calls per row after {doc['warmup']} warm-up calls. Networks: {nets}.")
    threads = doc.get("sb3_torch_threads") or {}
    if threads.get("sb3_predict"):
        out.append(f"torch default threads here: {threads['sb3_predict']}.")
    for k, v in doc.get("errors", {}).items():
        out.append(f"**{k} rows missing**: {v.splitlines()[0]}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
