"""TF-free latency timing of .tflite models (and numpy MLPs), run as a subprocess by inference.py.

Runs under dqnc's venv (LiteRT, numpy forward pass) and under the numpy<2 + tflite-runtime venv
(.venv-edge) alike: it never imports TensorFlow, and it uses dqnc's own ``runtime.Policy`` (from
the installed package, else loaded from dqnc/runtime.py by path, the way a bundle's
run_policy.py is that same file). Prints one JSON object on stdout.

    python benchmarks/_lite_timing.py --spec jobs.json --obs obs.npy --warmup 200

jobs.json: [{"name": ..., "kind": "tflite", "model": PATH, "manifest": PATH-or-null},
            {"name": ..., "kind": "numpy", "mlp": PATH-of-mlp.npz}, ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import time_calls  # noqa: E402


def _runtime_module() -> Any:
    try:
        from dqnc import runtime  # dqnc's venv

        return runtime
    except ImportError:
        path = HERE.parent / "dqnc" / "runtime.py"
        spec = importlib.util.spec_from_file_location("dqnc_runtime", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _versions(runtime_name: str | None) -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for pkg in ("ai-edge-litert", "tflite-runtime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["runtime"] = runtime_name
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, type=Path)
    p.add_argument("--obs", required=True, type=Path, help=".npy of float32 observations [N, obs_dim]")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--runtime", default=None, help="ai_edge_litert or tflite_runtime (default: first that imports)")
    p.add_argument("--threads", type=int, default=1, help="interpreter threads (dqnc uses 1)")
    args = p.parse_args(argv)

    jobs = json.loads(args.spec.read_text())
    rows = [np.asarray(r, np.float32) for r in np.load(args.obs)]
    out: dict[str, Any] = {"results": {}}
    runtime_name = None
    for job in jobs:
        if job["kind"] == "numpy":
            from dqnc.nets import load_mlp

            mlp = load_mlp(job["mlp"])
            out["results"][job["name"]] = {"action": time_calls(lambda o: int(mlp(o[None, :]).argmax()), rows, args.warmup)}
            continue
        rt = _runtime_module()
        manifest = json.loads(Path(job["manifest"]).read_text()) if job.get("manifest") else None
        pol = rt.Policy.from_manifest(job["model"], manifest, runtime=args.runtime, num_threads=args.threads)
        runtime_name = pol.runtime
        # The act path: float observation in, greedy action out (input standardization and
        # quantization included). The invoke path: set an already-quantized input, invoke, get the
        # raw output -- the interpreter's own cost, as a C control loop would pay it.
        prepared = [pol._quantize(r).reshape(pol._in_shape) for r in rows]
        out["results"][job["name"]] = {
            "action": time_calls(pol.act, rows, args.warmup),
            "invoke": time_calls(pol.invoke_quantized, prepared, args.warmup),
            "runtime": pol.runtime,
            "delegate": getattr(pol, "delegate", None),
            "input_dtype": pol.input_dtype.name,
        }
    out["versions"] = _versions(runtime_name)
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
