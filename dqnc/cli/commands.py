"""The commands: parse options, build a config, call one library function, render its result.

One module for all of them: with every stage flag generated (dqnc.cli.options) and every line of
output in dqnc.cli.render, a command is a signature and a few lines, and reading them side by
side shows that they all have the same shape. dqnc.cli registers them on the Typer app.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dqnc import api, progress
from dqnc import config as _cfg
from dqnc.cli import render
from dqnc.cli.guard import guard
from dqnc.cli.options import (DISTILL_FLAGS, IMPORT_FLAGS, PRUNE_FLAGS, QUANTIZE_FLAGS, TRAIN_FLAGS, EnvKwargsOption,
                              EnvOption, Flag, ForceOption, JsonOption, SetOption, env_arg, env_spec_of, out_option,
                              stage_options)
from dqnc.errors import GateFailed
from dqnc.stages import STAGES, join_names, seeded_names

# Training options some envs tune (dqnc.config.ENV_DEFAULTS, Atari): their help says so.
_TUNED = frozenset(k for d in (*_cfg.ENV_DEFAULTS.values(), _cfg.train_defaults("ALE/Pong-v5")) for k in d)
_EVAL_MAIN = (*_cfg.EvalConfig.model_fields, *_cfg.Gates.model_fields)
TrainOut = out_option("runs/ENV-seedSEED", "Output artifact directory")
ImportOut = out_option("MODEL-imported", "Output artifact directory")
SweepOut = out_option("the recipe's out_dir + '-sweep'", "Sweep folder")
PruneOut = out_option("PATH-prunedNN")
QuantizeOut = out_option("PATH-MODE")
BundleOut = out_option("PATH-bundle", "Bundle directory")
DistillOut = out_option("PATH-student-WIDTHS")
# The chain stages' flags come from their registry entry's config (dqnc.stages); train and import are sources.


def _config(stage: str, values: dict[str, Any]) -> Any:
    """A stage command's config, validated with its errors worded as flags (``--sparsity: ...``)."""
    return _cfg.validate(STAGES[stage].config, values, "options")


def _argv() -> list[str]:
    return ["dqnc", *sys.argv[1:]]


@guard
@stage_options(_cfg.TrainConfig, flags=TRAIN_FLAGS, tuned=_TUNED, main=(
    "env", "env_kwargs", "seed", "total_steps", "num_envs", "hidden", "dueling", "lr", "batch_size", "buffer_size",
    "learning_starts", "gamma", "train_freq", "gradient_steps", "target_update_interval", "tau", "eps_end",
    "eps_fraction", "eval_freq", "eval_episodes", "confirm_episodes", "early_stop", "replay", "n_step", "actors"))
def train(
    values: dict[str, Any],
    out: TrainOut = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of training options (flags override it).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint an interrupted run left at OUT.ckpt.")] = False,
    logdir: Annotated[Optional[Path], typer.Option(help="Write TensorBoard scalars here.")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster for --actors (default: RAY_ADDRESS, "
                                                   "else a local Ray).")] = None,
    force: ForceOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Train a DQN policy on ENV and save it as an fp32 SavedModel artifact."""
    from dqnc.config import build_train_config, load_yaml_mapping

    file_values = load_yaml_mapping(config) if config is not None else {}
    cfg = build_train_config(values.get("env"), file_values, values, source=str(config) if config else "options")
    result = api.train(cfg, out, force=force, resume=resume, logdir=logdir, address=address, command=_argv())
    render.train(result, cfg, as_json)


@guard
@stage_options(STAGES["prune"].config, flags=PRUNE_FLAGS, main=(
    "sparsity", "schedule", "distribution", "finetune", "keep_dense", "layer_sparsity", "states", "epochs",
    "dagger_rounds", "distill_loss", "temperature", "score_gain", "rl_steps", "structure", "importance",
    "unit_rounds", "seed"))
def prune(
    values: dict[str, Any],
    path: Annotated[Path, typer.Argument(help="SavedModel artifact (or Keras SavedModel with --env) to prune.")],
    out: PruneOut = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Magnitude-prune a policy (TFMOT) while fine-tuning it to act like its parent."""
    result = api.prune(path, out, _config("prune", values), env=env_arg(env, env_kwargs), force=force, command=_argv())
    render.prune(result, as_json)


@guard
@stage_options(STAGES["quantize"].config, flags=QUANTIZE_FLAGS, main=(
    "mode", "float_io", "target", "sparse_encoding", "output_range", "calibration_states", "check_states",
    "max_regret", "max_return_drop", "check_episodes", "min_agreement", "min_decisive_agreement", "max_q_rel_error",
    "seed", "strip_strings"))
def quantize(
    values: dict[str, Any],
    path: Annotated[Path, typer.Argument(help="SavedModel artifact to convert.")],
    out: QuantizeOut = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Convert a policy to TFLite (int8 by default), calibrated on its own rollouts and checked against it."""
    cfg = _config("quantize", values)
    result = api.quantize(path, out, cfg, env=env_arg(env, env_kwargs), force=force, command=_argv())
    render.quantize(result, cfg.mode, as_json)


@guard
@stage_options(STAGES["export"].config, main=("target", "check_states", "seed", "c_name"))
def export(
    values: dict[str, Any],
    path: Annotated[Path, typer.Argument(help="Artifact to bundle (.tflite artifact, or SavedModel -> fp32 TFLite).")],
    out: BundleOut = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    verify_mcu: Annotated[bool, typer.Option("--verify-mcu", help="Also build policy.c for a Cortex-M4 and run it on QEMU (needs arm-none-eabi-gcc, qemu-system-arm).")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace an existing output.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Write the edge bundle: model.tflite, C array, manifest, SHA256SUMS and a TF-free runner (+ TFLM/C files for mcu)."""
    result = api.export(path, out, _config("export", values), env=env_arg(env, env_kwargs), force=force,
                        command=_argv())
    mcu = None
    if verify_mcu:
        from dqnc import mcu as mcu_mod

        with progress.task("Cortex-M4 on QEMU"):
            mcu = mcu_mod.verify_bundle(result.path)
    render.export(result, mcu, result.env, as_json)


@guard
@stage_options(_cfg.ImportConfig, flags=IMPORT_FLAGS, main=("env", "env_kwargs", "obs_norm", "activation",
                                                             "check_states", "seed"))
def import_cmd(
    values: dict[str, Any],
    model: Annotated[Path, typer.Argument(help="Keras 3 .keras/.h5, tf_keras SavedModel/.h5, Keras 3 export() SavedModel, .onnx, SB3 DQN .zip, or CleanRL .cleanrl_model / state_dict.")],
    out: ImportOut = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Import a Q-network made elsewhere as an fp32 artifact, checked against the source to 1e-5 of its Q range."""
    from dqnc.importers import run as run_import

    spec = env_spec_of(values["env"], values.get("env_kwargs"))
    cfg = _cfg.validate(_cfg.ImportConfig, {**values, "env_kwargs": spec.kwargs}, "options")
    out = out or api.default_out(model, "imported")
    with progress.task(f"import {model.name}"):
        result = run_import(cfg, model, out, force=force, command=_argv(), spec=spec)
    render.imported(result, model, as_json)


@guard
@stage_options(STAGES["distill"].config, flags=DISTILL_FLAGS, main=(
    "hidden", "max_return_drop", "widths", "depth", "states", "steps", "dagger_rounds", "dagger_steps", "seed"))
def distill(
    values: dict[str, Any],
    path: Annotated[Path, typer.Argument(help="Parent policy artifact (any stage), or a Keras SavedModel with --env.")],
    out: DistillOut = None,
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Teach a small dense student MLP the parent's policy (policy distillation + DAgger)."""
    result = api.distill(path, out, _config("distill", values), env=env_arg(env, env_kwargs), force=force,
                         command=_argv(), log=None if as_json else render.log)
    render.distill(result, as_json)


@guard
@stage_options(STAGES["eval"].config, flags={"episodes": Flag(decls=("--episodes", "-n"))}, main=_EVAL_MAIN)
def eval_cmd(
    values: dict[str, Any],
    path: Annotated[Path, typer.Argument(help="Artifact directory, bundle, SavedModel or .tflite file.")],
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", "-r", help="Parent policy: report action agreement, Q error and return drop against it.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Run greedy episodes of a policy and report returns, agreement, size and latency (exit 1 when a gate fails)."""
    cfg = _cfg.validate(_cfg.EvalConfig, values, "options")
    try:
        result = api.evaluate(path, reference, cfg, env=env_arg(env, env_kwargs))
    except GateFailed as e:
        render.evaluation(e.result, as_json)
        raise
    render.evaluation(result.metrics, as_json)


@guard
def inspect(
    path: Annotated[Path, typer.Argument(help="Artifact directory, SavedModel or .tflite file.")],
    env: EnvOption = None,
    env_kwargs: EnvKwargsOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Summarize an artifact: stage, env, layers, parameters, sparsity, sizes."""
    from dqnc import sources
    from dqnc.inspection import summarize

    render.inspection(summarize(sources.load(path, env=env_arg(env, env_kwargs))), as_json)


@guard
def version(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Print dqnc's version and the versions of the libraries it uses (for bug reports)."""
    from dqnc.artifact import library_versions

    render.versions(library_versions(), as_json)


@guard
def recipe_validate(
    path: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Check a recipe completely (schema, stage order, env ids, paths) without running anything."""
    from dqnc import recipe

    render.recipe_valid(path, recipe.load(path, set_ or []), as_json)


def recipe_schema() -> None:
    """Print the recipe JSON Schema (for editor completion and validation)."""
    import json

    from dqnc.recipe import json_schema

    render.echo(json.dumps(json_schema(), indent=2))


@guard
def run_cmd(
    path: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Re-run every stage, cached or not.")] = False,
    force_stage: Annotated[Optional[list[str]], typer.Option("--force-stage", help="Re-run this stage even if cached (repeatable).")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Start at this stage (earlier outputs must exist).")] = None,
    until: Annotated[Optional[str], typer.Option("--until", help="Stop after this stage.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or stage lines.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
) -> None:
    """Run a recipe: each stage cached by content hash, a report at the end, exit 1 if a gate fails."""
    from dqnc import recipe

    loaded = recipe.load(path, set_ or [])
    try:
        report = api.run_recipe(loaded, force=True if force else list(force_stage or []), from_stage=from_stage,
                                until=until, log=(lambda msg: None) if quiet else render.log)
    except GateFailed as e:
        render.report(e.result, loaded, as_json)
        raise
    render.report(report.to_dict(), loaded, as_json)


@guard
def sweep_cmd(
    path: Annotated[Path, typer.Argument(help="Recipe YAML file (its optional sweep: section sets the defaults).")],
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="KEY=V1,V2,... searched over (repeatable; values "
                                                      "are YAML: student.hidden=[8,8],[16,16]).")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Repeat each combination with seeds 0..N-1 "
                                                 f"on every {join_names(seeded_names(), 'and')} stage.")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help=r"A running Ray cluster (also RAY_ADDRESS) "
                                                   r"\[default: a local one with this machine's cores].")] = None,
    pick: Annotated[Optional[str], typer.Option("--pick", help="smallest-passing: write best.yaml, the recipe of the "
                                                "smallest trial that passes every gate (else the closest; exit 1).")] = None,
    max_parallel: Annotated[Optional[int], typer.Option("--max-parallel", min=1, help=r"Trials in flight at once "
                                                        r"\[default: the cluster's CPUs].")] = None,
    trial_timeout: Annotated[Optional[float], typer.Option("--trial-timeout", min=1, help="Stop a trial after this "
                                                           "many seconds and record it as timed out.")] = None,
    out: SweepOut = None,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", help="Re-run trials the journal holds as errors "
                                               "or timeouts.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print sweep.json's summary as one JSON object.")] = False,
) -> None:
    """Search a recipe's compression space on Ray: one trial per combination, a journal to resume, the Pareto front."""
    from dqnc import recipe, sweep
    from dqnc.recipe.schema import Sweep

    loaded = recipe.load(path, [])
    if pick not in (None, "smallest-passing"):
        raise typer.BadParameter(f"{pick!r}: the only rule is smallest-passing", param_hint="--pick")
    spec = loaded.recipe.sweep or Sweep()
    trials = sweep.expand(path.read_text(encoding="utf-8"), loaded.data, {**spec.grid, **sweep.parse_grid(grid or [])},
                          seeds or spec.seeds, spec.samples, spec.sample_seed)
    sweep_dir = out if out is not None else loaded.out_dir.with_name(loaded.out_dir.name + "-sweep")
    trials_shown = render.sweep_progress(quiet)
    try:
        result = sweep.run_sweep(path, trials, sweep_dir, address=address, max_parallel=max_parallel or spec.max_parallel,
                                 trial_timeout=trial_timeout or spec.trial_timeout, retry_errors=retry_errors,
                                 on_event=trials_shown)
    except KeyboardInterrupt:
        from dqnc.errors import Interrupted

        raise Interrupted(f"interrupted: {trials_shown.finished} of {len(trials)} trials are in "
                          f"{sweep_dir / sweep.JOURNAL}; run the same command again to resume") from None
    finally:
        trials_shown.stop()
    sweep.write_outputs(result, path, pick or spec.pick)
    render.sweep(result, path, sweep_dir, as_json)
    _sweep_verdict(result, sweep_dir, pick or spec.pick)


def _sweep_verdict(result: Any, sweep_dir: Path, pick: str | None) -> None:
    """Name best.yaml, or fail (exit 1) when no trial passes every gate."""
    d = result.to_dict()
    if d["pick"] is not None:
        msg = f"best.yaml: trial {d['pick']['id']} ({' '.join(result.pick['sets'])})"
        if not d["pick"]["passes"]:
            raise GateFailed(f"no trial passes every gate; {msg} is the closest and misses: " + "; ".join(d["pick"]["misses"]))
        render.note(f"{msg}, the smallest that passes every gate: dqnc run {sweep_dir / 'best.yaml'}")
    elif pick and result.pick is None:
        raise GateFailed("no trial produced a measured model (every one errored): see sweep.md; nothing to pick")


@guard
def plot(
    path: Annotated[Path, typer.Argument(help="A train artifact (its learning curve) or a recipe run folder (its "
                                         "out_dir: size vs return, and its train stage's learning curve).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the PNG files [default: the run "
                                                "folder; beside an artifact].")] = None,
    force: ForceOption = False,
) -> None:
    """Draw a learning curve or a recipe's size-vs-return picture as PNG files (one line per file)."""
    from dqnc.plot import plot as draw

    render.written(draw(path, out, force=force))


@guard
def schema(
    name: Annotated[Optional[str], typer.Argument(help="manifest, or a command with --json (eval, run, export, ...); "
                                                  "none: list them.")] = None,
) -> None:
    """Print the JSON Schema of manifest.json or of a command's --json object (shipped in dqnc/schemas/)."""
    import json

    from dqnc import schemas

    if name is None:
        render.echo("\n".join(schemas.names()))
        return
    render.echo(json.dumps(schemas.load(name), indent=2))
