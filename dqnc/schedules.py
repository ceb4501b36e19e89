"""Schedules as pure functions of the step count."""

from __future__ import annotations


def linear(start: float, end: float, fraction: float, total_steps: int, step: int) -> float:
    """Go linearly from ``start`` to ``end`` over the first ``fraction`` of ``total_steps``, then hold."""
    horizon = max(1.0, fraction * total_steps)
    progress = min(1.0, max(0.0, step / horizon))
    return start + progress * (end - start)
