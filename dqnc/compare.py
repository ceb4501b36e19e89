"""Q-value errors of one model against another on the same states (a diagnostic, not a gate by
default: models that output action scores rather than Q-values are compared on centered values).

Action fidelity (regret, agreement, decisive agreement) lives in :mod:`dqnc.fidelity`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def q_errors(q_ref: np.ndarray, q_new: np.ndarray, centered: bool = False) -> dict[str, Any]:
    """|Q_new - Q_ref| statistics (both ``[N, actions]``); with ``centered`` the reference is
    centered per state first (``q_new`` holds ``Q - mean_a(Q)``, as integer models output)."""
    q_ref = np.asarray(q_ref, np.float64)
    q_new = np.asarray(q_new, np.float64)
    if q_ref.shape != q_new.shape or q_ref.ndim != 2:
        raise ValueError(f"Q-value arrays must have the same [N, actions] shape, got {q_ref.shape} and {q_new.shape}")
    q_range = float(q_ref.max() - q_ref.min()) if q_ref.size else 0.0
    ref_cmp = q_ref - q_ref.mean(axis=1, keepdims=True) if centered else q_ref
    err = np.abs(q_new - ref_cmp)
    p99 = float(np.percentile(err, 99)) if err.size else 0.0
    return {
        "q_mae": float(err.mean()) if err.size else 0.0,
        "q_max_abs_error": float(err.max()) if err.size else 0.0,
        "q_p99_abs_error": p99,
        "q_range": q_range,
        # p99, not max: a state outside the calibration range saturates an int8 input and is
        # reported by the max; one such state should not condemn a model.
        "q_rel_error": p99 / q_range if q_range > 0 else 0.0,
        "q_error_states": int(len(q_ref)),
    }


def int8_output_bounds(output: dict[str, Any] | None) -> tuple[float, float] | None:
    """The dequantized scores at which an int8 output saturates, from a manifest's
    ``quantization.output`` (None for other outputs)."""
    if not output or output.get("dtype") != "int8" or not output.get("scale"):
        return None
    scale, zero = float(output["scale"]), int(output.get("zero_point", 0))
    return (-128 - zero) * scale, (127 - zero) * scale


def q_errors_unsaturated(q_ref: np.ndarray, q_new: np.ndarray, centered: bool,
                         bounds: tuple[float, float] | None) -> dict[str, Any]:
    """:func:`q_errors` on the states where no output of ``q_new`` sits at an int8 bound.

    quantize narrows the int8 output range to what ranks actions, so large scores saturate: they
    keep the action order but not the Q-value. The share of saturated states is reported; if every
    state (or none) saturates, the errors are those of all states.
    """
    q_new = np.asarray(q_new, np.float64)
    extra: dict[str, Any] = {}
    keep = slice(None)
    if bounds is not None:
        lo, hi = bounds
        sat = ((q_new <= lo + 1e-6 * abs(lo)) | (q_new >= hi - 1e-6 * abs(hi))).any(axis=1)
        extra["saturated_share"] = float(sat.mean()) if len(sat) else 0.0
        if sat.any() and not sat.all():
            keep = ~sat
    return {**extra, **q_errors(np.asarray(q_ref)[keep], q_new[keep], centered=centered)}
