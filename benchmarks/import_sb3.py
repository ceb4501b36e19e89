"""Train an SB3 DQN (rl-zoo's CartPole config), save its .zip and an ONNX export, import both into dqnc.

Two halves in two venvs: ``--sb3-part OUT`` runs in benchmarks/.venv-sb3 (SB3 + torch) and writes
dqn.zip, dqn.onnx, and torch's Q-values on rollout states; the default half runs in dqnc's venv,
imports both files with `dqnc import`, compares the imports' Q-values with torch's (independently
of dqnc's own check) and their greedy returns with SB3's on the same episode seeds, and prints one
JSON object. With --compress it also prunes, quantizes (int8) and exports the zip import.

    PYTHONPATH=. .venv/bin/python benchmarks/import_sb3.py --steps 50000 --out benchmarks/results/import_sb3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
EPISODES = 100
SEED0 = 10_000  # dqnc eval's default first held-out episode


def sb3_part(out: Path, steps: int, seed: int) -> None:
    import gymnasium as gym
    import torch
    from stable_baselines3 import DQN

    sys.path.insert(0, str(HERE))
    from sb3_train import ZOO_DQN

    # One torch thread: on a 2-core machine shared with another job, 2 contended threads ran
    # SB3 ~20x slower (see BENCHMARKS section 1).
    torch.set_num_threads(1)
    cfg = dict(ZOO_DQN["CartPole-v1"])
    cfg.pop("n_timesteps")
    t0 = time.perf_counter()
    model = DQN("MlpPolicy", "CartPole-v1", seed=seed, verbose=0, **cfg)
    model.learn(total_timesteps=steps)
    train_s = time.perf_counter() - t0
    model.save(out / "dqn.zip")
    q_net = model.policy.q_net.eval()
    dummy = torch.zeros(1, 4)
    try:  # the TorchScript exporter: what SB3's docs show, and no onnxscript needed
        torch.onnx.export(q_net, dummy, out / "dqn.onnx", input_names=["obs"], output_names=["q_values"],
                          dynamic_axes={"obs": {0: "batch"}}, opset_version=17, dynamo=False)
    except TypeError:
        torch.onnx.export(q_net, dummy, out / "dqn.onnx", input_names=["obs"], output_names=["q_values"],
                          dynamic_axes={"obs": {0: "batch"}}, opset_version=17)
    env = gym.make("CartPole-v1")
    returns, states = [], []
    for i in range(EPISODES):
        obs, _ = env.reset(seed=SEED0 + i)
        done, total = False, 0.0
        while not done:
            states.append(obs)
            action, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(int(action))
            total += float(r)
            done = term or trunc
        returns.append(total)
    states_a = np.asarray(states, np.float32)
    with torch.no_grad():
        q = q_net(torch.as_tensor(states_a)).numpy()
    np.savez(out / "sb3_reference.npz", states=states_a, q=q, returns=np.asarray(returns))
    (out / "sb3.json").write_text(json.dumps({"train_seconds": train_s, "steps": steps, "seed": seed,
                                              "mean_return": float(np.mean(returns))}))


def dqnc_part(out: Path, compress: bool) -> dict:
    from dqnc import artifact as art
    from dqnc.config import EvalConfig
    from dqnc.evaluate import run as run_eval
    from dqnc.policy import q_function

    ref = np.load(out / "sb3_reference.npz")
    result: dict = {"sb3": json.loads((out / "sb3.json").read_text())}
    for name in ("dqn.zip", "dqn.onnx"):
        dest = out / f"imported-{name.replace('.', '-')}"
        cmd = [sys.executable, "-m", "dqnc", "import", str(out / name), "--env", "CartPole-v1", "-o", str(dest),
               "--force", "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            result[name] = {"exit": proc.returncode, "error": proc.stderr.strip()}
            continue
        imp = json.loads(proc.stdout)
        a = art.load(dest)
        q = q_function(a)(ref["states"])
        dq = float(np.max(np.abs(q - ref["q"])))
        ev = run_eval(EvalConfig(episodes=EPISODES, seed=SEED0, latency_samples=0), a)
        result[name] = {
            "command": " ".join(["dqnc", *cmd[3:]]), "import_seconds": round(time.perf_counter() - t0, 1),
            "dqnc_check": imp["metrics"]["check"] | {"by_runtime": None},
            "vs_torch": {"states": int(len(q)), "max_abs_dq": dq,
                         "rel": dq / float(ref["q"].max() - ref["q"].min()),
                         "actions_identical": bool(np.array_equal(q.argmax(1), ref["q"].argmax(1)))},
            "mean_return": ev["mean_return"], "sb3_mean_return": float(ref["returns"].mean()),
        }
    if compress and "dqnc_check" in result.get("dqn.zip", {}):
        src = out / "imported-dqn-zip"
        steps = [["prune", str(src), "-o", str(out / "pruned"), "--sparsity", "0.8"],
                 ["quantize", str(out / "pruned"), "-o", str(out / "int8")],
                 ["export", str(out / "int8"), "-o", str(out / "bundle")]]
        for s in steps:
            subprocess.run([sys.executable, "-m", "dqnc", *s, "--force", "--json"], check=True, capture_output=True)
        ev = run_eval(EvalConfig(episodes=EPISODES, seed=SEED0, latency_samples=0), art.load(out / "int8"))
        sb3 = float(ref["returns"].mean())
        result["pruned80_int8"] = {"mean_return": ev["mean_return"], "regret_vs_sb3": sb3 - ev["mean_return"],
                                   "size_bytes": ev["size_bytes"]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "import_sb3")
    ap.add_argument("--steps", type=int, default=50_000, help="SB3 training steps (rl-zoo: 50,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compress", action="store_true", help="also prune 80% + int8 + export the zip import")
    ap.add_argument("--sb3-part", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sb3_part:
        sb3_part(args.out, args.steps, args.seed)
        return
    sb3_python = HERE / ".venv-sb3" / "bin" / "python"
    if not sb3_python.is_file():
        sys.exit("benchmarks/.venv-sb3 is missing: run bash benchmarks/setup_venv.sh first")
    subprocess.run([str(sb3_python), __file__, "--sb3-part", "--out", str(args.out), "--steps", str(args.steps),
                    "--seed", str(args.seed)], check=True)
    print(json.dumps(dqnc_part(args.out, args.compress), indent=2))


if __name__ == "__main__":
    main()
