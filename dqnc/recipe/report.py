"""Run reports: per-stage rows, the 80-column table, gate lines, report.md and report.json."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dqnc import __version__
from dqnc.recipe.loader import LoadedRecipe


@dataclass
class StageRow:
    name: str
    stage: str
    path: str | None = None
    status: str = "pending"  # ran | cached | loaded (a given source) | failed | skipped | pending
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    # A measuring (eval) stage's row: the name of the row it measured. When its evaluation is that
    # row's own (same episodes and seeds), the table shows its gates on that row, not a copy of it.
    of: str | None = None


@dataclass
class RunReport:
    recipe: str
    out_dir: str
    rows: list[StageRow]
    failures: list[str]
    wall_seconds: float
    dqnc_version: str = __version__
    # The recipe source converted to an fp32 TFLite file (quantize --mode fp32): the size every
    # compressed stage is compared with.
    fp32_tflite_bytes: int | None = None
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
                "fp32_tflite_bytes": self.fp32_tflite_bytes, "stages": [r.__dict__ for r in self.rows]}

    def size_line(self) -> str | None:
        """The last deployable stage's size: parameters, bytes per parameter, and the ratio to the
        source's fp32 TFLite file."""
        row = next((r for r in reversed(self.rows) if r.stage != "eval" and r.metrics.get("bytes_per_param")), None)
        if row is None:
            return None
        m = row.metrics
        line = (f"{row.name}: {m['size_bytes']:,} bytes, {m['params']:,} parameters "
                f"({m['bytes_per_param']:.1f} bytes per parameter)")
        if self.fp32_tflite_bytes:
            line += (f", {self.fp32_tflite_bytes / m['size_bytes']:.1f}x smaller than the source's fp32 TFLite file "
                     f"({self.fp32_tflite_bytes:,} bytes)")
        return line


def row_metrics(a: Any, res: dict[str, Any]) -> dict[str, Any]:
    """A row's figures, named as ``dqnc eval --json`` names them (dqnc.evaluate.record)."""
    from dqnc.evaluate import record
    from dqnc.inspection import param_count

    m = a.manifest
    flat = record(res)
    compared = res.get("reference") is not None
    params = res["params"] if res.get("params") is not None else param_count(a)  # older cached evals lack it
    return {
        "size_bytes": res["size_bytes"],
        "gzip_bytes": res["gzip_bytes"],
        "params": params,
        # Only a .tflite file's bytes are the deployable size; a SavedModel directory's are not.
        "bytes_per_param": res["size_bytes"] / params if params and a.kind == "tflite" else None,
        "sparsity": _sparsity_of(m),
        "precision": _precision(m),
        "mean_return": res["mean_return"],
        "return_ci95": res.get("return_ci95"),
        "std_return": res["std_return"],
        "solved_share": res["solved_share"],
        # Without a reference the row is its own: regret 0, agreement 100%.
        "regret": flat.get("regret", None if compared else 0.0),
        "regret_p99": flat.get("regret_p99", None if compared else 0.0),
        "agreement": flat.get("agreement", None if compared else 1.0),
        "states": flat.get("states"),
        "decisive_agreement": flat.get("decisive_agreement", None if compared else 1.0),
        "decisive_states": flat.get("decisive_states"),
        "decisive_share": flat.get("decisive_share"),
        "return_drop_frac": flat.get("return_drop_frac", None if compared else 0.0),
        "return_drop_frac_ci95": flat.get("return_drop_frac_ci95"),
        "latency_p50_us": flat.get("latency_p50_us"),
        "latency_p99_us": flat.get("latency_p99_us"),
        "invoke_p50_us": flat.get("invoke_p50_us"),
        "runtime": res.get("runtime"),
        "episodes": res["episodes"],
    }


def source_metrics(source: Any, reference: dict[str, Any] | None, episodes: int) -> dict[str, Any]:
    """The source row: precision, and the mean return and CI the other rows' evaluations measured
    for it as their reference (same episodes and seeds; no episode is rolled out for it). It is
    its own reference: regret 0, agreement 100%. Bytes are added by ``set_source_bytes``."""
    m: dict[str, Any] = {"precision": _precision(source.manifest), "size_bytes": None, "params": None,
                         "mean_return": None, "return_ci95": None, "episodes": None}
    if reference is not None:
        m.update(mean_return=reference["mean_return"], return_ci95=reference.get("return_ci95"), episodes=episodes,
                 regret=0.0, agreement=1.0, decisive_agreement=1.0)
    return m


def set_source_bytes(row: StageRow, source: Any, fp32_bytes: int | None) -> None:
    """The source row's size: its fp32 TFLite file's bytes (a .tflite source: its own file's)."""
    own = source.model_path.stat().st_size if source.kind == "tflite" else None
    row.metrics["fp32_tflite_bytes"] = fp32_bytes
    if row.stage == "source":
        row.metrics.setdefault("precision", _precision(source.manifest))
        row.metrics["size_bytes"] = fp32_bytes if fp32_bytes is not None else own


def _precision(manifest: dict[str, Any]) -> str:
    """The mode, or "4-bit"/"2-bit" for int8 files whose kernels hold 16/4 values (weight_bits)."""
    q = manifest.get("quantization") or {}
    bits = int(q.get("weight_bits") or 8)
    return f"{bits}-bit" if bits < 8 else q.get("mode", "fp32")


def _sparsity_of(manifest: dict[str, Any]) -> float | None:
    m = manifest.get("metrics") or {}
    if "sparsity" in m:
        return float(m["sparsity"])
    if "parent_sparsity" in m:
        return float(m["parent_sparsity"])
    return None if manifest.get("stage") == "export" else 0.0


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
    if not ci or any(c is None or abs(c) == float("inf") for c in ci):
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


def shown_rows(report: RunReport) -> list[StageRow]:
    """The table's rows: the source first, then each stage; an eval stage's row only when it
    measured something its input's row does not show (other episodes or seeds, or it failed)."""
    by_name = {r.name: r for r in report.rows}
    return [r for r in report.rows
            if not (r.of is not None and r.of in by_name and r.metrics and r.metrics == by_name[r.of].metrics)]


def _cell(m: dict[str, Any], key: str, kind: str) -> str:
    if kind == "ci":
        return _ci(m)
    if kind == "dec":
        return _decisive(m)
    if key == "size_bytes" and m.get("fp32_tflite_bytes") is not None:
        return _fmt(m["fp32_tflite_bytes"], kind)  # the source row: its fp32 TFLite file
    return _fmt(m.get(key), kind)


def table_rows(report: RunReport) -> list[list[str]]:
    """Name, the COLUMNS, and status for each row of ``shown_rows`` (gates are listed separately)."""
    out = []
    for row in shown_rows(report):
        cells = [row.name]
        for _, key, kind in COLUMNS:
            cells.append(_cell(row.metrics, key, kind))
        cells.append(row.status + (f" {row.seconds:.0f}s" if row.status == "ran" and row.seconds >= 0.5 else ""))
        out.append(cells)
    return out


def gate_lines(report: RunReport) -> list[tuple[bool, str]]:
    return [(g["passed"], f"gate {g['gate']} ({g['scope']}) on {row.of or row.name}: measured {g['value']:.4g}, "
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
    gates = [(row.of or row.name, g) for row in report.rows for g in row.gates]
    if gates:
        lines += ["", "| gate | on | threshold | measured | verdict |", "|---|---|---|---|---|"]
        for name, g in gates:
            lines.append(f"| {g['gate']} ({g['scope']}) | {name} | {g['threshold']:g} | {g['value']:.4g} | "
                         f"{'pass' if g['passed'] else '**FAIL**'} |")
    size = report.size_line()
    if size:
        lines += ["", f"Size: {size}."]
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


def write_reports(loaded: LoadedRecipe, report: RunReport) -> None:
    from dqnc.artifact import write_json_atomic

    write_json_atomic(loaded.out_dir / "report.json", report.to_dict())
    tmp = loaded.out_dir / f".report.md.tmp-{os.getpid()}"
    tmp.write_text(markdown(report), encoding="utf-8")
    os.replace(tmp, loaded.out_dir / "report.md")
