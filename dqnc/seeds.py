"""Episode seeds by purpose: every rollout a stage makes comes from its own disjoint range.

Each purpose owns a block of 100,000,000 episode seeds. Within a block, a stage's own ``seed``
option selects a sub-block of 100,000 episodes (``base + seed * 100_000 + i``), so two stages
(or two runs with different seeds) never replay each other's episodes, and no stage ever rolls
out from the held-out block that `dqnc eval` and recipe evaluation use by default.

| purpose        | episode seeds                  | used by                                          |
|----------------|--------------------------------|--------------------------------------------------|
| heldout        | 0 - 99,999,999                 | `dqnc eval`, recipe evaluation (default 10,000+) |
| train          | 100,000,000 - 199,999,999      | training episodes (env resets)                   |
| train_eval     | 200,000,000 - 299,999,999      | training-time evaluation (best weights)          |
| train_confirm  | 300,000,000 - 399,999,999      | confirming an early stop on other episodes       |
| distill        | 400,000,000 - 499,999,999      | prune/distill rollouts and DAgger rounds         |
| calibration    | 500,000,000 - 599,999,999      | quantize calibration                             |
| selection      | 600,000,000 - 699,999,999      | quantize candidate selection                     |
| check          | 700,000,000 - 799,999,999      | prune's and quantize's held-out check            |
| export_check   | 800,000,000 - 899,999,999      | export's runtime verification states             |
| validation     | 900,000,000 - 999,999,999      | choosing defaults (benchmarks, sweeps)           |

Defaults are chosen on the validation block and reported on the held-out one. Episodes 0-9,999
of the held-out block were looked at while dqnc 0.1/0.2 defaults were tuned, so the default
evaluation starts at 10,000.
"""

from __future__ import annotations

BLOCK = 100_000_000
PER_SEED = 100_000
MAX_STAGE_SEED = BLOCK // PER_SEED - 1  # 999

PURPOSES: dict[str, int] = {
    "heldout": 0,
    "train": 1 * BLOCK,
    "train_eval": 2 * BLOCK,
    "train_confirm": 3 * BLOCK,
    "distill": 4 * BLOCK,
    "calibration": 5 * BLOCK,
    "selection": 6 * BLOCK,
    "check": 7 * BLOCK,
    "export_check": 8 * BLOCK,
    "validation": 9 * BLOCK,
}

# `dqnc eval --seed` default: the first held-out episode no dqnc version was tuned on.
EVAL_SEED = 10_000


def episode_seed(purpose: str, stage_seed: int = 0) -> int:
    """The first episode seed for ``purpose`` and a stage's own ``seed`` option."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown seed purpose {purpose!r}; known: {', '.join(PURPOSES)}")
    if not 0 <= stage_seed <= MAX_STAGE_SEED:
        raise ValueError(f"stage seed must be in 0..{MAX_STAGE_SEED}, got {stage_seed}")
    return PURPOSES[purpose] + stage_seed * PER_SEED


def purpose_of(seed: int) -> str:
    """Which purpose's block an episode seed falls in ('outside' past the last block)."""
    for name, base in PURPOSES.items():
        if base <= seed < base + BLOCK:
            return name
    return "outside"
