"""Loading a recipe: YAML with line numbers, --set overrides, validation and semantic checks,
all before TensorFlow is imported."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dqnc.config import fields_at, first_error, read_text, unknown_key_message
from dqnc.errors import ConfigError, UsageError
from dqnc.limits import clip
from dqnc.recipe.schema import MAX_YAML_NODES, Recipe, recipe_model, stage_models
from dqnc.stages import STAGES


def _compose(text: str, path: Path) -> Any:
    from dqnc import yamlio

    return yamlio.compose_file(text, path)


def _to_python(node: Any, path: Path, lines: dict[tuple, int]) -> Any:
    """Build plain data from YAML nodes, recording each key's line and capping the expanded size."""
    import yaml

    from dqnc.yamlio import Loader

    budget = [MAX_YAML_NODES]
    constructor = Loader("")

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
    from dqnc import yamlio

    done = []
    for item in sets:
        key, sep, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not sep or not parts:
            raise UsageError(f"--set {clip(item)!r}: expected KEY=VALUE, e.g. --set prune.sparsity=0.9")
        value = yamlio.scalar(raw) if raw.strip() else ""
        target, parts = _set_target(data, parts, item)
        for p in parts[:-1]:
            nxt = target.get(p) if isinstance(target, dict) else None
            if nxt is None:
                nxt = {}
                target[p] = nxt
            if not isinstance(nxt, dict):
                raise UsageError(f"--set {clip(item)!r}: {p!r} is not a mapping")
            target = nxt
        target[parts[-1]] = value
        done.append(key)
    return done


def _stage_options(stage: dict[str, Any]) -> list[str]:
    """The keys a recipe stage of this ``stage:`` type accepts (none for an unknown type)."""
    model = stage_models().get(stage.get("stage")) if isinstance(stage.get("stage"), str) else None
    return list(model.model_fields) if model is not None else []


def _set_target(data: dict[str, Any], parts: list[str], item: str) -> tuple[Any, list[str]]:
    """The mapping a --set KEY writes into, and the KEY's parts below it; a KEY that names
    neither a stage nor a recipe key, or an option its stage lacks, is refused with the nearest."""
    stages = [s for s in data.get("stages") or [] if isinstance(s, dict)] if isinstance(data.get("stages"), list) else []
    names = [str(s.get("name")) for s in stages if s.get("name") is not None]
    by_name = {str(s.get("name")): s for s in stages}
    if parts[0] in by_name and len(parts) > 1:
        stage, rest = by_name[parts[0]], parts[1:]
        options = _stage_options(stage)
        if options and rest[0] not in options:
            close = difflib.get_close_matches(rest[0], options, n=1, cutoff=0.5)
            hint = (f"did you mean {parts[0] + '.' + close[0]!r}?" if close
                    else f"its options: {', '.join(o for o in options if o not in ('name', 'stage'))}")
            raise UsageError(f"--set {clip(item)!r}: stage {parts[0]!r} ({stage.get('stage')}) has no option "
                             f"{clip(rest[0])!r}: {hint}")
        return stage, rest
    if parts[0] in Recipe.model_fields:  # the same keys for every registry
        return data, parts
    owners = [f"{n}.{'.'.join(parts)}" for n in names if parts[0] in _stage_options(by_name[n])]
    if not owners:
        options = {f"{n}.{o}": o for n in names for o in _stage_options(by_name[n])}
        close = difflib.get_close_matches(parts[0], names + list(Recipe.model_fields), n=1)
        near = difflib.get_close_matches(parts[0], list(dict.fromkeys(options.values())), n=1, cutoff=0.7)
        owners = close or [q for q, o in options.items() if near and o == near[0]]
    hint = f": did you mean {' or '.join(repr(o) for o in owners[:3])}?" if owners else ""
    raise UsageError(f"--set {clip(item)!r}: {clip(parts[0])!r} is neither a stage name nor a recipe key{hint} "
                     f"(stages: {', '.join(names) or 'none'}; recipe keys: {', '.join(Recipe.model_fields)})")


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
        recipe = recipe_model().model_validate(data)
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
    models = stage_models()
    # Discriminated unions put the stage type into the location: stages.0.prune.sparsity
    if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] in models:
        model: Any = models[loc[2]]
        del loc[2]
    else:
        model = None
    loc_t = _data_path(loc, data)
    key_path = ".".join(str(p) for p in loc_t) or "(top level)"
    line = None
    for n in range(len(loc_t), 0, -1):
        if loc_t[:n] in lines:
            line = lines[loc_t[:n]]
            break
    where = f"{path}:{line}" if line else str(path)
    if any(s.split(".")[-1] in map(str, loc_t) for s in sets):
        where += " (after --set)"
    if err["type"] == "extra_forbidden":
        fields = list(model.model_fields) if model is not None and len(loc_t) == 3 else fields_at(recipe_model(), loc_t[:-1])
        return unknown_key_message(where, key_path, str(loc_t[-1]), fields)
    if err["type"] == "union_tag_invalid" or (err["type"] == "union_tag_not_found"):
        return (f"{where}: {key_path}: 'stage' must be one of {', '.join(models)}"
                + (f" (got {err.get('input', {}).get('stage')!r})" if isinstance(err.get("input"), dict) else ""))
    if err["type"] == "missing" and loc_t == ("source",):
        return (f"{where}: missing key 'source': add one of source: {{artifact: PATH}}, "
                "{savedmodel: PATH, env: ID} or {train: {env: ID}}")
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("missing", "value_error") and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return f"{where}: {key_path}: {msg}"


def _data_path(loc: list[Any], data: Any) -> tuple:
    """``loc`` without the union members pydantic names in it (``hidden.list[int].0`` is
    ``hidden.0``): a part that is not a key of the data there and reads like a type is dropped."""
    out: list[Any] = []
    here = data
    for part in loc:
        present = (isinstance(here, dict) and part in here) or (isinstance(here, list) and isinstance(part, int))
        if not present and isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            continue
        out.append(part)
        here = here[part] if present and isinstance(here, dict) else (
            here[part] if present and part < len(here) else None)
    return tuple(out)


_TYPE_TAGS = {"int", "float", "str", "bool", "none", "list", "dict", "tuple", "constrained-int", "constrained-float",
              "literal", "function-after", "function-before", "function-plain", "function-wrap"}


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
        from dqnc.envs import trust

        trust(env_id)  # the recipe the user runs names it: a 'module:Env' id may be imported
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
        kind, stage = kinds[inp], STAGES[st.stage]
        if kind not in stage.reads:
            raise ConfigError(f"{at('stages', i)}: stage {st.name!r} ({st.stage}) reads {inp!r}, {_KIND_NAMES[kind]}; "
                              + (f"{st.stage} needs a SavedModel: put {st.stage} before quantize/export, or read an "
                                 "earlier stage" if kind == "tflite" else f"{st.stage} needs a TFLite model: put "
                                 f"{st.stage} after quantize, or read a later stage"))
        kinds[st.name] = stage.writes or kind  # a measuring stage (eval) passes its input on
        prev = st.name if stage.writes is not None else inp
    from dqnc.recipe.cache import check_out_dir_location

    try:
        check_out_dir_location(loaded.out_dir)
    except UsageError as e:
        raise ConfigError(f"{at('out_dir')}: {e}") from None
    if loaded.out_dir.exists() and not loaded.out_dir.is_dir():
        raise ConfigError(f"{at('out_dir')}: out_dir {str(loaded.out_dir)!r} is an existing file: choose a directory path")


_KIND_NAMES = {"tflite": "a TFLite model", "savedmodel": "a SavedModel"}


def _check_env_id(env_id: str, where: str) -> None:
    if ":" in env_id:
        import importlib.util

        module = env_id.split(":", 1)[0]
        top = module.split(".", 1)[0]  # find_spec('a.b') would import (run) package 'a': look, don't run
        try:
            found = bool(top) and importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(f"{where}: env {clip(env_id)!r}: module {clip(top)!r} cannot be found: install it, or if "
                              "it is your own file, run from its folder or put it on PYTHONPATH (e.g. PYTHONPATH=.)")
        return
    import gymnasium as gym

    from dqnc.envs import register_on_demand
    from dqnc.errors import EnvError

    try:
        register_on_demand(env_id)  # MinAtar ids exist once minatar has registered them
    except EnvError as e:
        raise ConfigError(f"{where}: {e}") from None
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown env id {env_id!r}{hint}: use a registered gymnasium id or 'module:Env-v0'")
