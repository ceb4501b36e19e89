"""Bring your own pixel DQN: train an SB3 DQN CnnPolicy here, import its zip (and ONNX) into dqnc,
compress it, and compare returns with SB3's own on the same held-out episodes.

Two halves in two venvs, as in import_sb3.py. ``--sb3-part`` runs in benchmarks/.venv-sb3 (SB3 +
CPU torch): it trains a DQN on MinAtar Breakout-v1 with a small custom features extractor (Conv2d
16x3x3 stride 1, ReLU, Flatten, Linear 128, ReLU: dqnc's MinAtar net; MinAtar frames are (10, 10, C)
bool, channels last, so the extractor permutes them to CHW itself, and SB3 transposes only uint8
images), saves dqn.zip and a torch.onnx export, plays --episodes greedy episodes with SB3's own
``predict`` on episode seeds 10,000+i, and keeps torch's Q-values on a sample of the states it
visited. The default half runs in dqnc's venv: `dqnc import` for the zip (and the ONNX file),
max |dQ| against torch on those states (not dqnc's own check), returns on the same episode
seeds with the paired 95% CI of the ratio to SB3's, then `dqnc quantize` (int8), `dqnc distill`
(a smaller student) and `dqnc export --target mcu`, each judged by `dqnc eval --json`.

    bash benchmarks/setup_venv.sh
    PYTHONPATH=. .venv/bin/python benchmarks/import_sb3_pixels.py --steps 500000 --out benchmarks/results/import_sb3_pixels

``--reuse`` keeps a finished SB3 half (the training takes the longest) and redoes dqnc's half;
``--part minatar`` / ``--part atari`` runs one game's dqnc half (two processes can share the work).
``--atari-steps N`` (N > 0) also trains a Nature-CNN CnnPolicy on BreakoutNoFrameskip-v4 through
SB3's make_atari_env for N steps and imports it with dqnc's ``sb3-atari`` env preset (zip and
ONNX; the first import that succeeds is quantized and exported for linux). Writes
``OUT/result-{both,minatar,atari}.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
# benchmarks/minatar.py would shadow the minatar package both halves import: this script needs
# nothing from its own folder.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
ENV = "MinAtar/Breakout-v1"
ATARI_ENV = "BreakoutNoFrameskip-v4"
ATARI_CAP = 2000  # agent steps an Atari evaluation episode may last (both halves)
SEED0 = 10_000  # dqnc eval's default first held-out episode
REF_STATES = 10_000  # torch Q-values kept for the exactness check (>= 2,000 asked)
# dqnc's MinAtar schedule (dqnc/config.py _MINATAR) in SB3's terms: 8 envs, 16 gradient steps
# every 64 agent steps (train_freq counts vector steps), Adam 3e-4, batch 64, 100k buffer.
SB3_MINATAR = dict(learning_rate=3e-4, buffer_size=100_000, learning_starts=5000, batch_size=64, gamma=0.99,
                   train_freq=8, gradient_steps=16, target_update_interval=250, exploration_fraction=0.1,
                   exploration_final_eps=0.05)


# --- the SB3 half (benchmarks/.venv-sb3) ------------------------------------------------------------
def _minatar_extractor() -> type:
    import torch
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
    from torch import nn

    class MinAtarCNN(BaseFeaturesExtractor):
        """Conv2d(C, 16, 3) -> ReLU -> Flatten -> Linear(128) -> ReLU on channels-last frames."""

        def __init__(self, observation_space: Any, features_dim: int = 128) -> None:
            super().__init__(observation_space, features_dim)
            h, w, c = observation_space.shape
            self.cnn = nn.Sequential(nn.Conv2d(c, 16, kernel_size=3, stride=1), nn.ReLU(), nn.Flatten())
            self.linear = nn.Sequential(nn.Linear(16 * (h - 2) * (w - 2), features_dim), nn.ReLU())

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            return self.linear(self.cnn(obs.permute(0, 3, 1, 2)))

    return MinAtarCNN


def _onnx_export(q_net: Any, dummy: Any, path: Path) -> str:
    """torch.onnx.export with the TorchScript exporter (opset 17) where it exists, else the dynamo one."""
    import torch

    q_net = q_net.eval()
    errors = []
    for kwargs in (dict(dynamo=False, opset_version=17), dict(opset_version=18)):
        try:
            torch.onnx.export(q_net, dummy, path, input_names=["obs"], output_names=["q_values"], **kwargs)
            return f"torch.onnx.export({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        except Exception as e:  # noqa: BLE001 - a missing exporter: try the other one, report both
            errors.append(f"{kwargs}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return "failed: " + " | ".join(errors)


def _play(model: Any, make: Any, episodes: int, keep_every: int) -> tuple[np.ndarray, np.ndarray, list]:
    """SB3's own greedy returns on episode seeds SEED0+i, the visited states, every keep_every-th kept."""
    returns, lengths, states = [], [], []
    env = make()
    t = 0
    for i in range(episodes):
        obs, _ = env.reset(seed=SEED0 + i)
        done, total, n = False, 0.0, 0
        while not done:
            if t % keep_every == 0:
                states.append(np.asarray(obs))
            t += 1
            action, _ = model.predict(obs, deterministic=True)
            obs, r, term, trunc, _ = env.step(int(action))
            total += float(r)
            n += 1
            done = term or trunc
        returns.append(total)
        lengths.append(n)
    env.close()
    return np.asarray(returns), np.asarray(lengths), states


def sb3_part(out: Path, steps: int, seed: int, episodes: int) -> None:
    import gymnasium as gym
    import minatar.gym
    import torch
    from stable_baselines3 import DQN
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)  # a shared 2-core machine: see import_sb3.py
    minatar.gym.register_envs()
    vec = make_vec_env(ENV, n_envs=8, seed=seed)
    model = DQN("CnnPolicy", vec, seed=seed, verbose=0, policy_kwargs=dict(
        features_extractor_class=_minatar_extractor(), features_extractor_kwargs=dict(features_dim=128),
        net_arch=[]), **SB3_MINATAR)
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    train_s = time.perf_counter() - t0
    model.save(out / "dqn.zip")
    shape = model.observation_space.shape
    onnx_how = _onnx_export(model.policy.q_net, torch.zeros(1, *shape), out / "dqn.onnx")
    returns, lengths, states = _play(model, lambda: gym.make(ENV), episodes, keep_every=7)
    pick = np.random.default_rng(0).choice(len(states), min(REF_STATES, len(states)), replace=False)
    s = np.stack(states)[np.sort(pick)]
    with torch.no_grad():  # torch's own forward: the policy's preprocessing (bool -> float) included
        q = model.policy.q_net(torch.as_tensor(s.astype(np.float32))).numpy()
    np.savez_compressed(out / "sb3_reference.npz", states=s, q=q, returns=returns, lengths=lengths)
    (out / "sb3.json").write_text(json.dumps({
        "env": ENV, "steps": steps, "seed": seed, "train_seconds": round(train_s, 1), "episodes": episodes,
        "mean_return": float(returns.mean()), "onnx_export": onnx_how, "hyperparameters": SB3_MINATAR,
        "torch": torch.__version__, "obs_space": str(model.observation_space)}))


def sb3_atari_part(out: Path, steps: int, seed: int, episodes: int) -> None:
    """A Nature-CNN CnnPolicy trained briefly through SB3's own Atari stack (make_atari_env,
    VecFrameStack 4, VecTransposeImage), rl-zoo's DQN hyperparameters with a smaller buffer."""
    import ale_py
    import gymnasium as gym
    import torch
    from gymnasium.wrappers import TimeLimit
    from stable_baselines3 import DQN
    from stable_baselines3.common.atari_wrappers import AtariWrapper
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecFrameStack, VecTransposeImage

    torch.set_num_threads(1)
    gym.register_envs(ale_py)
    vec = VecFrameStack(make_atari_env(ATARI_ENV, n_envs=1, seed=seed), n_stack=4)
    model = DQN("CnnPolicy", vec, seed=seed, verbose=0, buffer_size=20_000, learning_rate=1e-4, batch_size=32,
                learning_starts=min(10_000, steps // 2), target_update_interval=1000, train_freq=4,
                gradient_steps=1, exploration_fraction=0.1, exploration_final_eps=0.01, optimize_memory_usage=False)
    t0 = time.perf_counter()
    model.learn(total_timesteps=steps)
    train_s = time.perf_counter() - t0
    model.save(out / "dqn_atari.zip")
    onnx_how = _onnx_export(model.policy.q_net, torch.zeros(1, 4, 84, 84), out / "dqn_atari.onnx")
    returns, states = [], []
    for i in range(episodes):  # SB3's evaluation stack: no episodic life, no reward clipping
        env = VecTransposeImage(VecFrameStack(DummyVecEnv([lambda: TimeLimit(AtariWrapper(
            gym.make(ATARI_ENV), terminal_on_life_loss=False, clip_reward=False), ATARI_CAP)]), 4))
        env.seed(SEED0 + i)
        obs, done, total = env.reset(), False, 0.0
        while not done:
            states.append(obs[0])
            action, _ = model.predict(obs, deterministic=True)
            obs, r, dones, _ = env.step(action)
            total += float(r[0])
            done = bool(dones[0])
        returns.append(total)
        env.close()
    s = np.stack(states)[:: max(1, len(states) // REF_STATES)][:REF_STATES]
    with torch.no_grad():
        q = model.policy.q_net(torch.as_tensor(s)).numpy()
    np.savez_compressed(out / "sb3_atari_reference.npz", states=s, q=q, returns=np.asarray(returns))
    (out / "sb3_atari.json").write_text(json.dumps({
        "env": ATARI_ENV, "steps": steps, "seed": seed, "train_seconds": round(train_s, 1), "episodes": episodes,
        "mean_return": float(np.mean(returns)), "onnx_export": onnx_how}))



# --- dqnc's half (dqnc's venv) ----------------------------------------------------------------------
def _dqnc(*args: str) -> tuple[dict | None, str, float]:
    """Run one dqnc command with --json (and --force where it writes): its JSON (None on failure),
    its error line, seconds."""
    cmd = [sys.executable, "-m", "dqnc", *args, *(["--force"] if "-o" in args else []), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    secs = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode or not lines:
        err = " ".join(ln.strip(" │╭╮╰╯─") for ln in proc.stderr.splitlines()).split()
        return None, f"exit {proc.returncode}: {' '.join(err)[-400:]}", secs
    return json.loads(lines[-1]), "", secs


def _paired(ref: np.ndarray, new: np.ndarray, seed: int = 0, resamples: int = 4000) -> dict:
    """new/ref mean-return ratio with a paired bootstrap 95% CI (episode i of both from one seed)."""
    ref, new = np.asarray(ref, np.float64), np.asarray(new, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(ref), (resamples, len(ref)))
    ratios = new[idx].mean(axis=1) / np.maximum(ref[idx].mean(axis=1), 1e-9)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return {"mean_return": float(new.mean()), "sb3_mean_return": float(ref.mean()),
            "ratio": float(new.mean() / max(ref.mean(), 1e-9)), "ratio_ci95": [float(lo), float(hi)],
            "episodes_identical": int(np.sum(ref == new)), "episodes": int(len(ref))}


def _vs_torch(q_fn: Any, ref: Any) -> dict:
    """Max |dQ| against torch's own Q-values on SB3's visited states (not dqnc's own check)."""
    q = np.asarray(q_fn(ref["states"].astype(np.float32)))
    dq = float(np.max(np.abs(q - ref["q"])))
    q_range = float(ref["q"].max() - ref["q"].min())
    top2 = np.sort(ref["q"], axis=1)[:, -2:]
    return {"states": int(len(q)), "max_abs_dq": dq, "q_range": q_range, "rel": dq / q_range,
            "action_mismatches": int(np.sum(q.argmax(1) != ref["q"].argmax(1))),
            "exact_ties": int(np.sum(top2[:, 1] == top2[:, 0]))}


def _fidelity_vs_torch(q_fn: Any, ref: Any) -> dict:
    """Agreement and regret of a (compressed) policy's greedy actions against torch's Q-values."""
    from dqnc.fidelity import fidelity

    q = np.asarray(q_fn(ref["states"].astype(np.float32)))
    f = fidelity(ref["q"], q.argmax(1))
    return {"states": int(len(q))} | {k: f[k] for k in ("agreement", "decisive_agreement", "decisive_share", "regret")}


def _import(out: Path, name: str, env: str, env_kwargs: dict | None, ref: Any, episodes: int) -> dict:
    from dqnc import artifact as art
    from dqnc.envs import rollout
    from dqnc.policy import q_function

    dest = out / f"imported-{name.replace('.', '-')}"
    args = ["import", str(out / name), "--env", env, "-o", str(dest)]
    if env_kwargs:
        args += ["--env-kwargs", json.dumps(env_kwargs)]
    imp, err, secs = _dqnc(*args)
    res: dict[str, Any] = {"command": " ".join(["dqnc", *args]), "seconds": secs}
    if imp is None:
        return res | {"error": err}
    a = art.load(dest)
    q_fn = q_function(a)
    returns = rollout(q_fn, a.env, episodes, SEED0).returns
    return res | {"dqnc_check": {k: v for k, v in imp["metrics"]["check"].items() if k != "by_runtime"},
                  "vs_torch": _vs_torch(q_fn, ref), "vs_sb3": _paired(ref["returns"][:episodes], returns)}


def _compressed(out: Path, ref: Any, episodes: int, label: str, make: list[str], target: str | None,
                src: str = "imported-dqn-zip") -> dict:
    """One compression command, then `dqnc eval --json` against the import ``src`` and returns vs
    SB3's; with ``target``, `dqnc export --target` too."""
    from dqnc import artifact as art
    from dqnc.envs import rollout
    from dqnc.policy import q_function

    src_path, dest = out / src, out / label
    made, err, secs = _dqnc(*make, "-o", str(dest))
    res: dict[str, Any] = {"command": " ".join(["dqnc", *make, "-o", str(dest)]), "seconds": secs}
    if made is None:
        return res | {"error": err}
    ev, err, _ = _dqnc("eval", str(dest), "-n", str(episodes), "--seed", str(SEED0), "--reference", str(src_path))
    if ev is None:
        return res | {"eval_error": err}
    vs = ev  # eval --json: the comparison with --reference at the top level
    res["eval"] = {**{k: ev[k] for k in ("mean_return", "return_ci95", "size_bytes", "params", "runtime") if k in ev},
                   "latency_us_p50": ev.get("latency_p50_us"),
                   **{k: vs[k] for k in ("agreement", "decisive_agreement", "decisive_share", "regret",
                                         "return_drop_frac", "return_drop_frac_ci95", "q_rel_error") if k in vs}}
    res["eval_command"] = f"dqnc eval {dest} -n {episodes} --seed {SEED0} --reference {src_path} --json"
    a = art.load(dest)  # per-episode returns as `dqnc eval` plays them (LiteRT for a .tflite)
    q_fn = q_function(a)
    res["vs_sb3"] = _paired(ref["returns"][:episodes], rollout(q_fn, a.env, episodes, SEED0).returns)
    res["vs_torch"] = _fidelity_vs_torch(q_fn, ref)
    if target:
        bundle = out / f"{label}-{target}"
        ex, err, secs = _dqnc("export", str(dest), "--target", target, "-o", str(bundle))
        res["export"] = ({"error": err} if ex is None else
                         {"command": f"dqnc export {dest} --target {target} -o {bundle}", "seconds": secs,
                          "metrics": ex.get("metrics")})
    return res


def dqnc_part(out: Path, episodes: int) -> dict:
    ref = dict(np.load(out / "sb3_reference.npz"))
    result: dict[str, Any] = {"sb3": json.loads((out / "sb3.json").read_text())}
    for name in ("dqn.zip", "dqn.onnx"):
        result[name] = _import(out, name, ENV, None, ref, episodes)
    if "error" in result["dqn.zip"]:
        return result
    src = str(out / "imported-dqn-zip")
    result["int8"] = _compressed(out, ref, episodes, "int8", ["quantize", src], "mcu")
    result["student"] = _compressed(out, ref, episodes, "student",
                                    ["distill", src, "--conv", "[[8, 3, 1]]", "--hidden", "64"], None)
    if "error" not in result["student"]:
        result["student-int8"] = _compressed(out, ref, episodes, "student-int8",
                                             ["quantize", str(out / "student")], "mcu")
    return result


def dqnc_atari_part(out: Path, episodes: int) -> dict:
    ref = dict(np.load(out / "sb3_atari_reference.npz"))
    result: dict[str, Any] = {"sb3": json.loads((out / "sb3_atari.json").read_text())}
    for name in ("dqn_atari.zip", "dqn_atari.onnx"):
        result[name] = _import(out, name, ATARI_ENV, {"preset": "sb3-atari", "max_episode_steps": ATARI_CAP},
                               ref, episodes)
    src = next((f"imported-{n.replace('.', '-')}" for n in ("dqn_atari.zip", "dqn_atari.onnx")
                if "error" not in result[n]), None)
    if src:  # linux: TFLM's reference kernels take ~0.1 s a Nature-CNN action
        result["int8"] = _compressed(out, ref, episodes, "atari-int8", ["quantize", str(out / src)], "linux", src=src)
    return result

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "import_sb3_pixels")
    ap.add_argument("--steps", type=int, default=500_000, help="SB3 training steps on MinAtar Breakout-v1")
    ap.add_argument("--episodes", type=int, default=1000, help="held-out episodes (seeds 10,000+i)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atari-steps", type=int, default=0, help="also train on BreakoutNoFrameskip-v4 (0 = skip)")
    ap.add_argument("--atari-episodes", type=int, default=10)
    ap.add_argument("--reuse", action="store_true", help="keep a finished SB3 half")
    ap.add_argument("--part", choices=["both", "minatar", "atari"], default="both",
                    help="dqnc's half: both games, or one (two processes can share the work)")
    ap.add_argument("--sb3-part", choices=["minatar", "atari"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sb3_part == "minatar":
        sb3_part(args.out, args.steps, args.seed, args.episodes)
        return
    if args.sb3_part == "atari":
        sb3_atari_part(args.out, args.atari_steps, args.seed, args.atari_episodes)
        return
    sb3_python = HERE / ".venv-sb3" / "bin" / "python"
    if not sb3_python.is_file():
        sys.exit("benchmarks/.venv-sb3 is missing: run bash benchmarks/setup_venv.sh first")
    common = ["--out", str(args.out), "--seed", str(args.seed)]
    if args.part != "atari" and not (args.reuse and (args.out / "sb3.json").is_file()):
        subprocess.run([str(sb3_python), __file__, "--sb3-part", "minatar", "--steps", str(args.steps),
                        "--episodes", str(args.episodes), *common], check=True)
    if args.atari_steps and args.part != "minatar" and not (args.reuse and (args.out / "sb3_atari.json").is_file()):
        subprocess.run([str(sb3_python), __file__, "--sb3-part", "atari", "--atari-steps", str(args.atari_steps),
                        "--atari-episodes", str(args.atari_episodes), *common], check=True)
    result = {}
    if args.part in ("both", "minatar"):
        result["minatar"] = dqnc_part(args.out, args.episodes)
    if args.atari_steps and args.part in ("both", "atari"):
        result["atari"] = dqnc_atari_part(args.out, args.atari_episodes)
    (args.out / f"result-{args.part}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
