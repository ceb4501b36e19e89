"""Helpers shared by inference.py, sizes.py, startup.py and run.py (run with dqnc's python).

Nothing here imports TensorFlow at module level.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SAMPLE_MODEL = ROOT / "sample_models" / "cartpole"
SB3_PYTHON = HERE / ".venv-sb3" / "bin" / "python"
EDGE_VENV = HERE / ".venv-edge"
EDGE_REQUIREMENTS = ["numpy<2", "tflite-runtime==2.14.*"]
ENV_ID = "CartPole-v1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def dqnc_command() -> list[str]:
    """The `dqnc` console script of the running venv."""
    script = Path(sys.executable).parent / "dqnc"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dqnc"]


def run_json(cmd: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``cmd``; return the JSON object on its last stdout line (stderr passes through on failure)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(map(str, cmd))}\n{tail}")
    return json.loads(lines[-1])


def _venv_versions(python: Path, packages: tuple[str, ...]) -> dict[str, Any] | None:
    if not Path(python).is_file():
        return None
    code = ("import importlib.metadata as m, json, platform\nout={'python': platform.python_version()}\n"
            f"for p in {list(packages)!r}:\n"
            "    try: out[p]=m.version(p)\n    except m.PackageNotFoundError: out[p]=None\n"
            "print(json.dumps(out))")
    try:
        return run_json([str(python), "-c", code], timeout=60)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError):
        return None


def machine_info(sb3_python: Path | None = SB3_PYTHON, edge_python: Path | None = None) -> dict[str, Any]:
    """CPU, load, and every library version involved (dqnc's venv and the two benchmark venvs)."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from dqnc import __version__  # the checkout being measured, not whatever dist metadata pip left

    versions: dict[str, str | None] = {"dqnc": __version__}
    for pkg in ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert",
                "gymnasium", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        # Cores this process may use (what `nproc` prints), not the host's total.
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "sb3_venv": _venv_versions(sb3_python, ("stable-baselines3", "torch", "gymnasium", "numpy"))
        if sb3_python else None,
        "edge_venv": _venv_versions(edge_python, ("tflite-runtime", "numpy")) if edge_python else None,
        "git_commit": commit,
        "git_dirty": dirty,
        "loadavg": list(os.getloadavg()),
    }


def machine_line(info: dict[str, Any]) -> str:
    v = info["versions"]
    parts = [f"{info['nproc']} cores ({info['cpu_model']})", f"python {info['python']}",
             f"dqnc {v.get('dqnc')}", f"tensorflow {v.get('tensorflow')}", f"tf-keras {v.get('tf-keras')}",
             f"ai-edge-litert {v.get('ai-edge-litert')}", f"numpy {v.get('numpy')}", f"gymnasium {v.get('gymnasium')}"]
    sb3 = info.get("sb3_venv")
    if sb3:
        parts.append(f"SB3 {sb3.get('stable-baselines3')} + torch {sb3.get('torch')} (numpy {sb3.get('numpy')})")
    edge = info.get("edge_venv")
    if edge:
        parts.append(f"tflite-runtime {edge.get('tflite-runtime')} (numpy {edge.get('numpy')}, python {edge.get('python')})")
    load = info.get("loadavg")
    if load:
        parts.append(f"1-min load {load[0]:.2f} at start")
    return "; ".join(parts)


def ensure_edge_venv(venv: Path = EDGE_VENV) -> Path:
    """The python of a venv with only numpy<2 and tflite-runtime 2.14, created on first use."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import numpy, tflite_runtime.interpreter"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    base = os.environ.get("PYTHON") or shutil.which("python3") or sys.executable
    log(f"creating {venv} ({' '.join(EDGE_REQUIREMENTS)}) with {base} ...")
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *EDGE_REQUIREMENTS], check=True)
    subprocess.run(check, check=True)
    return python


def make_random_artifact(hidden: tuple[int, ...], out: Path, seed: int = 0) -> Any:
    """A CartPole fp32 'train' artifact with random weights (He-initialised kernels, small biases), untrained.

    Written like dqnc's train stage writes one (SavedModel + mlp.npz + manifest), so prune,
    quantize, export and eval accept it; the manifest's metrics say the weights are random.
    """
    import numpy as np

    from dqnc import artifact as art
    from dqnc.envs import env_spec
    from dqnc.nets import MLP_FILE, NetSpec, build_plain_mlp, save_mlp

    spec = env_spec(ENV_ID)
    net = NetSpec(spec.obs_dim, spec.n_actions, tuple(hidden), "relu")
    rng = np.random.default_rng(seed)
    dims = [spec.obs_dim, *hidden, spec.n_actions]
    weights: list[np.ndarray] = []
    for i in range(len(dims) - 1):
        weights.append((rng.standard_normal((dims[i], dims[i + 1])) * np.sqrt(2.0 / dims[i])).astype(np.float32))
        weights.append((rng.standard_normal(dims[i + 1]) * 0.01).astype(np.float32))  # non-zero, like trained nets
    model = build_plain_mlp(net, weights)
    with art.atomic_output(Path(out), force=False) as tmp:
        model.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        save_mlp(tmp / MLP_FILE, weights, ["relu"] * len(hidden))
        art.write_manifest(tmp, stage="train", env=spec, network=net.to_dict() | {"saved_as": "sequential_mlp"},
                           config={"benchmark": "random weights, untrained", "seed": seed},
                           metrics={"random_weights": True}, command=["benchmarks", "random-weights", str(seed)])
    return art.load(out)


def md_table(head: list[str], rows: list[list[Any]], text_columns: int = 1) -> str:
    """A GitHub Markdown table: the first ``text_columns`` columns left-aligned, the rest (numbers) right."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < text_columns else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in r) + " |")
    return "\n".join(lines)


def fmt(value: Any, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def kib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1024:.1f} KiB"


def finish(doc: dict[str, Any], out: Path, markdown: Any, sb3_python: Path | None = None,
           edge_python: Path | None = None) -> int:
    """Record the machine, write the JSON, print the Markdown tables: the end of every benchmark part."""
    doc["machine"] = machine_info(sb3_python, edge_python)
    doc["finished_utc"] = utc_now()
    write_json(out, doc)
    print(markdown(doc))
    print(f"\nmachine: {machine_line(doc['machine'])}")
    print(f"results written to {out}")
    return 0
