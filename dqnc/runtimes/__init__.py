"""The runtimes that run a deployed policy, as one registry.

    RUNTIMES      name -> Runtime (litert, tflite-runtime, tflm, c, onnxruntime: in this order)
    names()       the registered names: EvalConfig.runtime, the CLI's --runtime and eval read them
    open_policy() a DeployedPolicy from an artifact or .tflite bytes, refusals as UsageError
    crosscheck()  one policy in two runtimes, judged: a CrossCheck result

A new runtime is one module defining a :class:`Runtime` plus one ``register`` line below (or a
``register`` call from anywhere, e.g. a test). Heavy imports stay inside each runtime's functions.
Note: ``dqnc.runtimes.crosscheck`` is the function; the module is ``sys.modules["dqnc.runtimes.crosscheck"]``.
"""

from __future__ import annotations

from dqnc.runtimes.base import DeployedPolicy, Runtime
from dqnc.runtimes.c import C_RUNTIME
from dqnc.runtimes.crosscheck import CrossCheck, crosscheck
from dqnc.runtimes.litert import LITERT_RUNTIME, TFLITE_RUNTIME_RUNTIME
from dqnc.runtimes.onnxrt import ONNXRT_RUNTIME
from dqnc.runtimes.registry import RUNTIMES, get, names, open_policy, register, unregister
from dqnc.runtimes.tflm import TFLM_RUNTIME

for _runtime in (LITERT_RUNTIME, TFLITE_RUNTIME_RUNTIME, TFLM_RUNTIME, C_RUNTIME, ONNXRT_RUNTIME):
    register(_runtime)

__all__ = ["CrossCheck", "DeployedPolicy", "RUNTIMES", "Runtime", "crosscheck", "get", "names", "open_policy",
           "register", "unregister"]
