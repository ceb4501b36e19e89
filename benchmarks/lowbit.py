"""4-bit and 2-bit weights beside int8, per env: bytes of each form, the runtimes that ran it, return.

Run with dqnc's python (from the repository root):

    python benchmarks/lowbit.py                                   # the four envs' shipped students
    python benchmarks/lowbit.py --students DIR --envs cartpole    # students under DIR/<env>/student
    python benchmarks/lowbit.py --no-edge-venv                    # skip tflite-runtime

For each env the distilled fp32 student of its shipped recipe (``runs/<env>/student``, copied
into the work directory first, never written) goes through

    dqnc quantize STUDENT --weight-bits B --check-episodes 0 --max-regret 1     (B = 8, 4, 2)
    dqnc export Q --check-states 2000                                           (target mcu)
    dqnc eval BUNDLE --reference STUDENT --episodes 100                         (held-out seeds)

The quantize check is opened up (no closed-loop episodes, any regret) so that a lossy 2-bit model
is measured and reported rather than refused; nothing is tuned on the held-out episodes, which
only ``eval`` rolls out. Forms: the plain int8 file (``model.tflite``; for 4/2 bits its kernels
hold at most 16/4 int8 values), the LUT-compressed file (``model_lut.tflite``, TFLite Micro's
DECODE op) and the C policy (weights as packed indices plus per-layer tables for 4/2 bits).
"Runtimes that ran it" are measured: export runs each form's int8 outputs on its verification
states through TFLM (bit-identical required), LiteRT (loads and runs, or the reason it cannot)
and the host-compiled C policy (and, with arm-none-eabi-gcc and qemu-system-arm, policy.c on an
emulated Cortex-M4: its flash bytes, text + rodata + data of policy.o); tflite-runtime 2.14 runs in a separate numpy<2 venv
(benchmarks/.venv-edge, created on first use) on the same int8 inputs.

Writes benchmarks/results/lowbit.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    EDGE_VENV, RESULTS, dqnc_command, ensure_edge_venv, finish, fmt, log, md_table, run_json, utc_now,
)

ENVS = ("cartpole", "acrobot", "lunarlander", "mountaincar")
BITS = (8, 4, 2)

# Run in the tflite-runtime venv: load a .tflite, feed int8 inputs, print the outputs or the error.
_EDGE_PROBE = """
import json, sys
import numpy as np
try:
    from tflite_runtime.interpreter import Interpreter
    it = Interpreter(model_path=sys.argv[1]); it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    xq = np.load(sys.argv[2]); out = []
    for x in xq:
        it.set_tensor(i["index"], x[None].astype(i["dtype"])); it.invoke(); out.append(it.get_tensor(o["index"]).reshape(-1).tolist())
    print(json.dumps({"outputs": out}))
except Exception as e:
    print(json.dumps({"error": (str(e).strip().splitlines() or [type(e).__name__])[0][:160]}))
"""


def edge_check(python: Path, model: Path, xq: Any, expected: Any) -> str:
    """Whether tflite-runtime (in its own venv) runs ``model`` and how its int8 outputs compare with TFLM's."""
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        np.save(Path(d) / "xq.npy", xq)
        proc = subprocess.run([str(python), "-c", _EDGE_PROBE, str(model), str(Path(d) / "xq.npy")],
                              capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return f"no: exit {proc.returncode} ({(proc.stderr.strip().splitlines() or ['?'])[-1][:120]})"
    got = json.loads(lines[-1])
    if "error" in got:
        return f"no: {got['error']}"
    diff = int((np.asarray(got["outputs"]) != expected).sum())
    return "ran" if diff == 0 else f"ran ({diff} int8 outputs differ from TFLM)"


def verification_inputs(bundle: Path, n: int) -> tuple[Any, Any]:
    """The first ``n`` int8 verification inputs of a bundle (regenerated as export makes them) and TFLM's outputs."""
    import numpy as np

    from dqnc import artifact as art
    from dqnc import tflm
    from dqnc.envs import collect_states
    from dqnc.policy import q_function, tflite_policy
    from dqnc.seeds import episode_seed

    b = art.load(bundle)
    parent = art.load(b.manifest["parent"]["path"])
    states = collect_states(q_function(parent), b.env, n, episode_seed("export_check", 0), 0.1).astype(np.float32)
    lite = tflite_policy(b.model_path, b.manifest)
    xq = lite._quantize(states).reshape(len(states), -1).astype(np.int8)
    micro = tflm.policy(b.model_path.read_bytes(), b.manifest)
    raw = np.stack([np.array(micro.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])
    return xq, raw


def one(env: str, student: Path, work: Path, bits: int, episodes: int, edge_python: Path | None) -> dict[str, Any]:
    dqnc = dqnc_command()
    q, bundle = work / f"int{bits}" if bits == 8 else work / f"w{bits}", work / f"bundle{bits}"
    started = time.perf_counter()
    cmd = [*dqnc, "quantize", str(student), "-o", str(q), "--force", "--json", "--check-episodes", "0", "--max-regret", "1"]
    quant = run_json(cmd + (["--weight-bits", str(bits)] if bits < 8 else []))
    t_quant = time.perf_counter() - started
    exp = run_json([*dqnc, "export", str(q), "-o", str(bundle), "--force", "--json", "--check-states", "2000"])
    ev = run_json([*dqnc, "eval", str(bundle), "--reference", str(student), "--episodes", str(episodes), "--json"])
    m, qm = exp["metrics"], quant["metrics"]
    lut = m.get("lut")
    runtimes_plain = {"litert": "ran (eval)", "tflm": "ran" if m.get("tflm_compatible") else "no",
                      "c": "ran" if m["c_policy"].get("host_verified") else m["c_policy"].get("reason", "no")}
    runtimes_lut = dict(lut["runtimes"]) if lut else None
    if runtimes_lut is not None:
        runtimes_lut["c"] = "n/a (policy.c holds the packed form itself)"
    if edge_python is not None:
        xq, raw = verification_inputs(bundle, 500)
        runtimes_plain["tflite-runtime"] = edge_check(edge_python, bundle / "model.tflite", xq, raw)
        if lut:
            runtimes_lut["tflite-runtime"] = edge_check(edge_python, bundle / lut["file"], xq, raw)  # type: ignore[index]
    m4 = None
    from dqnc import mcu

    if not mcu.missing_tools():
        r = mcu.verify_bundle(bundle, n_vectors=200)
        m4 = {"flash_bytes": r["flash_bytes"], "rodata_bytes": r["sections"]["rodata"], "text_bytes": r["sections"]["text"],
              "actions_equal": r["actions_equal"], "vectors": r["vectors"],
              "instructions_per_action": round(r["instructions_per_action"])}
        runtimes_plain["c (Cortex-M4, QEMU)"] = "ran" if r["actions_equal"] == r["vectors"] else "differs"
    ref = {**ev, **(ev.get("reference") or {})}  # eval --json: comparison figures flat, the reference's own under "reference"
    return {
        "cortex_m4": m4,
        "env": env, "weight_bits": bits, "quantize_seconds": round(t_quant, 1),
        "tflite_bytes": m["size_bytes"], "lut_tflite_bytes": lut["bytes"] if lut else None,
        "tflm_arena_bytes": m["tflm_arena_bytes"]["total"], "lut_tflm_arena_bytes": lut["tflm_arena_bytes"]["total"] if lut else None,
        "c_weight_bytes": m["c_policy"]["weight_bytes"], "c_const_bytes": m["c_policy"]["const_data_bytes"],
        "distinct_int8_weights": (qm.get("weight_bits") or {}).get("distinct_int8_weights"),
        "runtimes_plain": runtimes_plain, "runtimes_lut": runtimes_lut,
        "mean_return": ev["mean_return"], "return_ci95": ev["return_ci95"], "episodes": ev["episodes"],
        "parent_mean_return": ref["mean_return"], "return_drop_of_random_gap": ref.get("return_drop_of_random_gap"),
        "regret": ref.get("regret"), "agreement": ref.get("agreement"), "decisive_agreement": ref.get("decisive_agreement"),
        "decisive_states": ref.get("decisive_states"), "quantize_check": qm["check"],
    }


def _ran(runtimes: dict[str, str] | None) -> str:
    if not runtimes:
        return "-"
    return ", ".join(k for k, v in runtimes.items() if v.startswith("ran")) or "none"


def markdown(doc: dict[str, Any]) -> str:
    head = ["env", "weights", ".tflite B", "LUT .tflite B", "policy.c weight B", "M4 policy.o flash B", "arena B (plain / LUT)",
            "runtimes: plain", "runtimes: LUT", "return (100 held-out) ± CI", "parent", "regret", "decisive agr."]
    rows = []
    for r in doc["rows"]:
        lo, hi = r["return_ci95"]
        rows.append([r["env"], f"{r['weight_bits']}-bit" if r["weight_bits"] < 8 else "int8", f"{r['tflite_bytes']:,}",
                     "-" if r["lut_tflite_bytes"] is None else f"{r['lut_tflite_bytes']:,}", f"{r['c_weight_bytes']:,}",
                     "-" if not r.get("cortex_m4") else f"{r['cortex_m4']['flash_bytes']:,}",
                     f"{r['tflm_arena_bytes']:,}" + ("" if r["lut_tflm_arena_bytes"] is None else f" / {r['lut_tflm_arena_bytes']:,}"),
                     _ran(r["runtimes_plain"]), _ran(r["runtimes_lut"]),
                     f"{r['mean_return']:.1f} ({lo:.1f}..{hi:.1f})", f"{r['parent_mean_return']:.1f}",
                     fmt(r["regret"], ".4f"), fmt(100 * r["decisive_agreement"] if r["decisive_agreement"] is not None else None, ".1f") + "%"])
    refusals = sorted({f"{k}: {v}" for r in doc["rows"] for k, v in (r["runtimes_lut"] or {}).items() if not v.startswith("ran")})
    return md_table(head, rows, text_columns=2) + ("\n\nLUT form, runtimes that did not run it: " + "; ".join(refusals) if refusals else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", type=Path, default=ROOT.parent / "main" / "runs",
                   help="directory holding <env>/student (the shipped recipes' distilled students)")
    p.add_argument("--envs", nargs="+", default=list(ENVS), choices=ENVS)
    p.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS)
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--work", type=Path, default=None, help="work directory [default: a temporary one]")
    p.add_argument("--no-edge-venv", action="store_true", help="skip tflite-runtime (needs a numpy<2 venv)")
    p.add_argument("--out", type=Path, default=RESULTS / "lowbit.json")
    args = p.parse_args()
    edge_python = None
    if not args.no_edge_venv:
        try:
            edge_python = ensure_edge_venv(EDGE_VENV)
        except (subprocess.CalledProcessError, OSError) as e:
            log(f"tflite-runtime venv unavailable ({e}); its column is skipped")
    work = args.work or Path(tempfile.mkdtemp(prefix="dqnc-lowbit-"))
    doc: dict[str, Any] = {"started_utc": utc_now(), "command": " ".join(sys.argv), "rows": []}
    wall = time.perf_counter()
    for env in args.envs:
        src = args.students / env / "student"
        if not src.is_dir():
            log(f"{env}: no student at {src}; skipped")
            continue
        student = work / env / "student"
        if not student.exists():
            shutil.copytree(src, student)  # the shipped run is only read
        for bits in args.bits:
            log(f"{env}: {bits}-bit weights")
            doc["rows"].append(one(env, student, work / env, bits, args.episodes, edge_python))
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc["wall_seconds"] = round(time.perf_counter() - wall, 1)
    doc["cpu_seconds_children"] = round(usage.ru_utime + usage.ru_stime, 1)
    doc["work_dir"] = str(work)
    return finish(doc, args.out, markdown, edge_python=edge_python)


if __name__ == "__main__":
    sys.exit(main())
