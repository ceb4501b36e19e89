"""`dqnc sweep`: a recipe's compression space searched in parallel on Ray, and the whole trade-off.

Every trial is the recipe with one combination of ``--set`` overrides, run by
``dqnc.recipe.run`` in a Ray task of its own worker process (``max_calls=1``: TensorFlow state and
the TFLite converter's per-call leak die with the trial). Trials share one content-hash stage cache
(``dqnc.recipe.cache.SharedCache``), so a common prefix of stages is computed once per sweep.

Each finished trial is one line of ``<sweep_dir>/journal.jsonl`` (appended whole and fsync'ed), so
a re-run skips what is done. The results are ``sweep.json``, ``sweep.md`` (sorted by size, the
Pareto set marked: most return for fewest bytes) and ``pareto.png``; ``--pick smallest-passing``
writes ``best.yaml``, and when nothing passes it writes the closest trial and exits 1.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqnc.errors import DqncError, GateFailed, UsageError
from dqnc.stages import STAGES, join_names, seeded_names
from dqnc.raycluster import init_ray

JOURNAL = "journal.jsonl"
SEED_STAGES = tuple(seeded_names())  # the built-in seeded stages (old name); trials read STAGES, registered ones too
DONE = ("passed", "failed")  # trial outcomes that carry measurements; "error" and "timeout" do not


@dataclass(frozen=True)
class Trial:
    id: str
    sets: tuple[str, ...]

    @property
    def label(self) -> str:
        return " ".join(self.sets) or "(recipe as is)"


# --- the search space ----------------------------------------------------------------------------

def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``KEY=V1,V2,...`` -> {KEY: [V1, V2]}; values are YAML, so ``hidden=[8,8],[16,16]`` works."""
    import yaml

    from dqnc import yamlio

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise UsageError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid student.hidden=[8,8],[16,16]")
        try:
            values = yamlio.load(f"[{raw}]")
        except yaml.YAMLError:
            raise UsageError(f"--grid {item!r}: the values are not a comma-separated YAML list: quote or bracket "
                             "them, e.g. [8,8],[16,16]") from None
        if not isinstance(values, list) or not values:
            raise UsageError(f"--grid {item!r}: give at least one value")
        grid[key] = values
    return grid


def _stage_seed_keys(data: dict[str, Any]) -> list[str]:
    seeded = {name for name, st in STAGES.items() if st.seeded}
    return [f"{s['name']}.seed" for s in data.get("stages") or [] if isinstance(s, dict) and s.get("stage") in seeded]


def _flow(value: Any) -> str:
    """A value as --set reads it back (YAML): [8,8], int8, 0.5; a string YAML would retype is quoted."""
    import yaml

    from dqnc import yamlio

    if isinstance(value, str):
        try:
            plain = yamlio.load(value) == value and "," not in value
        except yaml.YAMLError:
            plain = False
        return value if plain else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def _check_stage_keys(data: dict[str, Any], keys: list[str]) -> None:
    import difflib

    from dqnc.recipe.schema import stage_models

    models = stage_models()
    stages = {s.get("name"): s.get("stage") for s in data.get("stages") or [] if isinstance(s, dict)}
    for key in keys:
        parts = key.split(".")
        model = models.get(str(stages.get(parts[0])))
        if model is not None and len(parts) > 1 and parts[1] not in model.model_fields:
            close = difflib.get_close_matches(parts[1], list(model.model_fields), n=1)
            hint = f" (did you mean {parts[0]}.{close[0]}?)" if close else ""
            raise UsageError(f"--grid {key!r}: stage {parts[0]!r} ({stages[parts[0]]}) has no option {parts[1]!r}{hint}")


def expand(recipe_text: str, data: dict[str, Any], grid: dict[str, list[Any]], seeds: int = 1,
           samples: int | None = None, sample_seed: int = 0) -> list[Trial]:
    """The trials: the grid's cross product (or ``samples`` of it), times ``seeds`` seeds.

    A trial's id hashes the recipe text and its overrides, so the journal of an edited recipe
    never answers for the new one."""
    import copy

    from dqnc.recipe import apply_sets

    keys = list(grid)
    try:  # a key that names nothing fails every trial: say so now (a bad value fails only its trials)
        apply_sets(copy.deepcopy(data), [f"{k}=0" for k in keys])
    except UsageError as e:
        raise UsageError(str(e).replace("--set", "--grid").replace("=0'", "=...'")) from None
    _check_stage_keys(data, keys)
    combos = [list(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if samples is not None and samples < len(combos):
        combos = random.Random(sample_seed).sample(combos, samples)
    seed_keys = _stage_seed_keys(data)
    if seeds > 1 and not seed_keys:
        raise UsageError(f"--seeds needs a {join_names(seeded_names(), 'or')} stage to seed: drop --seeds or add such a stage")
    digest = hashlib.sha256(recipe_text.encode()).hexdigest()
    trials = []
    for combo in combos:
        for seed in range(seeds):
            sets = [f"{k}={_flow(v)}" for k, v in combo]
            if seeds > 1:
                sets += [f"{k}={seed}" for k in seed_keys if k not in grid]
            tid = hashlib.sha256(json.dumps([digest, sets]).encode()).hexdigest()[:10]
            trials.append(Trial(tid, tuple(sets)))
    return trials


# --- one trial (in a Ray worker) ------------------------------------------------------------------

def run_trial(recipe_path: str, sets: list[str], trial_id: str, out_dir: str, shared_root: str) -> dict[str, Any]:
    """Load and run the recipe with ``sets`` into ``out_dir``; never raises (the outcome is data)."""
    from dqnc import recipe
    from dqnc.recipe.cache import SharedCache

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"id": trial_id, "sets": list(sets), "out_dir": out_dir, "pid": os.getpid()}
    with open(out.with_suffix(".log"), "a", encoding="utf-8") as logf:
        def log(msg: str) -> None:
            logf.write(msg + "\n")
            logf.flush()

        try:
            loaded = recipe.load(recipe_path, [*sets, f"out_dir={json.dumps(out_dir)}"])
            report = recipe.run(loaded, shared_cache=SharedCache(Path(shared_root)), log=log).to_dict()
            status = "passed"
        except GateFailed as e:
            report, status = e.result, "failed"
            if "stages" not in report:
                result.update(status="error", error=str(e))
        except DqncError as e:
            result.update(status="error", error=str(e))
        except Exception as e:  # a bug in a stage: recorded, and the sweep goes on
            first = (str(e).strip().splitlines() or [""])[0][:300]
            result.update(status="error", error=f"internal error: {type(e).__name__}: {first}")
        if "status" not in result:
            result.update(status=status, **summarize(report))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The trial's row: the measurements of its final model, every gate, stage cache use."""
    rows = report.get("stages") or []
    measured = [r for r in rows if "size_bytes" in (r.get("metrics") or {})]
    metrics = dict(measured[-1]["metrics"]) if measured else {}
    return {"metrics": metrics, "gates": [g for r in rows for g in r.get("gates") or []],
            "failures": report.get("failures") or [],
            "stages": {s: sum(1 for r in rows if r.get("status") == s) for s in ("ran", "cached", "failed")}}


# --- the front and the pick -----------------------------------------------------------------------

def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (bytes, return) no other point dominates: fewer or equal bytes and
    at least as much return, better in one. Non-empty whenever ``points`` is."""
    front = []
    for i, (b, r) in enumerate(points):
        if not any((b2 <= b and r2 >= r) and (b2 < b or r2 > r) for j, (b2, r2) in enumerate(points) if j != i):
            front.append(i)
    return front


def gate_miss(g: dict[str, Any]) -> float:
    """How far a gate is from passing, as a fraction of its threshold (0 when it passes)."""
    if g.get("passed"):
        return 0.0
    value, threshold = float(g["value"]), float(g["threshold"])
    over = value - threshold if str(g["gate"]).startswith("max_") else threshold - value
    return max(over, 0.0) / (abs(threshold) or 1.0)


def pick_smallest_passing(results: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, bool]:
    """The smallest trial that passes every gate; else the closest (least total relative miss,
    then smallest). None only when no trial has measurements."""
    measured = [r for r in results if r.get("status") in DONE and r.get("metrics", {}).get("size_bytes") is not None]
    passing = [r for r in measured if r["status"] == "passed"]
    if passing:
        return min(passing, key=lambda r: (r["metrics"]["size_bytes"], -r["metrics"]["mean_return"])), True
    if not measured:
        return None, False
    return min(measured, key=lambda r: (sum(gate_miss(g) for g in r["gates"]), r["metrics"]["size_bytes"])), False


def miss_lines(r: dict[str, Any]) -> list[str]:
    lines = [f"{g['gate']}{' (' + g['scope'] + ')' if g.get('scope') else ''}: measured {g['value']:.4g}, threshold {g['threshold']:g}, misses by "
             f"{100 * gate_miss(g):.1f}%" for g in r["gates"] if not g["passed"]]
    return lines or list(r.get("failures") or [])


# --- the journal ----------------------------------------------------------------------------------

class Journal:
    """One JSON line per finished trial, each appended whole (one write) and fsync'ed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return done
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write: that trial runs again
            if isinstance(entry, dict) and "id" in entry:
                done[entry["id"]] = entry
        return done

    def append(self, entry: dict[str, Any]) -> None:
        from dqnc.artifact import json_safe

        line = (json.dumps(json_safe(entry), default=str) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a line cut by a crash stays alone (and is skipped on load)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the driver -----------------------------------------------------------------------------------

@dataclass
class SweepResult:
    recipe: str
    sweep_dir: Path
    trials: list[dict[str, Any]]
    front: list[str]
    wall_seconds: float
    resumed: int
    pick: dict[str, Any] | None = None
    picked_passes: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ran = sum(t.get("stages", {}).get("ran", 0) for t in self.trials)
        cached = sum(t.get("stages", {}).get("cached", 0) for t in self.trials)
        return {"recipe": self.recipe, "sweep_dir": str(self.sweep_dir), "wall_seconds": round(self.wall_seconds, 3),
                "trial_seconds_sum": round(sum(t.get("seconds", 0.0) for t in self.trials), 3),
                "trials_resumed": self.resumed,
                "counts": {s: sum(1 for t in self.trials if t["status"] == s) for s in ("passed", "failed", "error", "timeout")},
                "stage_runs": {"ran": ran, "cached": cached}, "pareto": self.front,
                "pick": None if self.pick is None else {"id": self.pick["id"], "passes": self.picked_passes,
                                                         "misses": [] if self.picked_passes else miss_lines(self.pick)},
                **self.extra, "trials": self.trials}


Event = Callable[[str, dict[str, Any]], None]


def _ray_where(address: str | None, owns_ray: bool) -> dict[str, Any]:
    """Where the trials run, for the outputs: Ray's version, the cluster's address and CPUs."""
    import ray

    given = address or os.environ.get("RAY_ADDRESS")
    where = (f"the cluster at {given}" if given else "a local instance started for this sweep") if owns_ray \
        else "the Ray instance already running in this process"
    return {"version": ray.__version__, "address": where, "cpus": int(ray.cluster_resources().get("CPU", 0))}


def check_sweep_dir(sweep_dir: Path) -> None:
    """A sweep writes sweep.md, sweep.json, best.yaml and pareto.png into its folder: only into a new
    folder or one an earlier sweep made (it holds the journal), never into a user's folder."""
    from dqnc.limits import clip
    from dqnc.recipe.cache import check_out_dir_location

    check_out_dir_location(sweep_dir)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UsageError(f"sweep folder {clip(str(sweep_dir))!r} is an existing file: choose another path with -o")
    if sweep_dir.is_dir() and not (sweep_dir / JOURNAL).is_file():
        first = next(iter(sorted(sweep_dir.iterdir())), None)
        if first is not None:
            raise UsageError(f"sweep folder {clip(str(sweep_dir))!r} holds {clip(str(first))!r}, which no dqnc sweep "
                             "wrote (no journal.jsonl): choose another folder with -o")


def run_sweep(recipe_path: Path, trials: list[Trial], sweep_dir: Path, *, address: str | None = None,
              num_cpus: int | None = None, max_parallel: int | None = None, trial_timeout: float | None = None,
              retry_errors: bool = False, on_event: Event = lambda kind, data: None) -> SweepResult:
    """Run the trials not already in the journal on Ray; return every trial's row, in order."""
    import ray

    started = time.perf_counter()
    check_sweep_dir(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    journal = Journal(sweep_dir / JOURNAL)
    done = journal.load()
    if retry_errors:
        done = {k: v for k, v in done.items() if v.get("status") in DONE}
    todo = [t for t in trials if t.id not in done]
    resumed = len(trials) - len(todo)
    on_event("start", {"total": len(trials), "resumed": resumed, "done": [done[t.id] for t in trials if t.id in done]})
    shared = str((sweep_dir / "cache").resolve())
    owns_ray = init_ray(address, num_cpus) if todo else False
    pending: dict[Any, tuple[Trial, float]] = {}
    where = None
    try:
        if todo:
            where = _ray_where(address, owns_ray)
            task = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(run_trial)
            limit = max_parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < limit:
                    t = queue.pop(0)
                    out = str((sweep_dir / "trials" / t.id).resolve())
                    ref = task.remote(str(recipe_path.resolve()), list(t.sets), t.id, out, shared)
                    pending[ref] = (t, time.monotonic())
                    on_event("submit", {"id": t.id, "sets": list(t.sets)})
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                for ref in ready:
                    t, _t0 = pending.pop(ref)
                    try:
                        res = ray.get(ref)
                    except Exception as e:  # the worker died (native crash, OOM kill) or Ray could not run it
                        first = (str(e).strip().splitlines() or [""])[0][:300]
                        res = {"id": t.id, "sets": list(t.sets), "status": "error",
                               "error": f"the trial's Ray task failed (its worker died, or could not import dqnc): {type(e).__name__}: {first}",
                               "seconds": round(time.monotonic() - _t0, 3)}
                    journal.append(res)
                    done[t.id] = res
                    on_event("done", res)
                if trial_timeout is not None:
                    now = time.monotonic()
                    for ref, (t, t0) in list(pending.items()):
                        if now - t0 > trial_timeout:
                            ray.cancel(ref, force=True)
                            pending.pop(ref)
                            res = {"id": t.id, "sets": list(t.sets), "status": "timeout", "seconds": round(now - t0, 3),
                                   "error": f"stopped after the trial timeout of {trial_timeout:g} s"}
                            journal.append(res)
                            done[t.id] = res
                            on_event("done", res)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if owns_ray:
            ray.shutdown()
    results = [done[t.id] for t in trials]
    measured = [r for r in results if r.get("status") in DONE and r.get("metrics", {}).get("size_bytes") is not None]
    front = [measured[i]["id"] for i in pareto([(r["metrics"]["size_bytes"], r["metrics"]["mean_return"]) for r in measured])]
    return SweepResult(str(recipe_path), sweep_dir, results, front, time.perf_counter() - started, resumed,
                       extra={"ray": where})


# --- outputs --------------------------------------------------------------------------------------

def _ci(m: dict[str, Any]) -> str:
    if m.get("mean_return") is None:
        return "-"
    ci = m.get("return_ci95")
    if not ci or any(c is None or abs(c) == float("inf") for c in ci):
        return f"{m['mean_return']:.1f}"
    return f"{m['mean_return']:.1f}±{(ci[1] - ci[0]) / 2:.1f}"


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    """The rows of sweep.md and the terminal summary: sorted by size, unmeasured trials last."""
    head = ["front", "trial", "overrides", "prec.", "bytes", "return±CI", "regret", "agree", "decisive", "p50 us",
            "verdict", "s"]
    rows = []
    key = lambda r: (r.get("metrics", {}).get("size_bytes") is None, r.get("metrics", {}).get("size_bytes") or 0)  # noqa: E731
    for r in sorted(result.trials, key=key):
        m = r.get("metrics") or {}
        rows.append(["*" if r["id"] in result.front else "", r["id"], " ".join(r["sets"]) or "-",
                     str(m.get("precision", "-")), _num(m.get("size_bytes"), ","), _ci(m), _num(m.get("regret"), ".3f"),
                     "-" if m.get("agreement") is None else f"{100 * m['agreement']:.1f}%",
                     "-" if m.get("decisive_agreement") is None else f"{100 * m['decisive_agreement']:.1f}%",
                     _num(m.get("latency_p50_us"), ".1f"), r["status"], f"{r.get('seconds', 0):.0f}"])
    return head, rows


def markdown(result: SweepResult) -> str:
    d = result.to_dict()
    head, rows = table(result)
    c = d["counts"]
    lines = [f"## dqnc sweep `{result.recipe}`", "",
             f"{len(result.trials)} trials ({c['passed']} passed, {c['failed']} failed a gate, {c['error']} errors, "
             f"{c['timeout']} timed out; {result.resumed} from the journal) in {result.wall_seconds:.1f} s wall "
             f"(trials' own time summed: {d['trial_seconds_sum']:.1f} s). Stages run {d['stage_runs']['ran']}, "
             f"served from the shared cache {d['stage_runs']['cached']}. "
             + (f"Ray {d['ray']['version']}: {d['ray']['address']} ({d['ray']['cpus']} CPUs)." if d.get("ray")
                else "No trial ran here: every one came from the journal."), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    errors = [r for r in result.trials if r.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- `{r['id']}` ({' '.join(r['sets'])}): {r['error']}" for r in errors]
    # A stage's own check (e.g. quantize's regret limit) stops the chain before anything is measured.
    unmeasured = [r for r in result.trials if r["status"] == "failed" and not (r.get("metrics") or {})]
    if unmeasured:
        lines += ["", "Failed before a measurement:", ""] + [
            f"- `{r['id']}` ({' '.join(r['sets'])}): {'; '.join(r.get('failures') or [])}" for r in unmeasured]
    if result.pick is not None:
        how = ("passes every gate" if result.picked_passes
               else "no trial passes every gate; this, the closest, misses " + "; ".join(miss_lines(result.pick)))
        lines += ["", f"Pick (smallest passing): `{result.pick['id']}` {' '.join(result.pick['sets'])}: {how}. "
                  "Its recipe is best.yaml (`dqnc run best.yaml`)."]
    lines += ["", "front: on the Pareto front of bytes (fewer is better) against mean return (more is better). "
              "return±CI: mean return and the half-width of its 95% CI over the evaluation episodes. regret, agree, "
              "decisive: fidelity to the recipe's source (dqnc.fidelity). verdict: passed / failed (a gate) / error / "
              "timeout; s: the trial's own seconds."]
    return "\n".join(lines) + "\n"


def plot(result: SweepResult, path: Path) -> None:
    """pareto.png: bytes against return (95% CI bars, the front joined), regret, agreement, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.trials if r.get("status") in DONE and r.get("metrics", {}).get("size_bytes") is not None]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    panels = [("mean_return", "mean return (95% CI)"), ("regret", "regret (fraction of action spread)"),
              ("decisive_agreement", "decisive agreement"), ("latency_p50_us", "p50 latency per action (us)")]
    for ax, (key, label) in zip(axes.flat, panels):
        for on_front, color, marker in ((False, "tab:gray", "o"), (True, "tab:red", "D")):
            pts = [r for r in rows if (r["id"] in result.front) == on_front and r["metrics"].get(key) is not None]
            if not pts:
                continue
            x = [r["metrics"]["size_bytes"] for r in pts]
            y = [r["metrics"][key] for r in pts]
            yerr = None
            if key == "mean_return":
                cis = [r["metrics"].get("return_ci95") or [v, v] for r, v in zip(pts, y)]
                yerr = [[max(v - (c[0] if c[0] is not None and abs(c[0]) != float("inf") else v), 0) for v, c in zip(y, cis)],
                        [max((c[1] if c[1] is not None and abs(c[1]) != float("inf") else v) - v, 0) for v, c in zip(y, cis)]]
            ax.errorbar(x, y, yerr=yerr, fmt=marker, color=color, capsize=3, ms=5,
                        label="Pareto front" if on_front else "other trials")
            if on_front and key == "mean_return":
                order = sorted(range(len(x)), key=lambda i: x[i])
                ax.plot([x[i] for i in order], [y[i] for i in order], "-", color=color, lw=1)
                for r, xi, yi in zip(pts, x, y):
                    ax.annotate(r["id"][:6], (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
        passing = [r for r in rows if r["status"] == "passed" and r["metrics"].get(key) is not None]
        if passing:
            ax.plot([r["metrics"]["size_bytes"] for r in passing], [r["metrics"][key] for r in passing], "o", ms=11,
                    mfc="none", mec="tab:green", label="passes every gate")
        ax.set_xlabel("model bytes")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(loc="lower right")
    fig.suptitle(f"dqnc sweep {Path(result.recipe).name}: {len(rows)} measured trials")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def best_recipe(recipe_path: Path, trial: dict[str, Any]) -> str:
    """The recipe with the trial's overrides applied, runnable with `dqnc run` from the sweep folder:
    source paths made absolute, outputs in ``best/`` next to it, no sweep section."""
    import yaml

    from dqnc import recipe

    loaded = recipe.load(recipe_path, list(trial["sets"]))
    data = dict(loaded.data)
    data.pop("sweep", None)
    src = dict(data["source"])
    for k in ("artifact", "savedmodel", "import", "obs_norm"):
        if isinstance(src.get(k), str):
            src[k] = str(loaded.resolve(src[k]).resolve())
    data["source"] = src
    data["out_dir"] = "best"
    return (f"# dqnc sweep pick: trial {trial['id']} of {recipe_path} with {' '.join(trial['sets']) or '(no overrides)'}\n"
            + yaml.safe_dump(data, sort_keys=False))


def write_outputs(result: SweepResult, recipe_path: Path, pick: str | None) -> None:
    from dqnc.artifact import write_json_atomic

    d = result.sweep_dir
    if pick == "smallest-passing":
        result.pick, result.picked_passes = pick_smallest_passing(result.trials)
        if result.pick is not None:
            text = best_recipe(recipe_path, result.pick)
            tmp = d / f".best.yaml.tmp-{os.getpid()}"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, d / "best.yaml")
    write_json_atomic(d / "sweep.json", result.to_dict())
    tmp = d / f".sweep.md.tmp-{os.getpid()}"
    tmp.write_text(markdown(result), encoding="utf-8")
    os.replace(tmp, d / "sweep.md")
    plot(result, d / "pareto.png")


# --- progress -------------------------------------------------------------------------------------

class Progress:
    """Trials done/running/failed and the best so far: a live line on a terminal, plain lines in CI."""

    def __init__(self, console: Any, live: bool, quiet: bool = False) -> None:
        self.console, self.quiet = console, quiet
        self.total = self.finished = self.running = self.bad = 0
        self.results: list[dict[str, Any]] = []
        self.live: Any = None
        if live and not quiet:
            from rich.live import Live

            self.live = Live(self._render(), console=console, refresh_per_second=4, transient=True)

    def _best(self) -> str:
        best, passes = pick_smallest_passing(self.results)
        if best is None:
            return "best so far: -"
        m = best["metrics"]
        return (f"best so far: {best['id']} {m['size_bytes']:,} B, return {m['mean_return']:.1f} "
                f"({'passes' if passes else 'closest, fails a gate'})")

    def _render(self) -> str:
        return (f"sweep: {self.finished}/{self.total} done, {self.running} running, {self.bad} failed or errored; "
                f"{self._best()}")

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            self.total, self.results = data["total"], list(data["done"])
            self.finished = len(self.results)
            self.bad = sum(1 for r in self.results if r["status"] != "passed")
            if not self.quiet and data["resumed"]:
                self.console.print(f"sweep: {data['resumed']} of {self.total} trials done before (journal): skipped")
            if self.live is not None:
                self.live.start()
        elif kind == "submit":
            self.running += 1
        elif kind == "done":
            self.running -= 1
            self.finished += 1
            self.results.append(data)
            self.bad += data["status"] != "passed"
            if not self.quiet:
                m = data.get("metrics") or {}
                what = (f"{m['size_bytes']:,} B, return {m['mean_return']:.1f}" if m.get("size_bytes") is not None
                        else (data.get("error") or "")[:200])
                line = (f"[{self.finished}/{self.total}] {data['id']} {' '.join(data['sets'])}: {data['status']}, "
                        f"{what} ({data.get('seconds', 0):.0f} s)")
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        if self.live is not None:
            self.live.update(self._render())

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
