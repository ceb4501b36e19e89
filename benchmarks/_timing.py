"""Per-call timing shared by every benchmark process (stdlib + numpy only, so it also runs in the
numpy<2 tflite-runtime venv and in the SB3 venv)."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np


def time_calls(fn: Callable[[Any], Any], args: Sequence[Any], warmup: int = 200) -> dict[str, float]:
    """Call ``fn(a)`` for every ``a``, timing each call alone with ``time.perf_counter_ns``.

    ``warmup`` untimed calls come first (cycling through ``args``), so lazy initialisation,
    tracing and cold caches stay out of the figures. Returns microseconds.
    """
    n = len(args)
    for j in range(warmup):
        fn(args[j % n])
    times = np.empty(n, np.float64)
    clock = time.perf_counter_ns
    for j, a in enumerate(args):
        t0 = clock()
        fn(a)
        times[j] = clock() - t0
    times /= 1000.0
    return {
        "p50": float(np.percentile(times, 50)),
        "p99": float(np.percentile(times, 99)),
        "mean": float(times.mean()),
        "min": float(times.min()),
        "samples": int(n),
        "warmup": int(warmup),
    }
