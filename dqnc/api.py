"""The Python API: each stage as one function with a typed config and a typed result.

    import dqnc

    parent = dqnc.load("sample_models/cartpole")
    int8 = dqnc.quantize(parent, "out/int8", mode="int8")          # -> dqnc.Artifact
    bundle = dqnc.export(int8, "out/bundle", target="linux")
    result = dqnc.evaluate(bundle, reference=parent, episodes=20)  # -> dqnc.Evaluation

The command line calls these functions, so both have the same semantics and errors: bad input
raises :class:`dqnc.UsageError` (the CLI's exit 2), a failed check or gate :class:`dqnc.GateFailed`
(exit 1, the measurements in ``.result``). A config is the stage's pydantic model
(``dqnc.QuantizeConfig``), a mapping, or keyword options (which override the config's).

``dqnc.train``, ``prune``, ``distill``, ``quantize``, ``export`` and ``evaluate`` share their names
with the stage modules (``dqnc/train.py`` ...). Each is a :class:`StageFunction`: calling it runs
the stage; its other attributes are the module's (``dqnc.train.Progress``, ``dqnc.prune.run``), so
``from dqnc import train; train.run(...)`` keeps working and the attribute is never replaced by
the module when that is imported (see ``dqnc/__init__.py``).

Nothing here imports TensorFlow (or the stage modules) until a function is called.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from dqnc.errors import UsageError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from dqnc.artifact import Artifact
    from dqnc.config import DistillConfig, EvalConfig, ExportConfig, PruneConfig, QuantizeConfig, TrainConfig
    from dqnc.envs import EnvSpec
    from dqnc.recipe import LoadedRecipe, RunReport

P = ParamSpec("P")
R = TypeVar("R")
PathLike = str | os.PathLike[str]


class StageFunction(Generic[P, R]):
    # A public stage function that is also its stage module's namespace: calling it calls the
    # function; reading, setting or deleting any other attribute reads, sets or deletes the module's
    # (imported on first use), and ``vars()`` is the module's, so monkeypatching ``dqnc.prune.run``
    # patches the module the stage registry calls.

    __slots__ = ("_fn", "_module", "__wrapped__")

    def __init__(self, fn: Callable[P, R], module: str) -> None:
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "__wrapped__", fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(*args, **kwargs)

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._fn.__doc__

    @property
    def __name__(self) -> str:
        return self._fn.__name__

    @property
    def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
        return self._target().__dict__

    def _target(self) -> Any:
        return importlib.import_module(self._module)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(self._target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._target(), name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._target())) | {"__call__", "__wrapped__"})

    def __repr__(self) -> str:
        return f"<dqnc function {self.__name__} (stage module {self._module})>"


def _stage_function(module: str) -> Callable[[Callable[P, R]], StageFunction[P, R]]:
    def deco(fn: Callable[P, R]) -> StageFunction[P, R]:
        return StageFunction(fn, module)

    return deco


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` measured. ``metrics`` is the whole object ``dqnc eval --json`` prints."""

    path: str
    env: str
    episodes: int
    mean_return: float
    return_ci95: tuple[float, float]
    size_bytes: int
    runtime: str
    passed: bool  # every gate asked for passed (True when none was asked for)
    metrics: dict[str, Any] = field(repr=False)

    @classmethod
    def from_metrics(cls, m: dict[str, Any]) -> Evaluation:
        from dqnc.evaluate import record

        m = record(m)  # exactly what `eval --json` prints
        lo, hi = m["return_ci95"]
        return cls(m["path"], m["env"], int(m["episodes"]), float(m["mean_return"]), (float(lo), float(hi)),
                   int(m["size_bytes"]), str(m["runtime"]), all(g["passed"] for g in m["gates"]), m)


# --- shared pieces ------------------------------------------------------------------------------

def config_of(cls: type[BaseModel], config: Any, options: Mapping[str, Any], who: str) -> Any:
    """``config`` (an instance of ``cls``, a mapping or None) with ``options`` over it, validated;
    one ConfigError (a UsageError) naming the first problem otherwise."""
    from pydantic import BaseModel

    from dqnc.config import validate

    if isinstance(config, cls) and not options:
        return config
    if isinstance(config, BaseModel):
        base = config.model_dump()
    elif config is None or isinstance(config, Mapping):
        base = dict(config or {})
    else:
        raise UsageError(f"{who}: config must be a {cls.__name__} or a mapping of its options, not "
                         f"{type(config).__name__}")
    return validate(cls, {**base, **options}, who)


def env_of(env: str | EnvSpec | None, env_kwargs: Mapping[str, Any] | None = None) -> EnvSpec | None:
    """An env the caller named (a gymnasium id, 'module:Env' or an EnvSpec), or None."""
    if env is None:
        if env_kwargs:
            raise UsageError("env_kwargs needs env: name the env the model acts in")
        return None
    if not isinstance(env, str):
        return env
    from dqnc.envs import env_spec, trust

    trust(env)  # named by the caller: a 'module:Env' id may be imported
    return env_spec(env, dict(env_kwargs or {}))


def source_of(source: Any, env: str | EnvSpec | None = None) -> Artifact:
    """An Artifact as is; a path opened as :func:`load` opens it."""
    from dqnc.artifact import Artifact

    if isinstance(source, Artifact):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"expected an artifact or a path to a model, not {type(source).__name__}")
    from dqnc import sources

    return sources.load(Path(source), env=env_of(env))


def default_out(path: Path, suffix: str) -> Path:
    """``PATH-suffix`` beside the model (``runs/x/model`` -> ``runs/x/x-suffix``)."""
    base = path.name if path.name not in ("", ".", "model") else path.resolve().parent.name
    return path.resolve().parent / f"{base}-{suffix}"


def _path_of(source: Any, artifact: Artifact) -> Path:
    return Path(source) if isinstance(source, (str, os.PathLike)) else artifact.path


@contextmanager
def _shown(show: bool, label: str) -> Iterator[None]:
    """The work inside as one progress task, on the caller's display or one opened on stderr."""
    from dqnc import progress

    with progress.shown(quiet=not show), progress.task(label):
        yield


# --- the stages ---------------------------------------------------------------------------------

@_stage_function("dqnc.train")
def train(config: TrainConfig | Mapping[str, Any] | None = None, out: PathLike | None = None, *,
          force: bool = False, resume: bool = False, logdir: PathLike | None = None, progress: bool = True,
          address: str | None = None, command: Sequence[str] | None = None, **options: Any) -> Artifact:
    """Train a DQN policy and write it as an fp32 SavedModel artifact at ``out``
    (default ``runs/ENV-seedSEED``). Options are :class:`dqnc.TrainConfig`'s; the env's tuned
    defaults fill the rest. An interrupted run leaves a checkpoint at ``OUT.ckpt`` (``resume=True``).
    With ``actors=N`` the envs step on N Ray actors (Ape-X) of the cluster at ``address`` (or
    ``RAY_ADDRESS``; default: a local Ray)."""
    from dqnc import progress as shown_progress
    from dqnc import train as stage
    from dqnc.config import TrainConfig, build_train_config

    if isinstance(config, TrainConfig):
        cfg = config_of(TrainConfig, config, options, "dqnc.train()")
    elif config is None or isinstance(config, Mapping):
        values = {**dict(config or {}), **options}
        cfg = build_train_config(values.get("env"), {}, values, source="dqnc.train()")
    else:
        raise UsageError(f"dqnc.train(): config must be a TrainConfig or a mapping, not {type(config).__name__}")
    out = Path(out) if out is not None else Path("runs") / f"{cfg.env.replace(':', '_').replace('/', '_')}-seed{cfg.seed}"
    with _shown(progress, f"train {cfg.env}"):
        return stage.run(cfg, out, force=force, checkpoint_dir=out.with_name(out.name + ".ckpt"), resume=resume,
                         logdir=Path(logdir) if logdir is not None else None, progress=shown_progress.train_update,
                         command=list(command) if command else None, address=address)


@_stage_function("dqnc.prune")
def prune(source: Artifact | PathLike, out: PathLike | None = None, config: PruneConfig | Mapping[str, Any] | None = None,
          *, env: str | EnvSpec | None = None, force: bool = False, progress: bool = True,
          command: Sequence[str] | None = None, **options: Any) -> Artifact:
    """Magnitude-prune a SavedModel policy while fine-tuning it to act like its parent; write the
    sparse SavedModel artifact at ``out`` (default ``PATH-prunedNN``). Options: :class:`dqnc.PruneConfig`."""
    from dqnc import prune as stage
    from dqnc.config import PruneConfig

    cfg = config_of(PruneConfig, config, options, "dqnc.prune()")
    art = source_of(source, env)
    sparsity = 0.5 if cfg.structure == "2by4" else cfg.sparsity
    suffix = {"units": f"units{round(100 * sparsity)}", "2by4": "pruned2by4"}.get(cfg.structure,
                                                                                  f"pruned{round(100 * sparsity)}")
    target = Path(out) if out is not None else default_out(_path_of(source, art), suffix)
    what = "2:4" if cfg.structure == "2by4" else f"{100 * sparsity:.0f}%"
    with _shown(progress, f"prune to {what} ({cfg.finetune})"):
        return stage.run(cfg, art, target, force=force, command=list(command) if command else None)


@_stage_function("dqnc.distill")
def distill(source: Artifact | PathLike, out: PathLike | None = None,
            config: DistillConfig | Mapping[str, Any] | None = None, *, env: str | EnvSpec | None = None,
            force: bool = False, progress: bool = True, log: Callable[[str], None] | None = None,
            command: Sequence[str] | None = None, **options: Any) -> Artifact:
    """Teach a small dense student MLP the parent's policy; write its SavedModel artifact at ``out``
    (default ``PATH-student-WIDTHS``). Options: :class:`dqnc.DistillConfig`."""
    from dqnc import distill as stage
    from dqnc.config import DistillConfig

    cfg = config_of(DistillConfig, config, options, "dqnc.distill()")
    art = source_of(source, env)
    shape = "auto" if cfg.hidden == "auto" else "x".join(map(str, cfg.hidden))
    target = Path(out) if out is not None else default_out(_path_of(source, art), "student-" + shape)
    with _shown(progress, f"distill ({shape})"):
        return stage.run(cfg, art, target, force=force, command=list(command) if command else None, log=log)


@_stage_function("dqnc.quantize")
def quantize(source: Artifact | PathLike, out: PathLike | None = None,
             config: QuantizeConfig | Mapping[str, Any] | None = None, *, env: str | EnvSpec | None = None,
             force: bool = False, progress: bool = True, command: Sequence[str] | None = None,
             **options: Any) -> Artifact:
    """Convert a SavedModel policy to TFLite (int8 by default), calibrated on its own rollouts and
    checked against it; write the artifact at ``out`` (default ``PATH-MODE``). Options:
    :class:`dqnc.QuantizeConfig`. A model that strays from its parent raises GateFailed."""
    from dqnc import quantize as stage
    from dqnc.config import QuantizeConfig

    cfg = config_of(QuantizeConfig, config, options, "dqnc.quantize()")
    art = source_of(source, env)
    target = Path(out) if out is not None else default_out(_path_of(source, art), cfg.mode)
    with _shown(progress, f"quantize ({cfg.mode})"):
        return stage.run(cfg, art, target, force=force, command=list(command) if command else None)


@_stage_function("dqnc.export")
def export(source: Artifact | PathLike, out: PathLike | None = None,
           config: ExportConfig | Mapping[str, Any] | None = None, *, env: str | EnvSpec | None = None,
           force: bool = False, progress: bool = True, command: Sequence[str] | None = None,
           **options: Any) -> Artifact:
    """Write the verified edge bundle of a policy for ``target`` (mcu or linux) at ``out``
    (default ``PATH-bundle``). Options: :class:`dqnc.ExportConfig`."""
    from dqnc import export as stage
    from dqnc.config import ExportConfig

    cfg = config_of(ExportConfig, config, options, "dqnc.export()")
    art = source_of(source, env)
    target = Path(out) if out is not None else default_out(_path_of(source, art), "bundle")
    with _shown(progress, f"export for {cfg.target}"):
        return stage.run(cfg, art, target, force=force, command=list(command) if command else None)


@_stage_function("dqnc.evaluate")
def evaluate(source: Artifact | PathLike, reference: Artifact | PathLike | None = None,
             config: EvalConfig | Mapping[str, Any] | None = None, *, env: str | EnvSpec | None = None,
             progress: bool = True, **options: Any) -> Evaluation:
    """Run greedy episodes of a policy: returns, size, latency and, with a ``reference`` (its
    parent), agreement, regret and return drop. Options: :class:`dqnc.EvalConfig`, gates included
    (``min_return=475``, flat or under ``gates``); a failing gate raises GateFailed, its
    ``result`` holding the measurements."""
    from dqnc import evaluate as stage
    from dqnc.config import EvalConfig, Gates

    gates = {k: options.pop(k) for k in list(options) if k in Gates.model_fields}
    if gates:
        base = config.model_dump() if isinstance(config, EvalConfig) else dict(config or {})
        options["gates"] = {**dict(base.get("gates") or {}), **gates}
    cfg = config_of(EvalConfig, config, options, "dqnc.evaluate()")
    art = source_of(source, env)
    parent = source_of(reference, env if env is not None else art.env) if reference is not None else None
    with _shown(progress, f"evaluate {art.path.name}"):
        return Evaluation.from_metrics(stage.run(cfg, art, parent))


def run_recipe(recipe: PathLike | LoadedRecipe, *, sets: Sequence[str] = (), force: bool | Sequence[str] = False,
               from_stage: str | None = None, until: str | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None) -> RunReport:
    """Run a recipe (each stage cached by content hash) and return its report; ``force`` re-runs
    every stage (True) or the named ones. Writes report.md/report.json; a failed gate raises
    GateFailed after writing them (``.result`` is the report's dict)."""
    from dqnc import progress as shown_progress
    from dqnc import recipe as recipes

    loaded = recipe if isinstance(recipe, recipes.LoadedRecipe) else recipes.load(Path(recipe), list(sets))
    forced: bool | set[str] = force if isinstance(force, bool) else set(force)
    with shown_progress.shown(quiet=not progress):
        return recipes.run(loaded, force=forced, from_stage=from_stage, until=until, log=log or (lambda s: None))


def load(path: PathLike, env: str | EnvSpec | None = None) -> Artifact:
    """Open any model as an artifact: a dqnc artifact or bundle, a tf_keras SavedModel or .tflite
    file (with ``env``), or a model made elsewhere (Keras 3, ONNX, SB3, CleanRL; imported once,
    with ``env``)."""
    return source_of(path, env)
