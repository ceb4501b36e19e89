"""How closely one policy's Q-values and greedy actions follow another's, on the same states.

A DQN's Q-values share a large per-state offset and differ by small advantages, so raw greedy
agreement is dominated by near-ties where either action is as good. Agreement is therefore also
reported on *decisive* states: those where the reference's top-two Q gap is at least
``decisive_frac`` of the reference's Q range over the states compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DECISIVE_FRAC = 0.01


def agreement(q_ref: np.ndarray, q_new: np.ndarray, decisive_frac: float = DECISIVE_FRAC,
              centered: bool = False) -> dict[str, Any]:
    """Agreement of ``q_new`` with ``q_ref`` (both ``[N, actions]``).

    ``centered``: ``q_new`` holds ``Q - mean_a(Q)`` (what integer models output); Q errors are
    then measured against the reference's centered values. Decisive states are always defined on
    the reference's raw Q-values.
    """
    q_ref = np.asarray(q_ref, np.float64)
    q_new = np.asarray(q_new, np.float64)
    if q_ref.shape != q_new.shape or q_ref.ndim != 2:
        raise ValueError(f"Q-value arrays must have the same [N, actions] shape, got {q_ref.shape} and {q_new.shape}")
    same = q_ref.argmax(1) == q_new.argmax(1)
    q_range = float(q_ref.max() - q_ref.min()) if q_ref.size else 0.0
    top2 = np.sort(q_ref, axis=1)[:, -2:] if q_ref.shape[1] > 1 else np.zeros((len(q_ref), 2))
    gap = top2[:, 1] - top2[:, 0]
    decisive = gap >= decisive_frac * q_range if q_range > 0 else np.ones(len(q_ref), bool)
    ref_cmp = q_ref - q_ref.mean(axis=1, keepdims=True) if centered else q_ref
    err = np.abs(q_new - ref_cmp)
    return {
        "states": int(len(q_ref)),
        "agreement": float(same.mean()) if len(same) else 1.0,
        "decisive_states": int(decisive.sum()),
        "decisive_agreement": float(same[decisive].mean()) if decisive.any() else 1.0,
        "q_mae": float(err.mean()) if err.size else 0.0,
        "q_max_abs_error": float(err.max()) if err.size else 0.0,
        "q_p99_abs_error": float(np.percentile(err, 99)) if err.size else 0.0,
        "q_range": q_range,
        # p99, not max: a state outside the calibration range saturates an int8 input and is
        # reported by the max; one such state should not condemn a model.
        "q_rel_error": float(np.percentile(err, 99) / q_range) if q_range > 0 and err.size else 0.0,
    }
