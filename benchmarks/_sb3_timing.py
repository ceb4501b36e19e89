"""SB3 ``model.predict(obs, deterministic=True)`` latency, run as a subprocess by inference.py
in the SB3 venv (benchmarks/.venv-sb3). Prints one JSON object on stdout.

    benchmarks/.venv-sb3/bin/python benchmarks/_sb3_timing.py --nets 128x128,512x512 --obs obs.npy

The DQNs are untrained (random weights): only the cost of a call is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import time_calls  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nets", default="128x128,512x512", help="comma-separated hidden layouts, e.g. 128x128")
    p.add_argument("--obs", required=True, type=Path)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--env", default="CartPole-v1")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads(N); default: torch's own choice (one per core), as users run it")
    args = p.parse_args(argv)

    import gymnasium as gym
    import stable_baselines3
    import torch
    from stable_baselines3 import DQN

    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    rows = [np.asarray(r, np.float32) for r in np.load(args.obs)]
    results = {}
    for net in [n for n in args.nets.split(",") if n]:
        arch = [int(w) for w in net.split("x")]
        # A small buffer: predict() does not touch it, and the default 1M-step buffer only costs memory.
        model = DQN("MlpPolicy", args.env, policy_kwargs=dict(net_arch=arch), buffer_size=1000,
                    learning_starts=0, seed=0, verbose=0, device="cpu")
        results[net] = {"action": time_calls(lambda o: model.predict(o, deterministic=True), rows, args.warmup)}
    out = {
        "results": results,
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "stable-baselines3": stable_baselines3.__version__,
                     "torch": torch.__version__, "gymnasium": gym.__version__, "numpy": np.__version__},
    }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
