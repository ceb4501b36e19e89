"""Running a recipe: the source, each stage (cached by content hash), evaluations and gates."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqnc import __version__, progress
from dqnc.config import EvalConfig, Gates
from dqnc.errors import DqncError, GateFailed, UsageError
from dqnc.recipe.cache import (Lock, OutDir, SharedCache, State, cached_output, digest, machine_fingerprint,
                               shared_writer)
from dqnc.recipe.loader import LoadedRecipe
from dqnc.recipe.report import RunReport, StageRow, row_metrics, set_source_bytes, source_metrics, write_reports
from dqnc.stages import STAGES, Stage

Log = Callable[[str], None]
TENSORBOARD = "tensorboard"  # out_dir/tensorboard/<stage name>: the runs TensorBoard shows side by side


def run(loaded: LoadedRecipe, *, force: bool | set[str] = False, from_stage: str | None = None,
        until: str | None = None, log: Log = lambda s: None, shared_cache: SharedCache | None = None) -> RunReport:
    """Run the chain; always write the report. Raises GateFailed (exit 1) after writing it.

    ``shared_cache`` (a sweep's): stage outputs and evaluations another run already made with the
    same key are copied from it instead of recomputed, and new ones are published to it."""
    from dqnc import artifact as art

    started = time.perf_counter()
    _check_stage_flags(loaded, force, from_stage, until)
    # Before anything is written: '/', the home folder and folders dqnc did not make are refused,
    # and so is anything in a dqnc out_dir this run would replace that is not what dqnc wrote.
    owner = _owner(loaded)
    owner.check()
    art.ensure_writable_dir(loaded.out_dir, "out_dir")
    with Lock(loaded.out_dir):
        owner.check()  # again, now that no other run can change it
        owner.claim()
        _save_effective(loaded, owner)
        ctx = _Run(loaded, owner, State(loaded.out_dir, shared_cache), force, log, started)
        source = ctx.source(from_stage is None or from_stage == "train")
        stopped = ctx.chain(from_stage, until)
        ctx.state.save()
        if not ctx.failures:
            ctx.evaluate_rows(source, stopped)
        report = ctx.finish(source, stopped, until)
    if ctx.failures:
        raise GateFailed("; ".join(ctx.failures), report.to_dict())
    return report


def _check_stage_flags(loaded: LoadedRecipe, force: bool | set[str], from_stage: str | None, until: str | None) -> None:
    r = loaded.recipe
    names = (["train"] if r.source.train is not None else []) + [s.name for s in r.stages]
    for flag, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in names:
            raise UsageError(f"{flag} {value!r} is not a stage of this recipe: use one of {', '.join(names)}")
    if isinstance(force, set):
        unknown = sorted(force - set(names))
        if unknown:
            raise UsageError(f"--force {unknown[0]!r} is not a stage of this recipe: use one of {', '.join(names)}")


@dataclass
class _Run:
    """One run in progress: the report's rows, the gate failures and each stage's output."""

    loaded: LoadedRecipe
    owner: OutDir
    state: State
    force: bool | set[str]
    log: Log
    started: float
    rows: list[StageRow] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def forced(self, name: str) -> bool:
        return self.force is True or (isinstance(self.force, set) and name in self.force)

    def write(self, failures: list[str], **extra: Any) -> RunReport:
        report = RunReport(str(self.loaded.path), str(self.loaded.out_dir), self.rows, failures,
                           time.perf_counter() - self.started, **extra)
        _write_owned_reports(self.loaded, self.owner, report)
        return report

    def source(self, active: bool) -> Any:
        """The chain's start (trained here when the recipe says so); a failure is reported, then raised."""
        r = self.loaded.recipe
        try:
            source, row = _resolve_source(self.loaded, self.state, self.forced("train"), active, self.log)
        except (DqncError, KeyboardInterrupt) as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            self.rows.append(StageRow("train" if r.source.train is not None else "source", "train", status="failed",
                                      error=why))
            self.write([why])
            raise
        # The report's first row is the source: trained here, or the model the recipe names.
        self.rows.append(row if row is not None else StageRow("source", "source", str(source.path), "loaded"))
        self.outputs["source"] = source
        if r.source.train is not None:
            self.outputs["train"] = source
        return source

    def chain(self, from_stage: str | None, until: str | None) -> bool:
        """Run the stages in order; True when --until stopped the chain early."""
        r = self.loaded.recipe
        active = from_stage is None
        prev = "train" if r.source.train is not None else "source"
        stopped = until == "train" and bool(r.stages)
        for i, st in enumerate(r.stages):
            row = StageRow(st.name, st.stage)
            self.rows.append(row)
            if stopped:
                row.status = "skipped"
                continue
            if from_stage == st.name:
                active = True
            if _measures(st.stage):
                row.of = st.input or prev
            if not self.stage(st, self.outputs[st.input or prev], active, row, i):
                break
            if not _measures(st.stage):
                prev = st.name
            if st.name == until and i < len(r.stages) - 1:
                stopped = True
        return stopped

    def stage(self, st: Any, inp: Any, active: bool, row: StageRow, i: int) -> bool:
        """Run one stage into ``outputs``; False when its gates failed (the chain stops there)."""
        try:
            if _measures(st.stage):  # its input is its output
                row.path = str(inp.path)
                label = f"[{i + 1}/{len(self.loaded.recipe.stages)}] {st.name}"
                res = _evaluate(self.loaded, self.state, inp, self.outputs["source"], st, self.log, label,
                                measure=STAGES[st.stage])
                row.metrics = row_metrics(inp, res)
                row.status = "ran"
                _gate_row(row, res, st.gates, self.failures, f"stage {st.name!r}")
                self.outputs[st.name] = inp
            else:
                self.outputs[st.name] = _run_stage(self.loaded, self.state, st, inp, active, self.forced(st.name), row,
                                                   self.log, i)
        except GateFailed as e:
            row.status, row.error = "failed", str(e)
            self.failures.append(f"stage {st.name!r}: {e}")
            self.state.save()
            return False
        except (DqncError, KeyboardInterrupt) as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            row.status, row.error = "failed", why
            self.state.save()
            self.write(self.failures + [why] if isinstance(e, DqncError) else [why])
            raise
        return True

    def evaluate_rows(self, source: Any, stopped: bool) -> None:
        """Per-stage evaluations for the report (cached), then the recipe's gates on the last one."""
        r = self.loaded.recipe
        reference = None  # the source's returns, as every compared row's evaluation measured them
        for row in self.rows:
            if _measures(row.stage) or row.status not in ("ran", "cached") or row.name not in self.outputs:
                continue
            res = _evaluate(self.loaded, self.state, self.outputs[row.name], source, r.eval, self.log, f"eval {row.name}")
            reference = reference or res.get("reference")
            row.metrics.update(row_metrics(self.outputs[row.name], res))
            stage_cfg = next((s for s in r.stages if s.name == row.name), None)
            if stage_cfg is not None and getattr(stage_cfg, "gates", None) is not None:
                _gate_row(row, res, stage_cfg.gates, self.failures, f"stage {row.name!r}")
        last = next((row for row in reversed(self.rows) if row.status in ("ran", "cached") and not _measures(row.stage)),
                    None)
        if last is not None and not stopped:
            res = _evaluate(self.loaded, self.state, self.outputs[last.name], source, r.eval, self.log, None)
            _gate_row(last, res, r.gates, self.failures, "recipe")
        if self.rows and self.rows[0].stage == "source":
            self.rows[0].metrics.update(source_metrics(source, reference, r.eval.episodes))
        self.state.save()

    def finish(self, source: Any, stopped: bool, until: str | None) -> RunReport:
        fp32_bytes = _fp32_tflite_bytes(self.state, source)
        if self.rows and self.rows[0].stage in ("source", "train") and self.rows[0].status != "failed":
            set_source_bytes(self.rows[0], source, fp32_bytes)
        self.state.save()
        if stopped and not self.failures:
            self.log(f"--until {until}: later stages skipped; the recipe's gates were not checked")
        return self.write(self.failures, gates_checked=not stopped, fp32_tflite_bytes=fp32_bytes)


def _measures(stage: str) -> bool:
    """Whether ``stage`` measures its input and writes nothing (eval); the source row ("train") writes."""
    entry = STAGES.get(stage)
    return entry is not None and entry.writes is None


def _owner(loaded: LoadedRecipe) -> OutDir:
    r = loaded.recipe
    stage_dirs = (["train"] if r.source.train is not None else []) + [s.name for s in r.stages if not _measures(s.stage)]
    return OutDir(loaded.out_dir, loaded.path, stage_dirs, "train.ckpt" if r.source.train is not None else None)


def _write_owned_reports(loaded: LoadedRecipe, owner: OutDir, report: RunReport) -> None:
    """report.json and report.md, replacing only files dqnc wrote (the marker holds their sha256s)."""
    for name in ("report.json", "report.md"):
        owner.before_write(name)
    write_reports(loaded, report)
    owner.wrote("report.json", "report.md")


def _save_effective(loaded: LoadedRecipe, owner: OutDir) -> None:
    import yaml

    data = loaded.recipe.model_dump(mode="json", exclude_none=True)
    text = (f"# Effective recipe: {loaded.path} with --set {' '.join(loaded.sets) or '(none)'}, all defaults "
            f"filled in (dqnc {__version__}).\n" + yaml.safe_dump(data, sort_keys=False))
    owner.before_write("recipe.effective.yaml")
    tmp = loaded.out_dir / f".recipe.effective.yaml.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, loaded.out_dir / "recipe.effective.yaml")
    owner.wrote("recipe.effective.yaml")


def _resolve_source(loaded: LoadedRecipe, state: State, force: bool, active: bool, log: Log) -> tuple[Any, StageRow | None]:
    from dqnc import artifact as art
    from dqnc.envs import env_spec

    src = loaded.recipe.source
    if src.artifact is not None:
        return art.load(loaded.resolve(src.artifact)), None
    if src.savedmodel is not None:
        from dqnc import sources

        return sources.load(loaded.resolve(src.savedmodel), env=env_spec(src.env or "", src.env_kwargs)), None
    if src.import_ is not None:
        from dqnc.importers import adopt

        with progress.task(f"[source] import {src.import_}"):
            return adopt(loaded.resolve(src.import_), env_spec(src.env or "", src.env_kwargs),
                         loaded.resolve(src.obs_norm) if src.obs_norm else None, log=log), None
    assert src.train is not None
    out = loaded.out_dir / "train"
    row = StageRow("train", "train", str(out))
    key = digest({"stage": "train", "config": src.train.model_dump(mode="json"), "dqnc": __version__})
    cached = cached_output(state, "train", key, out)
    if cached is not None and not force:
        row.status = "cached"
        log(f"[train] cached: {out}")
        return cached, row
    if not active:
        raise UsageError(f"--from skips 'train' but {str(out)!r} holds no matching output: run without --from")
    with shared_writer(state, key):
        hit = None if force or state.shared is None else state.shared.fetch(key, out)
        if hit is not None:
            row.status = "cached"
            state.data["stages"]["train"] = {"key": key, "sha256": hit.sha256}
            state.save()
            log(f"[train] cached (shared): {out}")
            return hit, row
        result = _train(src.train, out, row, log, tensorboard_dir(loaded, "train"))
        if state.shared is not None:
            state.shared.publish(key, out)
    state.data["stages"]["train"] = {"key": key, "sha256": result.sha256}
    state.save()
    return result, row


def tensorboard_dir(loaded: LoadedRecipe, name: str) -> Path | None:
    """Where stage ``name`` writes its TensorBoard scalars (recipe key ``tensorboard``, on by default)."""
    return loaded.out_dir / TENSORBOARD / name if loaded.recipe.tensorboard else None


def _train(cfg: Any, out: Any, row: StageRow, log: Log, logdir: Path | None) -> Any:
    from dqnc import train

    ckpt = out.with_name("train.ckpt")
    resume = (ckpt / "state.json").is_file()
    if resume:
        stale = train.checkpoint_mismatch(ckpt, cfg)
        if stale:
            log(f"[train] discarding the checkpoint in {str(ckpt)!r}: {stale}")
            import shutil

            train.check_checkpoint_dir(ckpt)  # only a folder dqnc's checkpoint writer made
            shutil.rmtree(ckpt, ignore_errors=True)
            resume = False
        else:
            log(f"[train] resuming from the checkpoint in {str(ckpt)!r}")
    log(f"[train] training {cfg.env} for up to {cfg.total_steps:,} steps ...")
    t0 = time.perf_counter()
    with progress.task(f"[train] {cfg.env}"):
        result = train.run(cfg, out, force=True, checkpoint_dir=ckpt, resume=resume, logdir=logdir,
                           progress=progress.train_update)
    row.seconds = time.perf_counter() - t0
    row.status = "ran"
    log(f"[train] done in {row.seconds:.1f} s")
    return result


def _run_stage(loaded: LoadedRecipe, state: State, st: Any, inp: Any, active: bool, force: bool, row: StageRow,
               log: Log, i: int) -> Any:
    out = loaded.out_dir / st.name
    row.path = str(out)
    options = st.model_dump(mode="json", exclude={"name", "input", "stage", "gates"})
    key = digest({"stage": st.stage, "options": options, "input": inp.sha256, "dqnc": __version__})
    label = f"[{i + 1}/{len(loaded.recipe.stages)}] {st.name} ({st.stage})"
    cached = cached_output(state, st.name, key, out)
    if cached is not None and not force:
        row.status = "cached"
        log(f"{label}: cached")
        return cached
    if not active:
        if out.exists():
            raise UsageError(f"--from skips {st.name!r} but {str(out)!r} was made from another input or with other "
                             "options (its cache key differs): start earlier, or run without --from")
        raise UsageError(f"--from skips {st.name!r} but {str(out)!r} does not exist: start earlier")
    with shared_writer(state, key):
        hit = None if force or state.shared is None else state.shared.fetch(key, out)
        if hit is not None:
            row.status = "cached"
            log(f"{label}: cached (shared)")
            result = hit
        else:
            result = _compute_stage(st, options, inp, out, row, log, label, tensorboard_dir(loaded, st.name))
            if state.shared is not None:
                state.shared.publish(key, out)
    state.data["stages"][st.name] = {"key": key, "sha256": result.sha256}
    state.save()
    return result


def _compute_stage(st: Any, options: dict[str, Any], inp: Any, out: Any, row: StageRow, log: Log, label: str,
                   logdir: Path | None) -> Any:
    from dqnc.distillation import tensorboard

    log(f"{label}: running ...")
    t0 = time.perf_counter()
    stage = STAGES[st.stage]
    with progress.task(label), tensorboard(logdir):  # prune and distill write their losses there
        result = stage.run(stage.config(**options), inp, out, force=True, log=log)
    row.seconds = time.perf_counter() - t0
    row.status = "ran"
    log(f"{label}: done in {row.seconds:.1f} s")
    return result


def _fp32_tflite_bytes(state: State, source: Any) -> int | None:
    """Bytes of the source as an fp32 TFLite file, as `dqnc quantize --mode fp32` writes it
    (converted once per source and kept in the run state)."""
    if source.kind == "tflite":
        fp32 = (source.manifest.get("quantization") or {}).get("mode", "fp32") == "fp32"
        return source.model_path.stat().st_size if fp32 else None
    known = state.data.setdefault("fp32_tflite_bytes", {})
    if source.sha256 not in known:
        from dqnc.policy import load_keras_model
        from dqnc.quantize import convert

        try:
            with progress.task("source: its fp32 TFLite size"):
                known[source.sha256] = len(convert(load_keras_model(source.model_path), "fp32", strip=True))
        except DqncError:  # a source the converter refuses has no fp32 file to compare with
            known[source.sha256] = None
    return known[source.sha256]


def _evaluate(loaded: LoadedRecipe, state: State, target: Any, source: Any, cfg: EvalConfig, log: Log,
              label: str | None, measure: Stage | None = None) -> dict[str, Any]:
    """``measure``'s (the eval stage's) metrics of ``target`` against the source, cached by content."""
    # Gates are applied per row (_gate_row); everything else of the eval config shapes the measurement,
    # the runtime included (a recipe's `stage: eval` with `runtime: tflm` was once silently run on LiteRT).
    plain = EvalConfig(episodes=cfg.episodes, seed=cfg.seed, latency_samples=cfg.latency_samples, runtime=cfg.runtime)
    reference = None if target.sha256 == source.sha256 else source
    # Latency belongs to the machine that measured it: another machine re-evaluates.
    key = digest({"target": target.sha256, "reference": None if reference is None else reference.sha256,
                   "eval": plain.model_dump(mode="json"), "dqnc": __version__, "machine": machine_fingerprint()})
    cached = state.data["evals"].get(key)
    if cached is not None:
        return cached
    with shared_writer(state, "eval-" + key):
        res = state.shared.get_eval(key) if state.shared is not None else None
        if res is None:
            if label:
                log(f"{label}: evaluating {cfg.episodes} episodes ...")
            with progress.task(label or "recipe gates: evaluating"):
                res = (measure or STAGES["eval"]).run(plain, target, reference, force=False, log=log)
            if state.shared is not None:
                state.shared.put_eval(key, res)
    state.data["evals"][key] = res
    return res


def _gate_row(row: StageRow, res: dict[str, Any], gates: Gates | None, failures: list[str], who: str) -> None:
    from dqnc import evaluate

    if gates is None or not any(v is not None for v in gates.model_dump().values()):
        return
    probe = dict(res, gates=[])
    try:
        evaluate.apply_gates(EvalConfig(gates=gates), probe)
    except GateFailed as e:
        failures.append(f"{who}: {e}")
    row.gates += [dict(g, scope=who) for g in probe["gates"]]
