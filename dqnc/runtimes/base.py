"""What every runtime is (:class:`Runtime`) and what it opens (:class:`DeployedPolicy`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DeployedPolicy(Protocol):
    """A policy as one runtime runs it: float observations in, Q-values (or scores) or an action out.

    ``runtime`` names what runs it (for LiteRT and tflite-runtime, the interpreter module).
    TFLite-backed policies (``dqnc.runtime.Policy``) also offer ``quantize_input(obs)`` (float rows
    -> the model's input values), ``input_shape`` (with the batch dimension), ``io()`` (dtypes,
    scales, zero points) and ``invoke_quantized(xq)`` (the interpreter alone); the C policy has none
    of those, so they are not part of the protocol's required surface.
    """

    runtime: str
    obs_dim: int
    n_actions: int

    def q_values(self, obs: Any) -> np.ndarray: ...

    def act(self, obs: Any) -> int: ...


@dataclass(frozen=True)
class Runtime:
    """One way to run a deployed .tflite policy.

    ``available()`` says why the runtime cannot run here (a phrase after its name, e.g. "needs a
    host C compiler ..."), or None. ``refuses(content, manifest)`` says why it cannot run this model
    (e.g. "no C policy for this model: ..."), or None. ``open(artifact_or_content, manifest)`` returns
    the :class:`DeployedPolicy`. ``loads_tflite`` is False for a runtime that runs code generated
    from the model rather than the .tflite file itself (the C policy): lowbit measures which
    runtimes load a file form, and only those are asked.
    """

    name: str
    summary: str
    available: Callable[[], str | None]
    refuses: Callable[[bytes, dict[str, Any] | None], str | None]
    open: Callable[[Any, dict[str, Any] | None], DeployedPolicy]
    loads_tflite: bool = True
