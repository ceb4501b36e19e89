"""TensorFlow Lite Micro on the host: load a model in TFLM's own interpreter (the PyPI package
``tflite-micro``, which runs TFLM's reference kernels), run it, and measure its tensor arena.

TFLM has no Python getter for the arena; its RecordingMicroAllocator prints the figures
("Arena allocation total N bytes", head, tail) from C++ straight to the process's file
descriptors, so they are read by redirecting fds 1 and 2 around the call.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from dqnc.errors import UsageError
from dqnc.runtimes.names import TFLM
# The .tflite reader lives in dqnc.tflite_model; these names stay for their callers.
from dqnc.tflite_model import check, model_ops, op_names, read_model, schema  # noqa: F401

RUNTIME = TFLM  # the registry's name of this runtime (dqnc.runtimes.tflm)
# The arena the probe interpreter gets: generous, the real need is measured (see arena()).
PROBE_ARENA_MIN = 64 * 1024
PROBE_ARENA_MAX = 256 * 1024 * 1024  # 10x a padded file is not an arena to allocate (the Nature DQN needs ~1 MB)
# Margin added to the measured arena in dqnc_policy.h: TFLM versions and platforms differ in
# alignment and in the persistent buffers their kernels request.
ARENA_MARGIN = 0.25
ARENA_ALIGN = 16


class TflmError(UsageError):
    """TFLM cannot load or run the model (an op it lacks, a type it cannot handle)."""


@contextmanager
def captured_fds() -> Iterator[list[str]]:
    """Capture what C/C++ code writes to fds 1 and 2 in the block; the text lands in the yielded list."""
    out: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 1)
        os.dup2(capture.fileno(), 2)
        try:
            yield out
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                os.close(saved[0])
                os.close(saved[1])
                capture.seek(0)
                out.append(capture.read().decode(errors="replace"))


class Interpreter:
    """TFLM's interpreter behind the few tf.lite.Interpreter calls that ``runtime.Policy`` makes."""

    runtime = RUNTIME

    def __init__(self, content: bytes, arena_size: int | None = None) -> None:
        from tflite_micro.python.tflite_micro import runtime as tflm_runtime

        check(content)
        size = arena_size or min(max(PROBE_ARENA_MIN, 10 * len(content)), PROBE_ARENA_MAX)
        with captured_fds() as log:
            try:
                self._it = tflm_runtime.Interpreter.from_bytes(bytes(content), arena_size=size)
                error = None
            except Exception as e:  # noqa: BLE001 - its Python model reader raises struct.error, TypeError, ...
                error = e
        if error is not None:
            text = " ".join((log[0] if log else "").split()) or str(error)
            raise TflmError(f"TensorFlow Lite Micro cannot load the model: {text[:300]}")
        try:
            self._in, self._out = self._it.get_input_details(0), self._it.get_output_details(0)
        except (IndexError, RuntimeError, ValueError):
            raise TflmError("the model has no input or no output tensor: not a Q-network (damaged file?)") from None
        with captured_fds():  # TFLM prints "Input index 1 out of range" for the probes below
            several = []
            for extra in (self._it.get_input_details, self._it.get_output_details):
                try:
                    extra(1)
                    several.append(True)
                except (IndexError, RuntimeError, ValueError):
                    pass
        if several:
            raise TflmError("the model has more than one input or output tensor: a Q-network has one of each")

    @staticmethod
    def _detail(d: dict[str, Any], index: int) -> dict[str, Any]:
        q = d.get("quantization_parameters") or {}
        scales, zeros = q.get("scales"), q.get("zero_points")
        quant = (float(scales[0]), int(zeros[0])) if scales is not None and len(scales) else (0.0, 0)
        return {"index": index, "shape": np.asarray(d["shape"]), "dtype": d["dtype"], "quantization": quant}

    def get_input_details(self) -> list[dict[str, Any]]:
        return [self._detail(self._in, 0)]

    def get_output_details(self) -> list[dict[str, Any]]:
        return [self._detail(self._out, 0)]

    def get_tensor_details(self) -> list[dict[str, Any]]:
        return []  # TFLM runs no sparse tensors; runtime.Policy.has_sparse_tensors reads this

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        self._it.set_input(value, index)

    def invoke(self) -> None:
        self._it.invoke()

    def get_tensor(self, index: int) -> np.ndarray:
        return self._it.get_output(index)

    def allocations(self) -> dict[str, int]:
        """Arena bytes (total, head, tail) as the RecordingMicroAllocator reports them."""
        with captured_fds() as log:
            self._it.print_allocations()
        found = {k: int(v) for k, v in re.findall(r"Arena allocation (total|head|tail) (\d+) bytes", log[0])}
        if "total" not in found:
            raise RuntimeError(f"TFLM printed no arena figures: {log[0][:200]!r}")
        return found


def policy(content: bytes, manifest: dict[str, Any] | None = None) -> Any:
    """A ``runtime.Policy`` whose inferences run in TFLM's reference kernels."""
    from dqnc.runtime import Policy

    pre = (manifest or {}).get("preprocess") or {}
    return Policy(obs_mean=pre.get("obs_mean"), obs_std=pre.get("obs_std"), interpreter=Interpreter(content))


def arena(content: bytes) -> dict[str, int]:
    """The arena the model needs (bytes): measured after one invoke, with the size to ship."""
    it = Interpreter(content)
    detail = it.get_input_details()[0]
    it.set_tensor(0, np.zeros(tuple(int(s) for s in detail["shape"]), detail["dtype"]))
    it.invoke()
    found = it.allocations()
    shipped = int(found["total"] * (1 + ARENA_MARGIN))
    found["shipped"] = -(-shipped // ARENA_ALIGN) * ARENA_ALIGN
    found["margin"] = ARENA_MARGIN  # type: ignore[assignment]
    return found
