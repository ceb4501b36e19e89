"""dqnc: train a DQN policy and compress it into an edge-deployable TFLite file.

The Python API (:mod:`dqnc.api`): ``dqnc.train``, ``distill``, ``prune``, ``quantize``, ``export``,
``evaluate``, ``run_recipe`` and ``load``, their configs (``dqnc.QuantizeConfig`` ...) and results
(``dqnc.Artifact``, ``dqnc.Evaluation``, ``dqnc.RunReport``), and the errors they raise.
``import dqnc`` stays light: each name is imported on first use (``__init__.pyi`` types them).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.3.0"

from dqnc.errors import ArtifactError, ConfigError, DqncError, GateFailed, UsageError  # noqa: E402

# Loaded on first use: name -> the module that defines it (the stage modules' own names are taken
# by the functions: dqnc.train is the function, dqnc/train.py its module, see dqnc.api.StageFunction).
_LAZY = {**dict.fromkeys(("train", "distill", "prune", "quantize", "export", "evaluate", "run_recipe", "load",
                          "Evaluation"), "dqnc.api"),
         "Artifact": "dqnc.artifact", "RunReport": "dqnc.recipe",
         **dict.fromkeys(("TrainConfig", "PruneConfig", "DistillConfig", "QuantizeConfig", "ExportConfig",
                          "EvalConfig", "Gates"), "dqnc.config")}
_STAGE_FUNCTIONS = frozenset({"train", "distill", "prune", "quantize", "export", "evaluate"})

__all__ = ["__version__", *_LAZY, "DqncError", "UsageError", "ConfigError", "ArtifactError", "GateFailed"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dqnc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing a stage module (``import dqnc.train``) sets the package attribute of its name to
    it; the API function keeps the name (it reaches the module's names itself)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STAGE_FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
