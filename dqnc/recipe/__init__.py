"""Recipes: a YAML file that names a source and an ordered chain of stages, run like a Makefile.

    source:  {artifact: PATH} | {savedmodel: PATH, env: ID} | {import: PATH, env: ID, obs_norm?: PKL}
             | {train: {env: ID, ...}}
    stages:  [{name, stage: prune|distill|quantize|export|eval (dqnc.stages.STAGES), input?, gates?, ...options}]
    eval:    evaluation settings for the per-stage report (episodes, seed, latency_samples)
    gates:   checked on the last stage's evaluation

Each stage writes ``<out_dir>/<name>/``. A stage whose input artifact and effective options are
unchanged (content hashes) is skipped, so a re-run is near-instant and a failed run resumes at
the failed stage. Validation (schema, line numbers, stage order, env ids, paths) finishes before
TensorFlow is imported.

The package is split by concern: ``schema`` (pydantic models), ``loader`` (YAML, --set,
validation), ``cache`` (keys, lock, state), ``runner`` (the chain) and ``report`` (tables,
report.md/json).
"""

from __future__ import annotations

from dqnc.recipe.cache import STATE_DIR, Lock, machine_fingerprint
from dqnc.recipe.loader import LoadedRecipe, apply_sets, load
from dqnc.recipe.report import COLUMNS, RunReport, StageRow, gate_lines, markdown, table_rows
from dqnc.recipe.runner import run
from dqnc.recipe.schema import STAGE_MODELS, Recipe, Source, json_schema, recipe_model

__all__ = ["COLUMNS", "STAGE_MODELS", "STATE_DIR", "LoadedRecipe", "Lock", "Recipe", "RunReport", "Source", "StageRow",
           "apply_sets", "gate_lines", "json_schema", "load", "machine_fingerprint", "markdown", "recipe_model", "run",
           "table_rows"]
