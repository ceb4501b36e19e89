"""The eval stage: greedy episodes of any policy artifact, return statistics and gates."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dqnc.artifact import Artifact
from dqnc.envs import rollout
from dqnc.errors import GateFailed


@dataclass(frozen=True)
class EvalConfig:
    episodes: int = 100
    seed: int = 0
    min_return: float | None = None


def run(cfg: EvalConfig, source: Artifact) -> dict[str, Any]:
    """Evaluate ``source`` and return its metrics; raise GateFailed (carrying them) if a gate fails."""
    from dqnc.policy import q_function

    started = time.perf_counter()
    q_fn = q_function(source)
    load_s = time.perf_counter() - started
    t0 = time.perf_counter()
    res = rollout(q_fn, source.env, cfg.episodes, cfg.seed)
    wall = time.perf_counter() - t0
    threshold = source.env.reward_threshold
    r = res.returns
    result: dict[str, Any] = {
        "path": str(source.path),
        "stage": source.stage,
        "env": source.env.id,
        "episodes": cfg.episodes,
        "seed": cfg.seed,
        "mean_return": float(r.mean()),
        "std_return": float(r.std()),
        "min_return": float(r.min()),
        "max_return": float(r.max()),
        "mean_length": float(res.lengths.mean()),
        "reward_threshold": threshold,
        "solved_share": None if threshold is None else float((r >= threshold).mean()),
        "load_seconds": round(load_s, 3),
        "eval_seconds": round(wall, 3),
        "gates": [],
    }
    failures = []
    if cfg.min_return is not None:
        ok = result["mean_return"] >= cfg.min_return
        gate = {"gate": "min_return", "threshold": cfg.min_return, "value": result["mean_return"], "passed": ok}
        result["gates"].append(gate)
        if not ok:
            failures.append(
                f"gate min_return failed: mean return {result['mean_return']:.2f} is below {cfg.min_return:g} "
                f"by {cfg.min_return - result['mean_return']:.2f}"
            )
    if failures:
        raise GateFailed("; ".join(failures), result)
    return result
