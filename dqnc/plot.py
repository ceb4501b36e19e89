"""``dqnc plot``: the pictures behind the numbers, as PNG files (matplotlib, headless).

A train artifact's learning curve (``manifest.metrics.evals``: one greedy evaluation every
``eval_freq`` steps) and a recipe run's size against return (``report.json``: each deployable
row's bytes and mean return with its 95% CI). A run folder also gets the learning curve of any
train stage it ran. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dqnc.artifact import MANIFEST
from dqnc.errors import ArtifactError, UsageError

REPORT = "report.json"
LEARNING_CURVE = "learning_curve.png"
SIZE_VS_RETURN = "size_vs_return.png"


def plot(path: Path, out: Path | None = None, force: bool = False) -> list[Path]:
    """Write every picture ``path`` has data for and return the files written: a train artifact's
    learning curve, or a recipe run folder's size-vs-return picture (and its train stages' curves).
    ``out`` is the folder to write in (default: the run folder; beside an artifact). An existing
    file is replaced only with ``force``."""
    if not path.is_dir():
        raise UsageError(f"{path}: not a folder; pass a train artifact or a recipe run folder (its out_dir)")
    if (path / REPORT).is_file():
        return _plot_run(path, out or path, force)
    evals = _evals(path)
    if evals is None:
        raise UsageError(f"{path}: no learning curve (manifest.json metrics.evals) and no report.json; pass a train "
                         "artifact or the out_dir of a recipe run")
    dest = (out or path.parent) / (f"{LEARNING_CURVE}" if out else f"{path.name}-{LEARNING_CURVE}")
    check_free([dest], force)
    return [learning_curve(evals, path.name, dest)]


def check_free(dests: list[Path], force: bool) -> None:
    """Refuse (one line, exit 2) to replace a file that is already there, unless ``force``."""
    taken = [d for d in dests if d.exists()]
    if taken and not force:
        raise UsageError(f"{taken[0]} already exists: pass --force to replace it, or -o DIR to write elsewhere")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable JSON ({e}); re-run the command that wrote it") from None


def _evals(artifact: Path) -> list[list[float]] | None:
    """The train stage's evaluations ([step, mean, std, worst] each), or None for another artifact."""
    if not (artifact / MANIFEST).is_file():
        return None
    evals = ((_read_json(artifact / MANIFEST).get("metrics") or {}).get("evals"))
    return evals or None


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("dqnc plot needs matplotlib: pip install 'dqnc[sweep]'") from None
    matplotlib.use("Agg")  # headless: CI machines have no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, dest)
    return dest


def learning_curve(evals: list[list[float]], title: str, dest: Path) -> Path:
    """Mean greedy return (± one std, and the worst episode) against environment steps."""
    plt = _pyplot()
    steps, mean, std, worst = (list(col) for col in zip(*[e[:4] for e in evals]))
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    ax.plot(steps, mean, "-o", ms=3, color="tab:blue", label="mean greedy return")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color="tab:blue", alpha=0.2, label="± 1 std")
    ax.plot(steps, worst, ":", color="tab:gray", label="worst episode")
    ax.set(xlabel="environment steps", ylabel="return", title=f"learning curve: {title}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    try:
        return _save(fig, dest)
    finally:
        plt.close(fig)


def _plot_run(folder: Path, out: Path, force: bool) -> list[Path]:
    report = _read_json(folder / REPORT)
    rows = report.get("stages") or []
    points = deployable_points(rows)
    curves = [(row["name"], evals) for row in rows
              if row.get("stage") == "train" and row.get("path") and (evals := _evals(Path(row["path"])))]
    check_free(([out / SIZE_VS_RETURN] if points else []) + [out / f"{name}-{LEARNING_CURVE}" for name, _ in curves],
               force)
    written = []
    if points:
        title = Path(report.get("recipe") or folder.name).name
        written.append(size_vs_return(points, title, out / SIZE_VS_RETURN))
    for name, evals in curves:
        written.append(learning_curve(evals, name, out / f"{name}-{LEARNING_CURVE}"))
    if not written:
        raise UsageError(f"{folder / REPORT}: no row with bytes and a mean return and no train stage to draw; run "
                         "the recipe to its end (dqnc run RECIPE) first")
    return written


def deployable_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report rows whose bytes are a deployable .tflite file's, each with its mean return and
    95% CI. Measuring (eval) rows repeat another row, and rows of one file and return (int8, then
    its bundle) share one point."""
    points = []
    for row in rows:
        m = row.get("metrics") or {}
        # The first row is the source (stage "source", or "train" when the recipe trains it): its
        # size_bytes are its fp32 TFLite file's.
        tflite = row.get("stage") in ("source", "train") or m.get("bytes_per_param") is not None
        if row.get("stage") == "eval" or not tflite or m.get("size_bytes") is None or m.get("mean_return") is None:
            continue
        same = next((p for p in points if (p["bytes"], p["mean_return"]) == (m["size_bytes"], m["mean_return"])), None)
        if same is not None:  # a bundle of the quantized file it copies: one point, both names
            same["name"] += f", {row['name']}"
            continue
        ci = m.get("return_ci95") or [m["mean_return"], m["mean_return"]]
        points.append({"name": row["name"], "precision": m.get("precision"), "bytes": m["size_bytes"],
                       "mean_return": m["mean_return"], "ci": ci})
    return points


def size_vs_return(points: list[dict[str, Any]], title: str, dest: Path) -> Path:
    """Each deployable row: bytes (log scale) against mean return, 95% CI bars, named."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for p in points:
        lo, hi = p["ci"]
        y = p["mean_return"]
        ax.errorbar([p["bytes"]], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], fmt="o", capsize=4, ms=6)
        label = f"{p['name']} ({p['precision']})" if p.get("precision") else p["name"]
        ax.annotate(label, (p["bytes"], y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)  # room for the names beside the points
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # decade labels only: minor ones overlap
    ax.set(xlabel=".tflite bytes (log scale)", ylabel="mean return (95% CI)", title=f"size vs return: {title}")
    ax.grid(alpha=0.3, which="major")
    try:
        return _save(fig, dest)
    finally:
        plt.close(fig)
