"""Everything the CLI shows: Rich tables and lines on stdout, progress and messages on stderr,
``--json`` objects. Nothing else in dqnc.cli prints.

The consoles are module attributes looked up at call time, so a test can swap them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape

from dqnc.cli import layout

stdout = Console(highlight=False)
_COMPACT: dict[str, Any] = {"box": box.SIMPLE_HEAD, "pad_edge": False, "padding": (0, 1), "collapse_padding": True,
                            "show_edge": False}
stderr = Console(stderr=True, highlight=False)
ui: dict[str, Any] = {"quiet": False}  # --quiet, on every command: no progress display (dqnc.progress)


def emit_json(obj: Any) -> None:
    from dqnc.artifact import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def written(paths: list[Any]) -> None:
    """One ``wrote PATH`` line per file written (dqnc plot)."""
    for p in paths:
        echo(f"wrote {p}")


def echo(text: str) -> None:
    """Plain text on stdout (no Rich markup or wrapping)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def say(text: str, style: str | None = None) -> None:
    """A message on stdout, taken literally, wrapped at words to the console's width."""
    layout.say(stdout, text, style=style)


def log(msg: str) -> None:
    """A progress line on stderr, taken literally, wrapped at words."""
    layout.say(stderr, msg)


def problem(label: str, message: str) -> None:
    """One ``label: message`` line on stderr (errors, gate failures, interrupts), never wrapped
    (scripts and logs read it whole); the message is escaped, so a bracketed ``[filters, kernel,
    stride]`` in it is shown, not taken for markup."""
    stderr.print(f"[bold red]{label}[/] {escape(message)}", markup=True, soft_wrap=True)


def note(message: str) -> None:
    layout.say(stderr, message)


def sweep_progress(quiet: bool) -> Any:
    from dqnc import sweep

    return sweep.Progress(stderr, live=stderr.is_terminal, quiet=quiet)


def fidelity_line(c: dict[str, Any]) -> str:
    """One line of dqnc.fidelity's vocabulary, every count shown."""
    return (f"regret {c['regret']:.4f} (p99 {c['regret_p99']:.3f}) of the action spread; agreement "
            f"{100 * c['agreement']:.2f}% of {c['states']:,}; decisive {100 * c['decisive_agreement']:.2f}% of "
            f"{c['decisive_states']:,} ({100 * c['decisive_share']:.1f}% of states)")


# --- one renderer per command ------------------------------------------------------------------

def train(result: Any, cfg: Any, as_json: bool) -> None:
    m = result.manifest["metrics"]
    if as_json:
        emit_json({"path": str(result.path), "env": cfg.env, "seed": cfg.seed, "metrics": m})
        return
    say(f"trained {cfg.env} (seed {cfg.seed}): {m['env_steps']:,} steps in {m['train_seconds']:.1f} s "
        f"({m['steps_per_second']:,.0f} steps/s); best greedy eval {m['best_eval_mean_return']:.1f} "
        f"over {m['eval_episodes']} episodes{' (stopped early: threshold reached)' if m['stopped_early'] else ''}"
    )
    say(f"saved {result.path}")


def prune(result: Any, as_json: bool) -> None:
    m = result.manifest["metrics"]
    if as_json:
        emit_json({"path": str(result.path), "metrics": m})
        return
    layout.table(stdout, ["layer", "shape", "target", "sparsity"],
                 [[layer["name"], str(tuple(layer["shape"])), f"{100 * layer['target']:.1f}%",
                   f"{100 * layer['sparsity']:.2f}%"] for layer in m["layers"]], left=("layer", "shape"))
    c = m["check"]
    if m.get("structure") == "units":
        say(f"hidden widths {m['widths_before']} -> {m['widths_after']} ({m['importance']} importance): "
                     f"{m['params_before']:,} -> {m['params']:,} parameters; greedy agreement with the parent on "
                     f"{c['states']:,} held-out states {100 * c['agreement']:.1f}% (decisive states "
                     f"{100 * c['decisive_agreement']:.1f}%)")
        say(f"saved {result.path}")
        return
    if m.get("pattern"):
        say(f"pattern {m['pattern']} holds in every pruned layer")
    say(f"overall sparsity {100 * m['sparsity']:.1f}% (pruned layers {100 * m['prunable_sparsity']:.1f}%); "
                 f"against the parent on {c['states']:,} held-out states: {fidelity_line(c)}")
    say(f"saved {result.path}")


def quantize(result: Any, mode: str, as_json: bool) -> None:
    m, qz = result.manifest["metrics"], result.manifest["quantization"]
    if as_json:
        emit_json({"path": str(result.path), "metrics": m, "quantization": qz})
        return
    c = m["check"]
    say(f"{mode}: {m['size_bytes']:,} bytes; input {qz['input']['dtype']} (scale {qz['input']['scale']:.4g}, "
                 f"zero point {qz['input']['zero_point']}), output {qz['output']['dtype']}; encoding {m['sparsity_encoding']}")
    say(f"checked on {c['states']:,} held-out states: {fidelity_line(c)}")
    if "check_episodes" in c:
        say(f"closed loop, {c['check_episodes']} check episodes: mean return {c['mean_return']:.2f} vs parent "
                     f"{c['parent_mean_return']:.2f} (drop {c['return_drop']:+.2f}, 95% CI "
                     f"{c['return_drop_ci95'][0]:+.2f}..{c['return_drop_ci95'][1]:+.2f})")
    if m.get("weight_bits"):
        wb = m["weight_bits"]
        say(f"{wb['weight_bits']}-bit weights: {wb['clusters']} clusters per Dense kernel, distinct int8 values per "
                     f"layer {wb['distinct_int8_weights']}; fine-tuned {wb['finetune_steps']:,} steps on {wb['finetune_states']:,} states")
    if "saturated_share" in c:
        say(f"int8 rewrite: {m['equalization_sweeps']} equalization sweep(s), output range x{m['output_range_factor']:g} "
                     f"of the calibrated one ({100 * c['saturated_share']:.1f}% of checked states saturate)")
    for note_ in m.get("notes", []):
        say(f"note: {note_}")
    say(f"saved {result.path}")


def export(result: Any, mcu: dict[str, Any] | None, env: Any, as_json: bool) -> None:
    m = result.manifest["metrics"]
    if as_json:
        emit_json({"path": str(result.path), "metrics": m, "io": result.manifest["io"],
                   **({"mcu": mcu} if mcu is not None else {})})
        return
    files = sorted(p.name for p in result.path.iterdir())
    say(f"bundle {result.path} (target {m['target']}): {', '.join(files)}")
    if m["tflm_compatible"]:
        _export_tflm(m)
    else:
        stdout.print("target linux: not for TensorFlow Lite Micro (export with --target mcu for a microcontroller)")
    if mcu is not None:
        say(f"Cortex-M4 (QEMU {mcu['board']}): {mcu['actions_equal']} of {mcu['vectors']} actions equal TFLM's, {mcu['actions_equal_litert']} LiteRT's; "
                     f"flash {mcu['flash_bytes']:,} bytes, RAM {mcu['ram_bytes']:,} bytes; "
                     f"~{mcu['instructions_per_action']:,.0f} instructions per action (QEMU -icount: a proxy, not cycles)")
    say(f"model.tflite {m['size_bytes']:,} bytes ({m['gzip_bytes']:,} gzipped); try: "
                 f"python {result.path / 'run_policy.py'} --obs {_obs_example(env)}")


def _export_tflm(m: dict[str, Any]) -> None:
    c = m["tflm_check"]
    say(f"TFLM verified: {c['actions_equal']:,} of {c['states']:,} actions equal LiteRT's "
                 f"({c.get('int_output_differences', 0):,} int outputs differ: LiteRT rounds once, TFLM twice); arena {m['tflm_arena_bytes']['total']:,} "
                 f"bytes measured ({m['tflm_arena_shipped_bytes']:,} shipped); flash {m['tflm_flash_bytes']:,} bytes; "
                 f"ops {', '.join(m['ops'])}")
    cp = m.get("c_policy") or {}
    if cp.get("written"):
        verified = (f"bit-identical to TFLM on {cp['states']:,} states" if cp.get("host_verified")
                    else f"not compiled here: {cp.get('reason')}")
        packed = f" ({cp['weight_bytes']:,} of weights as {cp['weight_bits']}-bit indices + tables)" if cp.get("weight_bits", 8) < 8 else ""
        say(f"policy.c: {cp['const_data_bytes']:,} bytes of constants{packed}, {cp['activation_ram_bytes']} bytes of "
                     f"activations; {verified}")
    elif cp:
        say(f"no policy.c: {cp.get('reason')}")
    if m.get("lut"):
        lut = m["lut"]
        say(f"{lut['file']}: {lut['bytes']:,} bytes ({lut['weight_bits']}-bit LUT compression; arena "
                     f"{lut['tflm_arena_bytes']['total']:,} bytes); runs on: "
                     + ", ".join(k for k, v in lut["runtimes"].items() if v.startswith("ran")))


def _obs_example(env: Any) -> str:
    # Images are hundreds of numbers: name their count and order instead of printing them.
    if env.obs_dim <= 16:
        return ",".join(["0"] * env.obs_dim)
    return f"V1,...,V{env.obs_dim} ({env.obs_dim} numbers, {env.obs_layout} order)"


def imported(result: Any, model: Any, as_json: bool) -> None:
    m, origin = result.manifest["metrics"], result.manifest["origin"]
    if as_json:
        emit_json({"path": str(result.path), "origin": origin, "network": result.manifest["network"], "metrics": m})
        return
    c = m["check"]
    net = result.manifest["network"]
    say(f"{origin['format']} {model} -> MLP {net['obs_dim']}-{'-'.join(map(str, net['hidden']))}-{net['n_actions']} "
                 f"({', '.join(net['activations']) or 'no hidden layers'})")
    for p in origin.get("preprocessing", []):
        say(f"preprocessing {p['kind']}: folded {p.get('folded', '')}" + (f"; clip {p['clip']}" if p.get("clip") else ""))
    say(f"checked on {c['states']:,} rollout states: max |dQ| {c['max_abs_dq']:.3g} = {c['rel_error']:.2g} of the Q range; "
                 f"greedy actions identical ({c['tied_mismatches']} exact ties)" if not c["action_mismatches"] else "")
    say(f"mean return over {m['return_episodes']} episodes: source {m['source_mean_return']:.1f}, "
                 f"imported {m['imported_mean_return']:.1f}")
    say(f"saved {result.path}")


def distill(result: Any, as_json: bool) -> None:
    m = result.manifest["metrics"]
    if as_json:
        emit_json({"path": str(result.path), "metrics": m})
        return
    c = m["check"]
    parent = f" ({m['parent_params'] / m['params']:.1f}x fewer than the parent's {m['parent_params']:,})" if m.get("parent_params") else ""
    say(f"student {'x'.join(map(str, m['hidden']))}: {m['params']:,} parameters{parent}; "
                 f"{m['gradient_steps']:,} steps on {m['distill_states']:,} states in {m['distill_seconds']:.1f} s")
    say(f"greedy agreement with the parent on {c['states']:,} held-out states {100 * c['agreement']:.1f}% "
                 f"(decisive states {100 * c['decisive_agreement']:.1f}%)")
    say(f"saved {result.path}")


def evaluation(r: dict[str, Any], as_json: bool) -> None:
    """An evaluation, as ``dqnc.evaluate.run`` returns it or in ``eval --json``'s flat names (both read)."""
    from dqnc.evaluate import record

    r = record(r)  # the flat names run --json's rows use (idempotent)
    if as_json:
        emit_json(r)
        return
    say(f"{r['path']}  ({r['stage']}, {r['kind']}, {r['env']})")
    lo, hi = r["return_ci95"]
    rows = [["episodes", f"{r['episodes']} (seeds {r['seed']}..{r['seed'] + r['episodes'] - 1}, {r['seed_range']} range)"],
            ["mean return (95% CI)", f"{r['mean_return']:.2f} ({lo:.2f}..{hi:.2f})"],
            ["min / max", f"{r['min_return']:.2f} / {r['max_return']:.2f}"],
            ["mean length", f"{r['mean_length']:.1f}"]]
    if r["solved_share"] is not None:
        rows.append([f"episodes >= {r['reward_threshold']:g}", f"{100 * r['solved_share']:.0f}%"])
    rows += _reference_rows(r) if r.get("reference") else []
    rows.append(["size", f"{r['size_bytes']:,} bytes ({r['gzip_bytes']:,} gzipped)"])
    if r.get("latency_p50_us") is not None:
        rows.append([f"latency per action ({r['runtime']})", f"p50 {r['latency_p50_us']:.1f} us, p99 {r['latency_p99_us']:.1f} us"])
        if r.get("invoke_p50_us") is not None:
            rows.append(["  interpreter invoke only", f"p50 {r['invoke_p50_us']:.1f} us, p99 {r['invoke_p99_us']:.1f} us"])
    rows.append(["wall time", f"{r['eval_seconds']:.2f} s"])
    rows += [[f"gate {g['gate']} ({g['threshold']:g})", "[green]pass[/]" if g["passed"] else "[red]FAIL[/]"]
             for g in r["gates"]]
    # The values fold at spaces on a narrow console (every word whole), the names never.
    layout.table(stdout, ["measure", "value"], rows, wrap=("value",), left=("measure",), styles={"measure": "bold"},
                 markup=True, show_header=False)


def _reference_rows(r: dict[str, Any]) -> list[list[str]]:
    """The comparison with the reference (flat names; the reference's own figures under "reference")."""
    dlo, dhi = r["return_drop_ci95"]
    rows = [["reference mean return", f"{r['reference']['mean_return']:.2f}"],
            ["return drop (95% CI)", f"{r['return_drop']:+.2f} ({dlo:+.2f}..{dhi:+.2f}), "
             f"{100 * r['return_drop_frac']:.2f}%"],
            ["regret (mean / p99)", f"{r['regret']:.4f} / {r['regret_p99']:.4f} of the action spread"],
            ["greedy agreement", f"{100 * r['agreement']:.2f}% of {r['states']:,} states"],
            ["  on decisive states", f"{100 * r['decisive_agreement']:.2f}% of {r['decisive_states']:,} "
             f"({100 * r['decisive_share']:.1f}%)"]]
    if "q_range" in r:
        rows.append(["Q error (max / range)", f"{r['q_max_abs_error']:.4g} / {r['q_range']:.4g}"])
    return rows


def inspection(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(info)
        return
    say(f"{info['path']}  stage {info['stage']}, env {info['env']['id']} "
                 f"(obs {tuple(info['env']['obs_shape'])}, {info['env']['n_actions']} actions)")
    if info.get("parent"):
        say(f"parent: {info['parent']['path']} ({info['parent']['stage']}, sha256 {info['parent']['sha256'][:12]})")
    say(f"outputs: {info['outputs']}" + (f"; precision {info['quantization']['mode']}"
                                                  if info.get("quantization") else ""))
    if info.get("ops") is not None:
        say(f"ops: {', '.join(info['ops'])}")
    rows = [[escape(layer["name"]), layer["op"], str(tuple(layer["shape"])), f"{layer['params']:,}", f"{layer['nonzero']:,}",
             f"{100 * layer['sparsity']:.1f}%"] for layer in info["layers"]]
    rows.append(["[bold]total", "", "", f"{info['params']:,}", f"{info['nonzero']:,}", f"{100 * info['sparsity']:.1f}%"])
    layout.table(stdout, ["layer", "op", "shape", "params", "nonzero", "sparsity"], rows, optional=("op", "nonzero"),
                 left=("layer", "op", "shape"), markup=True)
    say(f"size: {info['size_bytes']:,} bytes on disk, {info['gzip_bytes']:,} gzipped (model files); "
                 "sparsity = zero kernel weights / kernel weights")
    m = info.get("metrics") or {}
    if m.get("best_eval_mean_return") is not None:
        say(f"training: best greedy eval {m['best_eval_mean_return']:.1f} at step {m['best_eval_step']:,}; "
                     f"{m['env_steps']:,} steps in {m['train_seconds']:.1f} s")
    if info.get("command"):
        say(f"made by: {info['command']}")


def versions(found: dict[str, str], as_json: bool) -> None:
    if as_json:
        emit_json(found)
        return
    for name, v in found.items():
        echo(f"{name:32s}{v}")


def recipe_valid(path: Any, loaded: Any, as_json: bool) -> None:
    stages = [f"{s.name} ({s.stage})" for s in loaded.recipe.stages]
    if as_json:
        emit_json({"valid": True, "path": str(path), "out_dir": str(loaded.out_dir), "stages": stages})
        return
    say(f"{path}: valid; {len(stages)} stages: {' -> '.join(stages)}; outputs in {loaded.out_dir}")


def report(d: dict[str, Any], loaded: Any, as_json: bool) -> None:
    """The run report of ``dqnc run`` (a RunReport's dict)."""
    from dqnc import recipe

    if as_json:
        emit_json(d)
        return
    rows = [recipe.StageRow(**r) for r in d["stages"]]
    rep = recipe.RunReport(d["recipe"], d["out_dir"], rows, d["failures"], d["wall_seconds"],
                           gates_checked=d.get("gates_checked", True), fp32_tflite_bytes=d.get("fp32_tflite_bytes"))
    # Every cell on one line: COLUMNS is sized for an 80-column CI log (Rich's width when stdout
    # is not a terminal); on a narrower console the least telling columns are left out.
    say(f"dqnc run {d['recipe']} ({d['wall_seconds']:.1f} s)")
    layout.table(stdout, ["name"] + [c[0] for c in recipe.COLUMNS] + ["status"], recipe.table_rows(rep),
                 optional=("p50 us", "decisive", "regret"), left=("name", "prec."), markup=False,
                 dropped_note="report.md and --json have every column", **_COMPACT)
    size = rep.size_line()
    if size:
        say(size)
    for passed, line in recipe.gate_lines(rep):
        say(line, style="green" if passed else "red")
    for failure in d["failures"]:
        if "gate " not in failure:
            say(failure, style="red")
    color = {"PASSED": "green", "FAILED": "red"}.get(rep.verdict, "yellow")
    extra = "" if rep.gates_checked else " (--until stopped early: the recipe's gates were not checked)"
    layout.say(stdout, f"[{color}]{rep.verdict}[/]{escape(extra)}; report: {escape(str(loaded.out_dir / 'report.md'))} "
               "and report.json", markup=True)


def _ray_words(ray: dict[str, Any] | None, trials: int) -> str:
    if ray is None:
        return f"no trial ran: all {trials} were in the journal"
    return f"on Ray {ray['version']}, {ray['address']} ({ray['cpus']} CPUs)"


def sweep(result: Any, path: Any, sweep_dir: Any, as_json: bool) -> None:
    from dqnc import sweep as sweep_mod

    d = result.to_dict()
    if as_json:
        emit_json({k: v for k, v in d.items() if k != "trials"})
        return
    head, rows = sweep_mod.table(result)
    say(f"dqnc sweep {path}: {len(rows)} trials {_ray_words(d.get('ray'), len(rows))}, {result.wall_seconds:.1f} s; "
        f"{d['stage_runs']['cached']} stages from the shared cache")
    layout.table(stdout, head, rows, optional=("s", "p50 us", "decisive", "regret", "prec."), wrap=("overrides",),
                 left=("front", "trial", "overrides", "prec.", "verdict"), markup=False,
                 dropped_note="sweep.md and sweep.json have every column", **_COMPACT)
    say(f"front (*): most return for fewest bytes; sweep.md, sweep.json, pareto.png in {sweep_dir}")
