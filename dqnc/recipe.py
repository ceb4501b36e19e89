"""Recipes: a YAML file that names a source and an ordered chain of stages, run like a Makefile.

    source:  {artifact: PATH} | {savedmodel: PATH, env: ID} | {train: {env: ID, ...}}
    stages:  [{name, stage: prune|quantize|export|eval, input?, gates?, ...options}]
    eval:    evaluation settings for the per-stage report (episodes, seed, latency_samples)
    gates:   checked on the last stage's evaluation

Each stage writes ``<out_dir>/<name>/``. A stage whose input artifact and effective options are
unchanged (content hashes) is skipped, so a re-run is near-instant and a failed run resumes at
the failed stage. Validation (schema, line numbers, stage order, env ids, paths) finishes before
TensorFlow is imported.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dqnc import __version__
from dqnc.config import (DistillConfig, EvalConfig, ExportConfig, Gates, PruneConfig, QuantizeConfig, TrainConfig, fields_at,
                         first_error, read_text, unknown_key_message)
from dqnc.errors import ConfigError, DqncError, GateFailed, UsageError

MAX_YAML_NODES = 20_000  # a recipe is small; this stops alias bombs ("billion laughs") early
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
STATE_DIR = ".dqnc"


# --- schema ------------------------------------------------------------------------------------

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


class PruneStage(_StageBase, PruneConfig):
    stage: Literal["prune"]
    gates: Gates | None = None


class QuantizeStage(_StageBase, QuantizeConfig):
    stage: Literal["quantize"]
    gates: Gates | None = None


class ExportStage(_StageBase, ExportConfig):
    stage: Literal["export"]
    gates: Gates | None = None


class DistillStage(_StageBase, DistillConfig):
    stage: Literal["distill"]
    gates: Gates | None = None


class EvalStage(_StageBase, EvalConfig):
    stage: Literal["eval"]


Stage = Annotated[Union[PruneStage, DistillStage, QuantizeStage, ExportStage, EvalStage], Field(discriminator="stage")]
STAGE_MODELS: dict[str, type[BaseModel]] = {"prune": PruneStage, "distill": DistillStage, "quantize": QuantizeStage,
                                            "export": ExportStage, "eval": EvalStage}
# What each stage reads and writes: a TFLite model cannot be pruned, distilled or re-quantized.
NEEDS_SAVEDMODEL = {"prune", "distill", "quantize"}
PRODUCES = {"prune": "savedmodel", "distill": "savedmodel", "quantize": "tflite", "export": "tflite"}


class Recipe(_Strict):
    version: Literal[1] = 1
    name: str | None = None
    out_dir: str | None = Field(None, description="where stage outputs go [default: runs/<recipe file stem>]")
    source: Source
    stages: list[Stage] = Field(min_length=1)
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation of every stage for the report")
    gates: Gates = Field(default_factory=Gates, description="checked on the last stage's evaluation")


def json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dqnc recipe"
    return schema


# --- loading with line numbers -------------------------------------------------------------------

def _compose(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}; fix the YAML") from None


def _to_python(node: Any, path: Path, lines: dict[tuple, int]) -> Any:
    """Build plain data from YAML nodes, recording each key's line and capping the expanded size."""
    import yaml

    budget = [MAX_YAML_NODES]
    constructor = yaml.SafeLoader("")

    def build(n: Any, loc: tuple) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            raise ConfigError(f"{path}:{n.start_mark.line + 1}: the recipe expands to more than {MAX_YAML_NODES:,} "
                              "YAML nodes (an alias bomb?): write it out without nested aliases")
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)) and n.tag not in (
                "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap"):
            raise ConfigError(f"{path}:{n.start_mark.line + 1}: unsupported YAML tag {n.tag!r}: recipes hold plain "
                              "mappings, lists and scalars")
        if isinstance(n, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for k, v in n.value:
                key = constructor.construct_object(k, deep=True) if isinstance(k, yaml.ScalarNode) else None
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    raise ConfigError(f"{path}:{k.start_mark.line + 1}: mapping keys must be plain scalars")
                if key in out:
                    raise ConfigError(f"{path}:{k.start_mark.line + 1}: key {'.'.join(map(str, loc + (key,)))!r} appears twice")
                lines[loc + (key,)] = k.start_mark.line + 1
                out[key] = build(v, loc + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            items = []
            for i, v in enumerate(n.value):
                lines[loc + (i,)] = v.start_mark.line + 1
                items.append(build(v, loc + (i,)))
            return items
        try:
            return constructor.construct_object(n, deep=True)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}:{n.start_mark.line + 1}: {str(e).splitlines()[0]}") from None

    return build(node, ())


def apply_sets(data: dict[str, Any], sets: list[str]) -> list[str]:
    """Apply ``--set a.b=value`` overrides (``a`` may be a stage name); returns the paths set."""
    import yaml

    done = []
    for item in sets:
        key, sep, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not sep or not parts:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set prune.sparsity=0.9")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        stages = data.get("stages") if isinstance(data.get("stages"), list) else []
        names = [s.get("name") for s in stages if isinstance(s, dict)]
        target: Any = data
        if parts[0] in names and len(parts) > 1:
            target = stages[names.index(parts[0])]
            parts = parts[1:]
        elif parts[0] not in Recipe.model_fields:
            close = difflib.get_close_matches(parts[0], [n for n in names if n] + list(Recipe.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"--set {item!r}: {parts[0]!r} is neither a stage name nor a recipe key{hint}")
        for p in parts[:-1]:
            nxt = target.get(p) if isinstance(target, dict) else None
            if nxt is None:
                nxt = {}
                target[p] = nxt
            if not isinstance(nxt, dict):
                raise UsageError(f"--set {item!r}: {p!r} is not a mapping")
            target = nxt
        target[parts[-1]] = value
        done.append(key)
    return done


@dataclass
class LoadedRecipe:
    path: Path
    recipe: Recipe
    data: dict[str, Any]
    out_dir: Path
    source_kind: str
    sets: list[str] = field(default_factory=list)

    def resolve(self, p: str) -> Path:
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (self.path.parent / q)


def load(path: str | Path, sets: list[str] | None = None) -> LoadedRecipe:
    """Parse and validate a recipe completely (schema, chain, env ids, paths); never imports TF."""
    path = Path(path)
    text = read_text(path, "recipe")
    node = _compose(text, path)
    if node is None:
        raise ConfigError(f"{path}: the recipe is empty: it needs at least 'source' and 'stages' (see `dqnc recipe schema`)")
    lines: dict[tuple, int] = {}
    data = _to_python(node, path, lines)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a recipe is a mapping with 'source' and 'stages', not a {type(data).__name__}")
    set_paths = apply_sets(data, sets or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_recipe_error(e, path, lines, data, set_paths)) from None
    loaded = LoadedRecipe(path, recipe, data, Path(), "savedmodel", set_paths)
    out = loaded.resolve(recipe.out_dir) if recipe.out_dir else path.parent / "runs" / path.stem
    loaded.out_dir = Path(os.path.normpath(out))
    _check_semantics(loaded, lines)
    return loaded


def _recipe_error(e: ValidationError, path: Path, lines: dict[tuple, int], data: dict[str, Any], sets: list[str]) -> str:
    err = first_error(e)
    loc = list(err["loc"])
    # Discriminated unions put the stage type into the location: stages.0.prune.sparsity
    if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] in STAGE_MODELS:
        model: Any = STAGE_MODELS[loc[2]]
        del loc[2]
    else:
        model = None
    loc_t = tuple(loc)
    key_path = ".".join(str(p) for p in loc_t) or "(top level)"
    line = None
    for n in range(len(loc_t), 0, -1):
        if loc_t[:n] in lines:
            line = lines[loc_t[:n]]
            break
    where = f"{path}:{line}" if line else str(path)
    if any(key_path.endswith(s.split(".")[-1]) for s in sets) and sets:
        where += " (after --set)"
    if err["type"] == "extra_forbidden":
        fields = list(model.model_fields) if model is not None and len(loc_t) == 3 else fields_at(Recipe, loc_t[:-1])
        return unknown_key_message(where, key_path, str(loc_t[-1]), fields)
    if err["type"] == "union_tag_invalid" or (err["type"] == "union_tag_not_found"):
        return (f"{where}: {key_path}: 'stage' must be one of {', '.join(STAGE_MODELS)}"
                + (f" (got {err.get('input', {}).get('stage')!r})" if isinstance(err.get("input"), dict) else ""))
    if err["type"] == "missing" and loc_t == ("source",):
        return (f"{where}: missing key 'source': add one of source: {{artifact: PATH}}, "
                "{savedmodel: PATH, env: ID} or {train: {env: ID}}")
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("missing", "value_error") and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return f"{where}: {key_path}: {msg}"


def _check_semantics(loaded: LoadedRecipe, lines: dict[tuple, int]) -> None:
    r, path = loaded.recipe, loaded.path

    def at(*loc: Any) -> str:
        return f"{path}:{lines[loc]}" if loc in lines else str(path)

    src = r.source
    if src.artifact is not None:
        p = loaded.resolve(src.artifact)
        if not p.exists():
            raise ConfigError(f"{at('source', 'artifact')}: source.artifact {src.artifact!r} does not exist "
                              f"(looked for {p}): fix the path (relative paths start at the recipe's folder)")
        from dqnc.artifact import MANIFEST, TFLITE

        if not (p / MANIFEST).is_file():
            raise ConfigError(f"{at('source', 'artifact')}: source.artifact {src.artifact!r} is not a dqnc artifact "
                              "(no manifest.json): for a bare Keras SavedModel use 'savedmodel' and 'env'")
        loaded.source_kind = "tflite" if (p / TFLITE).is_file() else "savedmodel"
    if src.savedmodel is not None:
        p = loaded.resolve(src.savedmodel)
        if not (p / "saved_model.pb").is_file():
            raise ConfigError(f"{at('source', 'savedmodel')}: source.savedmodel {src.savedmodel!r} is not a SavedModel "
                              f"directory (no saved_model.pb in {p})")
    for key, value in (("import", src.import_), ("obs_norm", src.obs_norm)):
        if value is not None and not loaded.resolve(value).exists():
            raise ConfigError(f"{at('source', key)}: source.{key} {value!r} does not exist (looked for "
                              f"{loaded.resolve(value)}): fix the path (relative paths start at the recipe's folder)")
    env_id = src.train.env if src.train is not None else src.env
    if env_id:
        _check_env_id(env_id, at("source", "train", "env") if src.train is not None else at("source", "env"))
    kinds = {"source": loaded.source_kind}
    if src.train is not None:
        kinds["train"] = "savedmodel"
    prev = "train" if src.train is not None else "source"
    later = [s.name for s in r.stages]
    for i, st in enumerate(r.stages):
        if st.name in kinds:
            raise ConfigError(f"{at('stages', i, 'name')}: stage name {st.name!r} is used twice (or is reserved): "
                              "give each stage its own name")
        if st.input is not None and st.input not in kinds:
            why = "comes later" if st.input in later else "is not a stage name"
            raise ConfigError(f"{at('stages', i, 'input')}: stage {st.name!r} reads input {st.input!r}, which {why}: "
                              f"use one of {', '.join(kinds)}")
        inp = st.input or prev
        kind = kinds[inp]
        if st.stage in NEEDS_SAVEDMODEL and kind != "savedmodel":
            raise ConfigError(f"{at('stages', i)}: stage {st.name!r} ({st.stage}) reads {inp!r}, a TFLite model; "
                              f"{st.stage} needs a SavedModel: put {st.stage} before quantize/export, or read an earlier stage")
        kinds[st.name] = PRODUCES.get(st.stage, kind)
        prev = st.name if st.stage != "eval" else inp
    if loaded.out_dir.exists() and not loaded.out_dir.is_dir():
        raise ConfigError(f"{at('out_dir')}: out_dir {str(loaded.out_dir)!r} is an existing file: choose a directory path")


def _check_env_id(env_id: str, where: str) -> None:
    if ":" in env_id:
        import importlib.util

        module = env_id.split(":", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"{where}: env {env_id!r}: module {module!r} cannot be imported: install it or fix the id")
        return
    import gymnasium as gym

    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown env id {env_id!r}{hint}: use a registered gymnasium id or 'module:Env-v0'")


# --- running -------------------------------------------------------------------------------------

@dataclass
class StageRow:
    name: str
    stage: str
    path: str | None = None
    status: str = "pending"  # ran | cached | failed | skipped | pending
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class RunReport:
    recipe: str
    out_dir: str
    rows: list[StageRow]
    failures: list[str]
    wall_seconds: float
    dqnc_version: str = __version__
    # False when --until stopped before the last stage: the recipe's gates were not checked, and
    # the run is reported as incomplete, never as passed.
    gates_checked: bool = True

    @property
    def verdict(self) -> str:
        return "FAILED" if self.failures else "PASSED" if self.gates_checked else "INCOMPLETE"

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "out_dir": self.out_dir, "dqnc_version": self.dqnc_version,
                "wall_seconds": round(self.wall_seconds, 3), "passed": not self.failures and self.gates_checked,
                "verdict": self.verdict, "gates_checked": self.gates_checked, "failures": self.failures,
                "stages": [r.__dict__ for r in self.rows]}


class _Lock:
    """One ``dqnc run`` per out_dir: a second one refuses instead of racing the first."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / "lock"
        self.fd: int | None = None

    def __enter__(self) -> _Lock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"out_dir {str(self.path.parent.parent)!r} is in use by pid {holder} (another dqnc run): "
                             "wait for it, or choose another out_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _State:
    """Cache keys of finished stages and evaluations, in <out_dir>/.dqnc/state.json."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_DIR / "state.json"
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.data, dict):
                raise ValueError
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("stages", {})
        self.data.setdefault("evals", {})

    def save(self) -> None:
        from dqnc.artifact import write_json_atomic

        write_json_atomic(self.path, self.data)


Log = Callable[[str], None]


def run(loaded: LoadedRecipe, *, force: bool | set[str] = False, from_stage: str | None = None,
        until: str | None = None, log: Log = lambda s: None) -> RunReport:
    """Run the chain; always write the report. Raises GateFailed (exit 1) after writing it."""
    from dqnc import artifact as art

    r = loaded.recipe
    started = time.perf_counter()
    names = (["train"] if r.source.train is not None else []) + [s.name for s in r.stages]
    for flag, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in names:
            raise UsageError(f"{flag} {value!r} is not a stage of this recipe: use one of {', '.join(names)}")
    if isinstance(force, set):
        unknown = sorted(force - set(names))
        if unknown:
            raise UsageError(f"--force {unknown[0]!r} is not a stage of this recipe: use one of {', '.join(names)}")
    out_dir = loaded.out_dir
    art.ensure_writable_dir(out_dir, "out_dir")

    rows: list[StageRow] = []
    failures: list[str] = []
    with _Lock(out_dir):
        _save_effective(loaded)
        state = _State(out_dir)
        active = from_stage is None
        stop_after = until

        def forced(name: str) -> bool:
            return force is True or (isinstance(force, set) and name in force)

        # the source
        try:
            source, row = _resolve_source(loaded, state, forced("train"), active or from_stage == "train", log)
        except (DqncError, KeyboardInterrupt) as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            rows.append(StageRow("train" if r.source.train is not None else "source", "train", status="failed", error=why))
            _write_reports(loaded, RunReport(str(loaded.path), str(out_dir), rows, [why], time.perf_counter() - started))
            raise
        if row is not None:
            rows.append(row)
        outputs: dict[str, art.Artifact] = {"source": source}
        if r.source.train is not None:
            outputs["train"] = source
        prev = "train" if r.source.train is not None else "source"
        stopped = stop_after == "train" and bool(r.stages)
        for i, st in enumerate(r.stages):
            row = StageRow(st.name, st.stage)
            rows.append(row)
            if stopped:
                row.status = "skipped"
                continue
            if from_stage == st.name:
                active = True
            inp = outputs[st.input or prev]
            try:
                if st.stage == "eval":
                    row.path = str(inp.path)
                    res = _evaluate(loaded, state, inp, source, st, log, f"[{i + 1}/{len(r.stages)}] {st.name}")
                    row.metrics = _row_metrics(inp, res)
                    row.status = "ran"
                    _gate_row(row, res, st.gates, failures, f"stage {st.name!r}")
                    outputs[st.name] = inp
                else:
                    art_out = _run_stage(loaded, state, st, inp, active, forced(st.name), row, log, i)
                    outputs[st.name] = art_out
                    prev = st.name
            except GateFailed as e:
                row.status, row.error = "failed", str(e)
                failures.append(f"stage {st.name!r}: {e}")
                state.save()
                break
            except DqncError as e:
                row.status, row.error = "failed", str(e)
                state.save()
                _write_reports(loaded, RunReport(str(loaded.path), str(out_dir), rows, failures + [str(e)],
                                                 time.perf_counter() - started))
                raise
            except KeyboardInterrupt:
                row.status, row.error = "failed", "interrupted"
                state.save()
                _write_reports(loaded, RunReport(str(loaded.path), str(out_dir), rows, ["interrupted"],
                                                 time.perf_counter() - started))
                raise
            if st.name == stop_after and i < len(r.stages) - 1:
                stopped = True
        state.save()
        # Per-stage evaluations for the report (cached), then the recipe's gates on the last one.
        if not failures:
            for row in rows:
                if row.stage == "eval" or row.status not in ("ran", "cached") or row.name not in outputs:
                    continue
                res = _evaluate(loaded, state, outputs[row.name], source, r.eval, log, f"eval {row.name}")
                row.metrics.update(_row_metrics(outputs[row.name], res))
                stage_cfg = next((s for s in r.stages if s.name == row.name), None)
                if stage_cfg is not None and getattr(stage_cfg, "gates", None) is not None:
                    _gate_row(row, res, stage_cfg.gates, failures, f"stage {row.name!r}")
            last = next((row for row in reversed(rows) if row.status in ("ran", "cached") and row.stage != "eval"), None)
            if last is not None and not stopped:
                res = _evaluate(loaded, state, outputs[last.name], source, r.eval, log, None)
                _gate_row(last, res, r.gates, failures, "recipe")
            state.save()
        report = RunReport(str(loaded.path), str(out_dir), rows, failures, time.perf_counter() - started,
                           gates_checked=not stopped)
        if stopped and not failures:
            log(f"--until {stop_after}: later stages skipped; the recipe's gates were not checked")
        _write_reports(loaded, report)
    if failures:
        raise GateFailed("; ".join(failures), report.to_dict())
    return report


def _save_effective(loaded: LoadedRecipe) -> None:
    import yaml

    data = loaded.recipe.model_dump(mode="json", exclude_none=True)
    text = (f"# Effective recipe: {loaded.path} with --set {' '.join(loaded.sets) or '(none)'}, all defaults "
            f"filled in (dqnc {__version__}).\n" + yaml.safe_dump(data, sort_keys=False))
    tmp = loaded.out_dir / f".recipe.effective.yaml.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, loaded.out_dir / "recipe.effective.yaml")


def _resolve_source(loaded: LoadedRecipe, state: _State, force: bool, active: bool, log: Log) -> tuple[Any, StageRow | None]:
    from dqnc import artifact as art
    from dqnc.envs import env_spec

    src = loaded.recipe.source
    if src.artifact is not None:
        return art.load(loaded.resolve(src.artifact)), None
    if src.savedmodel is not None:
        return art.load(loaded.resolve(src.savedmodel), env=env_spec(src.env or "", src.env_kwargs)), None
    if src.import_ is not None:
        from dqnc.importers import adopt

        return adopt(loaded.resolve(src.import_), env_spec(src.env or "", src.env_kwargs),
                     loaded.resolve(src.obs_norm) if src.obs_norm else None, log=log), None
    assert src.train is not None
    out = loaded.out_dir / "train"
    row = StageRow("train", "train", str(out))
    key = _digest({"stage": "train", "config": src.train.model_dump(mode="json"), "dqnc": __version__})
    cached = _cached(state, "train", key, out)
    if cached is not None and not force:
        row.status = "cached"
        log(f"[train] cached: {out}")
        return cached, row
    if not active:
        raise UsageError(f"--from skips 'train' but {str(out)!r} holds no matching output: run without --from")
    from dqnc import train

    ckpt = out.with_name("train.ckpt")
    resume = (ckpt / "state.json").is_file()
    if resume:
        stale = train.checkpoint_mismatch(ckpt, src.train)
        if stale:
            log(f"[train] discarding the checkpoint in {str(ckpt)!r}: {stale}")
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)
            resume = False
        else:
            log(f"[train] resuming from the checkpoint in {str(ckpt)!r}")
    log(f"[train] training {src.train.env} for up to {src.train.total_steps:,} steps ...")
    t0 = time.perf_counter()
    result = train.run(src.train, out, force=True, checkpoint_dir=ckpt, resume=resume)
    row.seconds = time.perf_counter() - t0
    row.status = "ran"
    state.data["stages"]["train"] = {"key": key, "sha256": result.sha256}
    state.save()
    log(f"[train] done in {row.seconds:.1f} s")
    return result, row


def _cached(state: _State, name: str, key: str, out: Path) -> Any:
    from dqnc import artifact as art

    entry = state.data["stages"].get(name)
    if not entry or entry.get("key") != key or not out.exists():
        return None
    try:
        a = art.load(out)
    except DqncError:
        return None
    return a if a.sha256 == entry.get("sha256") else None


def _run_stage(loaded: LoadedRecipe, state: _State, st: Any, inp: Any, active: bool, force: bool, row: StageRow,
               log: Log, i: int) -> Any:
    from dqnc import artifact as art

    out = loaded.out_dir / st.name
    row.path = str(out)
    options = st.model_dump(mode="json", exclude={"name", "input", "stage", "gates"})
    key = _digest({"stage": st.stage, "options": options, "input": inp.sha256, "dqnc": __version__})
    label = f"[{i + 1}/{len(loaded.recipe.stages)}] {st.name} ({st.stage})"
    cached = _cached(state, st.name, key, out)
    if cached is not None and not force:
        row.status = "cached"
        log(f"{label}: cached")
        return cached
    if not active:
        if out.exists():
            raise UsageError(f"--from skips {st.name!r} but {str(out)!r} was made from another input or with other "
                             "options (its cache key differs): start earlier, or run without --from")
        raise UsageError(f"--from skips {st.name!r} but {str(out)!r} does not exist: start earlier")
    log(f"{label}: running ...")
    t0 = time.perf_counter()
    if st.stage == "prune":
        from dqnc import prune

        result = prune.run(PruneConfig(**options), inp, out, force=True)
    elif st.stage == "distill":
        from dqnc import distill

        result = distill.run(DistillConfig(**options), inp, out, force=True, log=log)
    elif st.stage == "quantize":
        from dqnc import quantize

        result = quantize.run(QuantizeConfig(**options), inp, out, force=True)
    else:
        from dqnc import export

        result = export.run(ExportConfig(**options), inp, out, force=True)
    row.seconds = time.perf_counter() - t0
    row.status = "ran"
    state.data["stages"][st.name] = {"key": key, "sha256": result.sha256}
    state.save()
    log(f"{label}: done in {row.seconds:.1f} s")
    return result


def _evaluate(loaded: LoadedRecipe, state: _State, target: Any, source: Any, cfg: EvalConfig, log: Log,
              label: str | None) -> dict[str, Any]:
    from dqnc import evaluate

    plain = EvalConfig(episodes=cfg.episodes, seed=cfg.seed, latency_samples=cfg.latency_samples)
    reference = None if target.sha256 == source.sha256 else source
    # Latency belongs to the machine that measured it: another machine re-evaluates.
    key = _digest({"target": target.sha256, "reference": None if reference is None else reference.sha256,
                   "eval": plain.model_dump(mode="json"), "dqnc": __version__, "machine": machine_fingerprint()})
    cached = state.data["evals"].get(key)
    if cached is not None:
        return cached
    if label:
        log(f"{label}: evaluating {cfg.episodes} episodes ...")
    res = evaluate.run(plain, target, reference)
    state.data["evals"][key] = res
    return res


def machine_fingerprint() -> str:
    """Host name, CPU model and core count: what latency figures depend on."""
    import platform

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{platform.node()}|{platform.machine()}|{cpu or platform.processor()}|{os.cpu_count()}"


def _row_metrics(a: Any, res: dict[str, Any]) -> dict[str, Any]:
    m = a.manifest
    ref = res.get("reference") or {}
    lat = (res.get("latency_us") or {}).get("action") or {}
    inv = (res.get("latency_us") or {}).get("invoke") or {}
    return {
        "size_bytes": res["size_bytes"],
        "gzip_bytes": res["gzip_bytes"],
        "sparsity": _sparsity_of(m),
        "precision": (m.get("quantization") or {}).get("mode", "fp32"),
        "mean_return": res["mean_return"],
        "return_ci95": res.get("return_ci95"),
        "std_return": res["std_return"],
        "solved_share": res["solved_share"],
        "regret": ref.get("regret", 0.0 if not ref else None),
        "regret_p99": ref.get("regret_p99", 0.0 if not ref else None),
        "agreement": ref.get("agreement", 1.0 if not ref else None),
        "states": ref.get("states"),
        "decisive_agreement": ref.get("decisive_agreement", 1.0 if not ref else None),
        "decisive_states": ref.get("decisive_states"),
        "decisive_share": ref.get("decisive_share"),
        "return_drop_frac": ref.get("return_drop_frac", 0.0 if not ref else None),
        "return_drop_frac_ci95": ref.get("return_drop_frac_ci95"),
        "latency_p50_us": lat.get("p50"),
        "latency_p99_us": lat.get("p99"),
        "invoke_p50_us": inv.get("p50"),
        "runtime": res.get("runtime"),
        "episodes": res["episodes"],
    }


def _sparsity_of(manifest: dict[str, Any]) -> float | None:
    m = manifest.get("metrics") or {}
    if "sparsity" in m:
        return float(m["sparsity"])
    if "parent_sparsity" in m:
        return float(m["parent_sparsity"])
    return None if manifest.get("stage") == "export" else 0.0


def _gate_row(row: StageRow, res: dict[str, Any], gates: Gates | None, failures: list[str], who: str) -> None:
    from dqnc import evaluate

    if gates is None or not any(v is not None for v in gates.model_dump().values()):
        return
    probe = dict(res, gates=[])
    try:
        evaluate._apply_gates(EvalConfig(gates=gates), probe)
    except GateFailed as e:
        failures.append(f"{who}: {e}")
    row.gates += [dict(g, scope=who) for g in probe["gates"]]


# --- reports -------------------------------------------------------------------------------------

def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "bytes":
        return f"{v:,}"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if kind == "us":
        return f"{v:.1f}"
    if kind == "ret":
        return f"{v:.1f}"
    if kind == "regret":
        return f"{v:.3f}"
    return str(v)


def _ci(m: dict[str, Any]) -> str:
    ci = m.get("return_ci95")
    if m.get("mean_return") is None:
        return "-"
    if not ci or any(abs(c) == float("inf") for c in ci):
        return f"{m['mean_return']:.1f}"
    return f"{m['mean_return']:.1f}±{(ci[1] - ci[0]) / 2:.1f}"


def _decisive(m: dict[str, Any]) -> str:
    if m.get("decisive_agreement") is None:
        return "-"
    share = m.get("decisive_share")
    return f"{100 * m['decisive_agreement']:.0f}%" + (f"/{100 * share:.0f}%" if share is not None else "")


# (heading, metric key, format). One definition for the terminal table and report.md; it fits 80
# columns: ``decisive`` is agreement on decisive states / their share of the states.
COLUMNS = [("prec.", "precision", ""), ("bytes", "size_bytes", "bytes"), ("return±CI", "return_ci95", "ci"),
           ("regret", "regret", "regret"), ("agree", "agreement", "pct"), ("decisive", "decisive_agreement", "dec"),
           ("p50 us", "latency_p50_us", "us")]


def table_rows(report: RunReport) -> list[list[str]]:
    """Name, the COLUMNS, and status for each stage (gates are listed separately)."""
    out = []
    for row in report.rows:
        cells = [row.name]
        for _, key, kind in COLUMNS:
            m = row.metrics
            cells.append(_ci(m) if kind == "ci" else _decisive(m) if kind == "dec" else _fmt(m.get(key), kind))
        cells.append(row.status + (f" {row.seconds:.0f}s" if row.status == "ran" and row.seconds >= 0.5 else ""))
        out.append(cells)
    return out


def gate_lines(report: RunReport) -> list[tuple[bool, str]]:
    return [(g["passed"], f"gate {g['gate']} ({g['scope']}) on {row.name}: measured {g['value']:.4g}, "
             f"threshold {g['threshold']:g}: {'pass' if g['passed'] else 'FAIL'}")
            for row in report.rows for g in row.gates]


def markdown(report: RunReport) -> str:
    head = ["name"] + [c[0] for c in COLUMNS] + ["status"]
    lines = [f"## dqnc run `{report.recipe}`", "",
             f"**{report.verdict}** in {report.wall_seconds:.1f} s "
             f"(dqnc {report.dqnc_version}); outputs in `{report.out_dir}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cells in table_rows(report):
        lines.append("| " + " | ".join(cells) + " |")
    gates = [(row.name, g) for row in report.rows for g in row.gates]
    if gates:
        lines += ["", "| gate | on | threshold | measured | verdict |", "|---|---|---|---|---|"]
        for name, g in gates:
            lines.append(f"| {g['gate']} ({g['scope']}) | {name} | {g['threshold']:g} | {g['value']:.4g} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} |")
    if not report.gates_checked:
        lines += ["", "The recipe's gates were not checked: --until stopped the chain before its last stage."]
    if report.failures:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in report.failures]
    lines += ["", "return±CI: mean return and the half-width of its 95% confidence interval over the evaluation "
              "episodes (held-out seeds). regret: the source policy's mean Q loss from each model's chosen actions, as "
              "a fraction of its action spread (dqnc.fidelity). agree: greedy actions matching the source on every "
              "state the model visits; decisive: agreement on states where the source's top-two Q gap is at least 1% "
              "of its Q range / the share of such states."]
    return "\n".join(lines) + "\n"


def _write_reports(loaded: LoadedRecipe, report: RunReport) -> None:
    from dqnc.artifact import write_json_atomic

    write_json_atomic(loaded.out_dir / "report.json", report.to_dict())
    tmp = loaded.out_dir / f".report.md.tmp-{os.getpid()}"
    tmp.write_text(markdown(report), encoding="utf-8")
    os.replace(tmp, loaded.out_dir / "report.md")
