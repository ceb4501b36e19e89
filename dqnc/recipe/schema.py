"""The recipe schema: source, stages and gates as pydantic models (also the JSON Schema).

The stage entries are built from ``dqnc.stages.STAGES``; ``recipe_model()`` is the Recipe model
for the registry as it is now (rebuilt, and cached, when a stage is registered or removed).
``Recipe``, ``Stage`` and ``STAGE_MODELS`` are the built-in stages' models, kept for old imports.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from dqnc.config import EvalConfig, Gates, TrainConfig
from dqnc.stages import STAGES, join_names, seeded_names
from dqnc.stages import Stage as StageEntry

MAX_YAML_NODES = 20_000  # a recipe is small; this stops alias bombs ("billion laughs") early
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where the chain starts: an artifact, a bare Keras SavedModel or a foreign model plus its env,
    or training."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    artifact: str | None = Field(None, description="a dqnc artifact directory (relative to the recipe)")
    savedmodel: str | None = Field(None, description="a Keras SavedModel without a dqnc manifest (needs env)")
    import_: str | None = Field(None, alias="import", description="a model made elsewhere (Keras 3 .keras/.h5, ONNX, "
                                "SB3 .zip, CleanRL .cleanrl_model), imported and verified (needs env)")
    obs_norm: str | None = Field(None, description="SB3 VecNormalize statistics for an import source")
    env: str | None = Field(None, description="env id for savedmodel or import")
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    train: TrainConfig | None = Field(None, description="train from scratch with these options (env required)")

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, data: Any) -> Any:
        # The env's tuned defaults apply under a recipe's train options, as they do for `dqnc train`.
        if isinstance(data, dict) and isinstance(data.get("train"), dict) and isinstance(data["train"].get("env"), str):
            from dqnc.config import train_defaults

            data = {**data, "train": {**train_defaults(data["train"]["env"]), **data["train"]}}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> Source:
        given = [k.rstrip("_") for k in ("artifact", "savedmodel", "import_", "train") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of artifact, savedmodel, import or train"
                             + (f" (got {', '.join(given)})" if given else ""))
        if (self.savedmodel is not None or self.import_ is not None) and not self.env:
            raise ValueError(f"{given[0]} needs env: the id of the env the model acts in")
        if self.obs_norm is not None and self.import_ is None:
            raise ValueError("obs_norm goes with an import source")
        if self.train is None and self.env is None and self.env_kwargs:
            raise ValueError("env_kwargs needs env")
        return self


class _StageBase(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="output folder name, unique in the recipe")
    input: str | None = Field(None, description="stage whose output this stage reads [default: the previous one]")


def stage_model(stage: StageEntry) -> type[BaseModel]:
    """The recipe entry of ``stage``: its config's options plus name, input, ``stage: <name>`` and
    gates (e.g. ``PruneStage``)."""
    return _stage_model(stage.name, stage.config)


@functools.lru_cache(maxsize=None)
def _stage_model(name: str, config: type[BaseModel]) -> type[BaseModel]:
    fields: dict[str, Any] = {"stage": (Literal[name], ...)}
    if "gates" not in config.model_fields:  # eval's own gates are its config's
        fields["gates"] = (Optional[Gates], None)
    return create_model(f"{name.capitalize()}Stage", __base__=(_StageBase, config), __module__=__name__, **fields)


def stage_models() -> dict[str, type[BaseModel]]:
    """Stage name -> its recipe entry model, for every registered stage."""
    return {name: stage_model(s) for name, s in STAGES.items()}


def needs_savedmodel() -> set[str]:
    """The stages a TFLite model cannot feed: it cannot be pruned, distilled or re-quantized."""
    return {name for name, s in STAGES.items() if "tflite" not in s.reads}


def produces() -> dict[str, str]:
    """What each writing stage writes (a measuring stage passes its input's kind on)."""
    return {name: s.writes for name, s in STAGES.items() if s.writes is not None}


class Sweep(_Strict):
    """What `dqnc sweep` searches: every trial is the recipe with one combination of overrides."""

    grid: dict[str, list[Any]] = Field(default_factory=dict, description="--set key -> values; the trials are "
                                       "their cross product, e.g. {student.hidden: [[8, 8], [16, 16]]}")
    seeds: int = Field(1, ge=1, le=100, description="repeat each combination with seed 0..N-1 on every "
                       f"{join_names(seeded_names(), 'and')} stage")
    samples: int | None = Field(None, ge=1, description="random search: run this many combinations drawn without "
                                "replacement from the grid (seeded by sample_seed) instead of all of them")
    sample_seed: int = Field(0, ge=0)
    pick: Literal["smallest-passing"] | None = Field(None, description="write best.yaml with this rule")
    max_parallel: int | None = Field(None, ge=1, description="trials in flight at once [default: the cluster's CPUs]")
    trial_timeout: float | None = Field(None, gt=0, description="seconds before a trial is stopped and recorded as "
                                        "timed out")

    @model_validator(mode="after")
    def _values(self) -> Sweep:
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"sweep.grid.{key} is empty: give at least one value")
        return self


class _RecipeFields(_Strict):
    version: Literal[1] = 1
    name: str | None = None
    out_dir: str | None = Field(None, description="where stage outputs go [default: runs/<recipe file stem>]")
    source: Source
    stages: list[Any] = Field(min_length=1)  # recipe_model() puts the registered stages here
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation of every stage for the report")
    gates: Gates = Field(default_factory=Gates, description="checked on the last stage's evaluation")
    sweep: Sweep | None = Field(None, description="the search space of `dqnc sweep` (ignored by `dqnc run`)")
    tensorboard: bool = Field(True, description="write TensorBoard scalars under out_dir/tensorboard/<stage name>: "
                              "the train source's returns, loss and epsilon, distill and prune losses per chunk "
                              "and their DAgger rounds (tensorboard --logdir OUT_DIR/tensorboard)")


def recipe_model() -> type[BaseModel]:
    """The Recipe model whose ``stages`` accept every registered stage."""
    return _recipe_model(tuple(STAGES.values()))


@functools.lru_cache(maxsize=8)
def _recipe_model(stages: tuple[StageEntry, ...]) -> type[BaseModel]:
    union = Annotated[Union[tuple(stage_model(s) for s in stages)], Field(discriminator="stage")]
    return create_model("Recipe", __base__=_RecipeFields, __module__=__name__,
                        stages=(list[union], Field(min_length=1)))  # type: ignore[valid-type]


Recipe = recipe_model()
STAGE_MODELS: dict[str, type[BaseModel]] = stage_models()
Stage = Recipe.model_fields["stages"].annotation.__args__[0]  # the built-in stages' discriminated union
NEEDS_SAVEDMODEL = needs_savedmodel()
PRODUCES = produces()


def json_schema() -> dict[str, Any]:
    schema = recipe_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dqnc recipe"
    return schema
