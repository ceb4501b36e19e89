"""The chain stages of a recipe, one registry entry each: what a stage accepts, writes and runs.

The recipe schema, the recipe loader's chain check, the runner and the sweep's seed keys all read
``STAGES``, so a stage is defined here once (its options are its pydantic config in
``dqnc.config``). A new stage is one ``register(Stage(...))``.

Training and importing are not chain stages but *sources* (``source: {train: ...}`` or
``{import: ...}`` in a recipe, ``dqnc.recipe.schema.Source``): they start a chain and read no
artifact, so they have no entry here, and ``train``/``source`` are reserved stage names.

Nothing here imports TensorFlow: each ``run`` imports its module when called, and looks its
function up then, so tests that monkeypatch e.g. ``dqnc.prune.run`` still take effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dqnc.config import DistillConfig, EvalConfig, ExportConfig, PruneConfig, QuantizeConfig

if TYPE_CHECKING:
    from pydantic import BaseModel

KINDS = frozenset({"savedmodel", "tflite"})  # the artifact kinds (dqnc.artifact.Artifact.kind)
SOURCES = ("train", "source")  # names the recipe gives its source: no stage may take them


@dataclass(frozen=True)
class Stage:
    """One link of a recipe's chain.

    ``run(config, source, out, *, force, log) -> Artifact`` for a stage that writes an artifact;
    a measuring stage (``writes`` None: eval) has ``run(config, target, reference, *, force, log)
    -> metrics dict`` and the runner keeps its input as its output."""

    name: str
    config: type[BaseModel]
    reads: frozenset[str]  # the artifact kinds it accepts
    writes: str | None  # the kind it writes; None: it measures its input and writes nothing
    seeded: bool  # whether its output depends on its ``seed`` option (a sweep's --seeds vary it)
    run: Callable[..., Any]
    summary: str


def _prune(cfg: Any, source: Any, out: Any, *, force: bool, log: Callable[[str], None]) -> Any:
    from dqnc import prune

    return prune.run(cfg, source, out, force=force)


def _distill(cfg: Any, source: Any, out: Any, *, force: bool, log: Callable[[str], None]) -> Any:
    from dqnc import distill

    return distill.run(cfg, source, out, force=force, log=log)


def _quantize(cfg: Any, source: Any, out: Any, *, force: bool, log: Callable[[str], None]) -> Any:
    from dqnc import quantize

    return quantize.run(cfg, source, out, force=force)


def _export(cfg: Any, source: Any, out: Any, *, force: bool, log: Callable[[str], None]) -> Any:
    from dqnc import export

    return export.run(cfg, source, out, force=force)


def _eval(cfg: Any, target: Any, reference: Any, *, force: bool = False,
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    from dqnc import evaluate

    return evaluate.run(cfg, target, reference)


SAVEDMODEL = frozenset({"savedmodel"})
STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` (a new name; its config must have a ``seed`` option if it is seeded)."""
    if stage.name in STAGES or stage.name in SOURCES:
        raise ValueError(f"stage {stage.name!r} is already defined (or is a source name)")
    if not stage.name.isidentifier() or not stage.reads <= KINDS or (stage.writes not in KINDS | {None}):
        raise ValueError(f"stage {stage.name!r}: the name must be an identifier, reads a subset of {sorted(KINDS)} "
                         f"and writes one of them or None")
    if stage.writes is None and not issubclass(stage.config, EvalConfig):
        raise ValueError(f"stage {stage.name!r} writes nothing, so it measures like eval: its config must be an "
                         "EvalConfig (subclass)")
    if stage.seeded and "seed" not in stage.config.model_fields:
        raise ValueError(f"stage {stage.name!r} is seeded but {stage.config.__name__} has no 'seed' option")
    STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    STAGES.pop(name, None)


for _stage in (
    Stage("prune", PruneConfig, SAVEDMODEL, "savedmodel", True, _prune,
          "magnitude pruning with fine-tuning (SavedModel -> sparse SavedModel)"),
    Stage("distill", DistillConfig, SAVEDMODEL, "savedmodel", True, _distill,
          "teach a dense student MLP the parent's policy (SavedModel -> SavedModel)"),
    Stage("quantize", QuantizeConfig, SAVEDMODEL, "tflite", True, _quantize,
          "convert to a checked TFLite model, fp32/fp16/int8 (SavedModel -> .tflite)"),
    Stage("export", ExportConfig, KINDS, "tflite", False, _export,
          "write the verified edge bundle for a target (-> bundle with model.tflite)"),
    Stage("eval", EvalConfig, KINDS, None, False, _eval,
          "greedy evaluation of the input, with optional gates (writes nothing)"),
):
    register(_stage)
del _stage


def seeded_names() -> list[str]:
    """The stages whose output depends on their seed, in registry order."""
    return [s.name for s in STAGES.values() if s.seeded]


def join_names(names: list[str], word: str) -> str:
    """'a', 'a or b', 'a, b or c' (for messages and help that list stages)."""
    return f" {word} ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
