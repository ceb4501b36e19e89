"""Train Stable-Baselines3 DQN with rl-baselines3-zoo's tuned config, evaluate it, print one JSON line.

Runs in benchmarks/.venv-sb3 (SB3 + torch), never in dqnc's venv. train_vs_sb3.py starts it as a
subprocess and times the whole process; the timings printed here are in-process only.

    benchmarks/.venv-sb3/bin/python benchmarks/sb3_train.py --env CartPole-v1 --seed 0
"""

from __future__ import annotations

import time

# Taken before the heavy imports, so in-process wall time covers importing torch and SB3 too.
_T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import stable_baselines3  # noqa: E402
import torch  # noqa: E402
from stable_baselines3 import DQN  # noqa: E402

# rl-baselines3-zoo hyperparams/dqn.yml, as quoted in shared/REFERENCE.md. Hard-coded so the
# benchmark does not depend on rl_zoo3; "n_timesteps" is the training budget, the rest go to DQN().
ZOO_DQN: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(
        n_timesteps=50_000, learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
        learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256,
        gradient_steps=128, exploration_fraction=0.16, exploration_final_eps=0.04,
        policy_kwargs=dict(net_arch=[256, 256]),
    ),
    "Acrobot-v1": dict(
        n_timesteps=100_000, learning_rate=6.3e-4, batch_size=128, buffer_size=50_000,
        learning_starts=0, gamma=0.99, target_update_interval=250, train_freq=4,
        gradient_steps=-1, exploration_fraction=0.12, exploration_final_eps=0.1,
        policy_kwargs=dict(net_arch=[256, 256]),
    ),
}


def evaluate(model: DQN, env_id: str, episodes: int, first_seed: int = 10_000) -> np.ndarray:
    """Greedy returns of ``episodes`` episodes; episode i is reset with seed ``first_seed + i``, as
    `dqnc eval --seed FIRST_SEED` does (10,000: dqnc's held-out range), so both tools are judged
    on the same start states."""
    # A plain (non-vectorized) env, so each episode's reset seed is exactly i and no auto-reset
    # of a VecEnv starts the next episode from an unseeded state.
    env = gym.make(env_id)
    returns = np.empty(episodes, dtype=np.float64)
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=first_seed + i)
            total, done = 0.0, False
            while not done:
                action, _ = model.predict(obs, deterministic=True)
                obs, reward, terminated, truncated, _ = env.step(int(action))
                total += float(reward)
                done = terminated or truncated
            returns[i] = total
    finally:
        env.close()
    return returns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", required=True, choices=sorted(ZOO_DQN), help="gymnasium env id")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None,
                   help="override the zoo's n_timesteps (for quick smoke runs only)")
    p.add_argument("--episodes", type=int, default=100, help="greedy evaluation episodes")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads(N); default: torch's own choice (one per core)")
    p.add_argument("--episode-seed", type=int, default=10_000, help="first evaluation episode seed")
    p.add_argument("--eval-callback", action="store_true",
                   help="like dqnc: an EvalCallback (every 2,500 steps, 20 episodes on their own seeds) keeps "
                        "the best model, which is the one evaluated")
    p.add_argument("--save", default=None,
                   help="save the trained model here (.zip); the harness uses it so that both tools "
                        "end their training process with a model on disk")
    args = p.parse_args(argv)

    hp = dict(ZOO_DQN[args.env])
    zoo_steps = int(hp.pop("n_timesteps"))  # popped always: DQN() does not take it
    n_timesteps = zoo_steps if args.steps is None else args.steps

    # Torch's default intra-op thread count is kept unless asked: capping it could handicap SB3.
    # (On a busy machine the default is what hurts: 2 threads on 2 contended cores ran ~60x slower
    # here, so the flag exists to check that case, not for the benchmark proper.)
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    # An env id (not an env object) lets SB3 build its usual Monitor + DummyVecEnv, as the zoo does.
    model = DQN("MlpPolicy", args.env, seed=args.seed, verbose=0, device="cpu", **hp)
    callback = None
    if args.eval_callback:
        import tempfile

        from stable_baselines3.common.callbacks import EvalCallback
        from stable_baselines3.common.env_util import make_vec_env

        best_dir = tempfile.mkdtemp(prefix="sb3-best-")
        # Its own episode seeds (dqnc's train_eval range), never the final evaluation's.
        eval_env = make_vec_env(args.env, n_envs=1, seed=200_000_000 + args.seed * 100_000)
        callback = EvalCallback(eval_env, n_eval_episodes=20, eval_freq=2500, deterministic=True,
                                best_model_save_path=best_dir, verbose=0)
    model.learn(total_timesteps=n_timesteps, callback=callback)
    if callback is not None and callback.best_model_save_path:
        import os

        best = os.path.join(callback.best_model_save_path, "best_model.zip")
        if os.path.isfile(best):
            model = DQN.load(best, device="cpu")
    if args.save:
        model.save(args.save)
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    returns = evaluate(model, args.env, args.episodes, args.episode_seed)
    eval_s = time.perf_counter() - t1

    threshold = gym.spec(args.env).reward_threshold
    mean = float(returns.mean())
    result = {
        "tool": "sb3",
        "env": args.env,
        "seed": args.seed,
        "train_seconds": round(train_s, 3),
        "eval_seconds": round(eval_s, 3),
        # In-process only (misses interpreter start-up); the harness replaces it with its own clock.
        "wall_seconds": round(time.perf_counter() - _T_START, 3),
        "env_steps": n_timesteps,
        "steps_per_second": round(n_timesteps / max(train_s, 1e-9), 1),
        "episodes": args.episodes,
        "episode_seed": args.episode_seed,
        "eval_callback": args.eval_callback,
        "mean_return": mean,
        "std_return": float(returns.std()),
        "reward_threshold": threshold,
        "solved": None if threshold is None else bool(mean >= threshold),
        "torch_threads": torch.get_num_threads(),
        "versions": {"stable_baselines3": stable_baselines3.__version__, "torch": torch.__version__,
                     "gymnasium": gym.__version__},
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
