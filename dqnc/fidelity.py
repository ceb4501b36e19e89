"""One vocabulary for how faithfully a compressed policy follows its reference, every state counted.

The same names appear in the CLI, recipes, quantize's check, JSON and reports:

- ``mean_return`` with ``return_ci95``: the 95% confidence interval of the mean over episodes
  (Student t; episodes are independent draws of start states).
- ``regret``: the reference's own loss from the action the new policy chose,
  ``Q_ref(s, a_ref) - Q_ref(s, a_new)``, on every visited state. Reported as a mean and a p99,
  relative to the reference's *action spread* (the mean over those states of
  ``max_a Q_ref - min_a Q_ref``): 0 means the reference's choice everywhere, 1 means as bad on
  average as the worst action. A flip on a near-tie costs almost nothing; a flip where one action
  is clearly better costs a lot, which raw agreement cannot tell apart.
- ``agreement``: the share of visited states where both pick the same action (first maximum wins).
- ``decisive_agreement``: agreement on *decisive* states only, those where the reference's top-two
  gap is at least ``DECISIVE_FRAC`` of its Q range over the states compared; always reported with
  ``decisive_states`` (count) and ``decisive_share``, because on a well-trained DQN most visited
  states are near-ties and the decisive ones can be a few percent.
- ``return_drop``: reference mean minus new mean on the same episode seeds, with the 95% CI of the
  paired difference, as a fraction of ``|reference mean|`` (``return_drop_frac``) and of the
  reference-to-random gap.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DECISIVE_FRAC = 0.01

# Two-sided 95% quantiles of Student's t for small degrees of freedom; larger use a series.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` degrees of freedom."""
    if df < 1:
        return math.inf
    if df in _T95:
        return _T95[df]
    if df < 30:
        lo = max(k for k in _T95 if k < df)
        hi = min(k for k in _T95 if k > df)
        return _T95[lo] + (_T95[hi] - _T95[lo]) * (df - lo) / (hi - lo)
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% confidence interval of the mean."""
    v = np.asarray(values, np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, -math.inf, math.inf
    half = t95(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def return_stats(returns: np.ndarray) -> dict[str, Any]:
    mean, lo, hi = mean_ci95(returns)
    r = np.asarray(returns, np.float64)
    return {"mean_return": mean, "return_ci95": [lo, hi], "std_return": float(r.std()),
            "min_return": float(r.min()), "max_return": float(r.max())}


def actions_of(scores: np.ndarray) -> np.ndarray:
    """Greedy actions, ties to the first maximum (as argmax, TFLite Micro firmware and policy.c do)."""
    return np.asarray(scores).argmax(axis=1)


def fidelity(q_ref: np.ndarray, new_actions: np.ndarray, decisive_frac: float = DECISIVE_FRAC) -> dict[str, Any]:
    """Regret, agreement and decisive agreement of ``new_actions`` against the reference's Q-values
    ``q_ref`` (``[N, actions]``) on the same N states."""
    q = np.asarray(q_ref, np.float64)
    a_new = np.asarray(new_actions).astype(np.int64).ravel()
    if q.ndim != 2 or len(q) != len(a_new):
        raise ValueError(f"need Q-values [N, actions] and N actions, got {q.shape} and {a_new.shape}")
    n = len(q)
    if n == 0:
        raise ValueError("no states to compare")
    a_ref = q.argmax(axis=1)
    rows = np.arange(n)
    regret = q[rows, a_ref] - q[rows, a_new]
    spread_per_state = q.max(axis=1) - q.min(axis=1)
    spread = float(spread_per_state.mean())
    rel = regret / spread if spread > 0 else np.zeros(n)
    q_range = float(q.max() - q.min())
    top2 = np.sort(q, axis=1)[:, -2:] if q.shape[1] > 1 else np.zeros((n, 2))
    gap = top2[:, 1] - top2[:, 0]
    decisive = gap >= decisive_frac * q_range if q_range > 0 else np.ones(n, bool)
    same = a_ref == a_new
    return {
        "states": int(n),
        "agreement": float(same.mean()),
        "decisive_states": int(decisive.sum()),
        "decisive_share": float(decisive.mean()),
        "decisive_agreement": float(same[decisive].mean()) if decisive.any() else 1.0,
        "regret": float(rel.mean()),
        "regret_p99": float(np.percentile(rel, 99)),
        "regret_max": float(rel.max()),
        "action_spread": spread,
    }


def return_drop(ref_returns: np.ndarray, new_returns: np.ndarray, random_mean: float | None = None) -> dict[str, Any]:
    """How much return the new policy loses against the reference on the same episode seeds
    (paired: episode i of both starts from the same state)."""
    ref = np.asarray(ref_returns, np.float64)
    new = np.asarray(new_returns, np.float64)
    diff_mean, lo, hi = mean_ci95(ref - new) if len(ref) == len(new) else (float(ref.mean() - new.mean()),
                                                                          -math.inf, math.inf)
    scale = max(abs(float(ref.mean())), 1e-9)
    out = {
        "return_drop": diff_mean,
        "return_drop_ci95": [lo, hi],
        "return_drop_frac": diff_mean / scale,
        "return_drop_frac_ci95": [lo / scale, hi / scale],
    }
    if random_mean is not None:
        out["return_drop_of_random_gap"] = diff_mean / max(float(ref.mean()) - random_mean, 1e-9)
    return out
