"""The C policy of int8 conv Q-networks on the emulated Cortex-M4, next to the CartPole MLP's.

Run with dqnc's python (from the repository root):

    python benchmarks/mcu_conv.py                      # ~2-4 minutes on 2 cores
    python benchmarks/mcu_conv.py --cartpole-bundle runs/cartpole/bundle --vectors 300

Policies measured, each exported with ``--target mcu`` (TFLM verified against LiteRT, policy.c
generated and checked bit for bit against TFLM on the host), then run bare-metal on QEMU's
``mps2-an386`` by ``dqnc.mcu``:

- ``minatar-breakout``: sample_models/minatar-breakout-int8, the trained MinAtar Breakout net
  (Conv2D 16 3x3 stride 1, Dense 128: ~133k parameters);
- ``minatar-small``: a MinAtar-shaped small conv net (Conv2D 8 3x3 stride 2, Dense 32), random
  weights calibrated on Breakout frames (the cost figures depend on the shapes only);
- ``cartpole``: README's main job (``dqnc run recipes/cartpole.yaml`` into a temporary directory,
  a 4-16-16-2 int8 MLP), or the bundle given with ``--cartpole-bundle``.

Per policy: ``arm-none-eabi-size`` of policy.o (flash = text + rodata + data; RAM = data + bss:
the conv policy's one static scratch buffer, the MLP's two activation buffers; the stack is
extra), actions equal to TFLM's arithmetic on held-out states, and instructions per action from
QEMU's ``-icount`` (instructions, not cycles: a proxy). A conv policy on pixels is measured
through ``dqnc_policy_act_u8`` (bytes in, as deployed) and through ``dqnc_policy_act`` (float
observations in: soft-float quantization, -mfloat-abi=soft). TFLM's side is what dqnc can
measure without building TFLM for the M4: its .tflite flash bytes and its arena (host-measured).

Writes benchmarks/results/mcu_conv.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/minatar.py would shadow the minatar package: import from the repository root only.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
ENV = "MinAtar/Breakout-v1"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def small_conv_artifact(work: Path) -> Path:
    """A random-weight MinAtar-shaped small conv net as int8 TFLite (calibrated on Breakout frames)."""
    from dqnc.envs import collect_states, env_spec
    from dqnc.keras import tf
    from dqnc.qnet.spec import QNetSpec
    from dqnc.quantize import convert

    tf().random.set_seed(0)
    spec = env_spec(ENV)
    frames = collect_states(lambda o: np.zeros((len(o), spec.n_actions)), spec, 300, seed=11, epsilon=1.0)
    model = QNetSpec.conv_net(spec.obs_shape, spec.n_actions, ((8, 3, 2),), (32,)).build_plain()
    path = work / "minatar-small.tflite"
    path.write_bytes(convert(model, "int8", frames.astype(np.float32)))
    return path


def export_mcu(source: Path, out: Path, check_states: int) -> Path:
    from dqnc import artifact as art
    from dqnc import export
    from dqnc.envs import env_spec

    loaded = art.load(source, env=env_spec(ENV)) if source.suffix == ".tflite" else art.load(source)
    export.run(export.ExportConfig(target="mcu", check_states=check_states, check_episodes=0), loaded, out)
    return out


def cartpole_bundle(work: Path) -> Path:
    """README's main job, run into ``work`` (the recipe's relative paths made absolute)."""
    text = (ROOT / "recipes" / "cartpole.yaml").read_text(encoding="utf-8")
    text = text.replace("../sample_models", str(ROOT / "sample_models"))
    text = "\n".join(f"out_dir: {work / 'out'}" if line.startswith("out_dir:") else line for line in text.splitlines())
    work.mkdir(parents=True, exist_ok=True)
    recipe = work / "cartpole.yaml"
    recipe.write_text(text + "\n", encoding="utf-8")
    script = Path(sys.executable).parent / "dqnc"
    subprocess.run([str(script), "run", str(recipe)], check=True, stdout=subprocess.DEVNULL,
                   env={**__import__("os").environ, "DQNC_CACHE": str(work / "cache")})
    return work / "out" / "bundle"


def float_entry_run(bundle: Path, vectors: int) -> dict[str, Any]:
    """The conv policy through ``dqnc_policy_act`` (float observations, soft-float quantization)."""
    from dqnc import artifact as art
    from dqnc import cpolicy, mcu
    from dqnc.envs import collect_states
    from dqnc.policy import tflite_policy

    a = art.load(bundle)
    lite = tflite_policy(a.model_path, a.manifest)
    obs = collect_states(lite, a.env, vectors, seed=123, epsilon=0.1).reshape(vectors, -1).astype(np.float32)
    net = cpolicy.extract(a.model_path.read_bytes(), conv=True)
    assert not isinstance(net, str)
    expected = net.forward(lite.quantize_input(obs)).argmax(axis=1)
    run = mcu.build_and_run(bundle, obs, expected, expected)  # (no LiteRT column here: TFLM's arithmetic twice)
    if run["actions_equal"] != run["vectors"]:
        raise SystemExit(f"{bundle}: the float entry chose TFLM's action on {run['actions_equal']} of {run['vectors']}")
    return run


def host_us_per_action(bundle: Path, states: int = 500) -> dict[str, float]:
    """Host latency per action: the compiled policy.c and TFLM's interpreter on the same states."""
    from dqnc import artifact as art
    from dqnc import tflm
    from dqnc.envs import collect_states
    from dqnc.runtimes.c import c_policy

    a = art.load(bundle)
    c = c_policy(a)
    micro = tflm.policy(a.model_path.read_bytes(), a.manifest)
    obs = collect_states(micro.q_values, a.env, states, seed=321, epsilon=0.1).reshape(states, -1).astype(np.float32)
    out = {}
    for name, act in (("c", c.act), ("tflm", lambda o: int(np.argmax(micro.q_values(o[None]))))):
        t0 = time.perf_counter()
        for o in obs:
            act(o)
        out[name] = 1e6 * (time.perf_counter() - t0) / states
    return out


def measure(name: str, bundle: Path, vectors: int) -> dict[str, Any]:
    from dqnc import mcu

    manifest = json.loads((bundle / "manifest.json").read_text())
    m = manifest["metrics"]
    log(f"{name}: Cortex-M4 run ({vectors} vectors)")
    run = mcu.verify_bundle(bundle, n_vectors=vectors)
    row = {"policy": name, "tflite_bytes": m["size_bytes"], "tflm_arena_bytes": m["tflm_arena_bytes"]["total"],
           "c_policy": m["c_policy"], "m4": run, "host_us_per_action": host_us_per_action(bundle)}
    if "u8" in run["entry"]:
        log(f"{name}: Cortex-M4 run through the float entry")
        row["m4_float_entry"] = float_entry_run(bundle, min(vectors, 200))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| policy | .tflite B | TFLM arena B | policy.o flash B | RAM B (static) | actions = TFLM | "
             "instr/action (u8 pixels) | instr/action (float obs) | host us/action C / TFLM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m4, fl = r["m4"], r.get("m4_float_entry")
        u8 = f"{m4['instructions_per_action']:,.0f}" if "u8" in m4["entry"] else "-"
        f = fl["instructions_per_action"] if fl else (m4["instructions_per_action"] if "u8" not in m4["entry"] else None)
        host = r["host_us_per_action"]
        lines.append(f"| {r['policy']} | {r['tflite_bytes']:,} | {r['tflm_arena_bytes']:,} | {m4['flash_bytes']:,} | "
                     f"{m4['ram_bytes']:,} | {m4['actions_equal']}/{m4['vectors']} | {u8} | "
                     f"{'-' if f is None else f'{f:,.0f}'} | {host['c']:.1f} / {host['tflm']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cartpole-bundle", type=Path, help="an exported CartPole bundle (default: run recipes/cartpole.yaml)")
    ap.add_argument("--vectors", type=int, default=1000, help="held-out states per Cortex-M4 run")
    ap.add_argument("--check-states", type=int, default=2000, help="export's TFLM and policy.c check states")
    args = ap.parse_args()
    from dqnc import mcu

    if mcu.missing_tools():
        sys.exit(f"missing {', '.join(mcu.missing_tools())}: apt-get install gcc-arm-none-eabi qemu-system-arm")
    work = Path(tempfile.mkdtemp(prefix="dqnc-mcu-conv-"))
    rows = []
    log("exporting minatar-breakout (sample_models/minatar-breakout-int8)")
    big = export_mcu(ROOT / "sample_models" / "minatar-breakout-int8", work / "breakout", args.check_states)
    rows.append(measure("minatar-breakout (conv 16x3x3/1, dense 128)", big, args.vectors))
    log("building and exporting minatar-small")
    small = export_mcu(small_conv_artifact(work), work / "small", args.check_states)
    rows.append(measure("minatar-small (conv 8x3x3/2, dense 32)", small, args.vectors))
    if args.cartpole_bundle is None:
        log("running recipes/cartpole.yaml")
    cart = args.cartpole_bundle or cartpole_bundle(work / "cartpole")
    rows.append(measure("cartpole (MLP 4-16-16-2)", cart, args.vectors))
    out = HERE / "results" / "mcu_conv.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2, default=str) + "\n", encoding="utf-8")
    print(table(rows))
    print(f"\n(written to {out.relative_to(ROOT)}; work files in {work})")


if __name__ == "__main__":
    main()
