"""dqnc's ``sb3-atari`` env preset against SB3's own Atari stack, observation by observation.

SB3 side (benchmarks/.venv-sb3): ``make_atari_env`` (AtariWrapper with terminal_on_life_loss=False
and clip_reward=False, as for evaluation) + ``VecFrameStack(4)`` + ``VecTransposeImage``. dqnc
side: ``make_env(ID, {"preset": "sb3-atari"})``. Both are reset with the same seed and fed the same
seeded random actions until the first episode end (or --steps); every observation, reward and
end-of-episode flag is compared. Prints one JSON object; exits 1 on any difference.

    bash benchmarks/setup_venv.sh
    PYTHONPATH=. .venv/bin/python benchmarks/atari_preset_vs_sb3.py --seeds 3 --steps 3000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/minatar.py shadows minatar


def _actions(seed: int, steps: int, n_actions: int) -> np.ndarray:
    return np.random.default_rng([seed, 1]).integers(0, n_actions, steps)


def sb3_side(env_id: str, seed: int, steps: int, out: Path) -> None:
    import ale_py
    import gymnasium as gym
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack, VecTransposeImage

    gym.register_envs(ale_py)
    env = VecTransposeImage(VecFrameStack(make_atari_env(
        env_id, n_envs=1, seed=seed, wrapper_kwargs=dict(terminal_on_life_loss=False, clip_reward=False)), 4))
    obs = [env.reset()[0]]
    rewards, dones = [], []
    for a in _actions(seed, steps, env.action_space.n):
        o, r, d, _ = env.step(np.array([a]))
        rewards.append(float(r[0]))
        dones.append(bool(d[0]))
        if d[0]:  # a VecEnv returns the next episode's first frame: stop here
            break
        obs.append(o[0])
    env.close()
    np.savez_compressed(out, obs=np.stack(obs), rewards=np.asarray(rewards), dones=np.asarray(dones))


def dqnc_side(env_id: str, seed: int, steps: int) -> dict:
    from dqnc.envs import make_env

    env = make_env(env_id, {"preset": "sb3-atari"})
    o, _ = env.reset(seed=seed)
    obs, rewards, dones = [o], [], []
    for a in _actions(seed, steps, env.action_space.n):
        o, r, term, trunc, _ = env.step(int(a))
        rewards.append(float(r))
        dones.append(bool(term or trunc))
        if term or trunc:
            break
        obs.append(o)
    env.close()
    return {"obs": np.stack(obs), "rewards": np.asarray(rewards), "dones": np.asarray(dones)}


def compare(env_id: str, seed: int, steps: int, sb3_python: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sb3.npz"
        subprocess.run([str(sb3_python), __file__, "--sb3-side", "--env", env_id, "--seeds", str(seed),
                        "--steps", str(steps), "--npz", str(path)], check=True)
        ref = dict(np.load(path))
    ours = dqnc_side(env_id, seed, steps)
    n = min(len(ref["obs"]), len(ours["obs"]))
    diff = np.abs(ref["obs"][:n].astype(np.int16) - ours["obs"][:n].astype(np.int16))
    first_reset = ref["obs"][0]
    return {"seed": seed, "steps": int(len(ref["rewards"])), "dqnc_steps": int(len(ours["rewards"])),
            "obs_shape": list(ours["obs"].shape[1:]), "obs_dtype": str(ours["obs"].dtype),
            "observations_compared": n, "max_abs_pixel_diff": int(diff.max()),
            "differing_observations": int((diff.reshape(n, -1).max(axis=1) > 0).sum()),
            "rewards_equal": bool(np.array_equal(ref["rewards"], ours["rewards"])),
            "dones_equal": bool(np.array_equal(ref["dones"], ours["dones"])),
            "sb3_reset_zero_frames": int(sum(not first_reset[i].any() for i in range(len(first_reset)))),
            "return": float(ours["rewards"].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="BreakoutNoFrameskip-v4,PongNoFrameskip-v4,MsPacmanNoFrameskip-v4",
                    help="comma-separated ids (the SB3 side: one id)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (the SB3 side: that one seed)")
    ap.add_argument("--steps", type=int, default=3000, help="random agent steps per seed, at most")
    ap.add_argument("--sb3-side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sb3_side:
        sb3_side(args.env, args.seeds, args.steps, args.npz)
        return
    sb3_python = HERE / ".venv-sb3" / "bin" / "python"
    if not sb3_python.is_file():
        sys.exit("benchmarks/.venv-sb3 is missing: run bash benchmarks/setup_venv.sh first")
    runs = [{"env": env, **compare(env, seed, args.steps, sb3_python)}
            for env in args.env.split(",") for seed in range(args.seeds)]
    same = all(r["max_abs_pixel_diff"] == 0 and r["rewards_equal"] and r["dones_equal"]
               and r["steps"] == r["dqnc_steps"] for r in runs)
    print(json.dumps({"identical": same, "runs": runs}, indent=2))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
