"""The eval stage: greedy episodes of any artifact, agreement with a reference, size, latency, gates.

Nothing here imports TensorFlow for dqnc artifacts or .tflite files (see ``dqnc.policy``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dqnc import progress
from dqnc.artifact import Artifact
from dqnc.compare import int8_output_bounds, q_errors_unsaturated
from dqnc.config import EvalConfig
from dqnc.envs import QFunction, rollout
from dqnc.errors import GateFailed, UsageError
from dqnc.fidelity import actions_of, fidelity, return_drop, return_stats
from dqnc.seeds import purpose_of


def latency_us(q_fn: QFunction, states: np.ndarray, samples: int) -> dict[str, Any]:
    """Per-action wall time in microseconds (p50/p99/mean): ``action`` is float observation in,
    greedy action out, including any input quantization; ``invoke`` (TFLite only) is the
    interpreter's set-input/invoke/get-output on an already-quantized input."""
    if samples <= 0 or len(states) == 0:
        return {}
    idx = np.random.default_rng(0).integers(0, len(states), samples)
    rows = [states[i] for i in idx]
    act = getattr(q_fn, "act", None) or (lambda r: q_fn(r[None, :]).argmax())
    result = {"action": _time_calls(act, rows)}
    invoke = getattr(q_fn, "invoke_quantized", None)
    if invoke is not None:  # the interpreter alone, as a C control loop on a device would call it
        prepared = [q_fn.quantize_input(r).reshape(q_fn.input_shape) for r in rows]
        result["invoke"] = _time_calls(invoke, prepared)
    return result


def _time_calls(fn: Any, args: list[Any]) -> dict[str, float]:
    for a in args[:100]:  # warm-up
        fn(a)
    times = np.empty(len(args))
    clock = time.perf_counter_ns
    for j, a in enumerate(args):
        t0 = clock()
        fn(a)
        times[j] = clock() - t0
    times /= 1000.0
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)), "mean": float(times.mean())}


def _random_q(n_actions: int, seed: int) -> QFunction:
    rng = np.random.default_rng(seed)
    return lambda obs: rng.random((len(obs), n_actions))


def run(cfg: EvalConfig, source: Artifact, reference: Artifact | None = None) -> dict[str, Any]:
    """Evaluate ``source`` and return its metrics; raise GateFailed (carrying them) if a gate fails."""
    from dqnc.inspection import disk_size, gzip_size, param_count
    from dqnc.policy import q_function

    if reference is not None and reference.env.id != source.env.id:
        raise UsageError(f"--reference acts in {reference.env.id!r} but the model in {source.env.id!r}: compare policies of one env")
    g = cfg.gates
    relative = [name for name in ("max_return_drop", "min_agreement", "min_decisive_agreement", "max_regret")
                if getattr(g, name) is not None]
    if relative and reference is None:
        flags = ", ".join("--" + n.replace("_", "-") for n in relative)
        raise UsageError(f"{flags} compare against a parent: pass --reference PARENT")
    started = time.perf_counter()
    q_fn = q_function(source, runtime=cfg.runtime)
    load_s = time.perf_counter() - started
    t0 = time.perf_counter()
    progress.update(phase=f"{cfg.episodes} episodes")
    res = rollout(progress.counted(q_fn), source.env, cfg.episodes, cfg.seed,
                  record=reference is not None or cfg.latency_samples > 0)
    wall = time.perf_counter() - t0
    threshold = source.env.reward_threshold
    r = res.returns
    result: dict[str, Any] = {
        "path": str(source.path),
        "stage": source.stage,
        "kind": source.kind,
        "env": source.env.id,
        "episodes": cfg.episodes,
        "seed": cfg.seed,
        "seed_range": purpose_of(cfg.seed),
        **return_stats(r),
        "mean_length": float(res.lengths.mean()),
        "reward_threshold": threshold,
        "solved_share": None if threshold is None else float((r >= threshold).mean()),
        "size_bytes": disk_size(source.model_path),
        "gzip_bytes": gzip_size(source.model_path),
        "params": param_count(source),
        "runtime": getattr(q_fn, "runtime", "numpy" if source.kind == "savedmodel" else "keras"),
        "load_seconds": round(load_s, 3),
        "eval_seconds": round(wall, 3),
        "gates": [],
    }
    if res.observations is not None and cfg.latency_samples > 0:
        progress.update(phase=f"latency ({cfg.latency_samples:,} actions)")
        result["latency_us"] = latency_us(q_fn, res.observations, cfg.latency_samples)
    if reference is not None:
        assert res.observations is not None and res.q_values is not None
        ref_fn = q_function(reference)
        progress.update(phase=f"{cfg.episodes} episodes of the reference")
        ref = rollout(progress.counted(ref_fn), reference.env, cfg.episodes, cfg.seed)
        progress.update(phase=f"{cfg.episodes} episodes of a random policy")
        rnd = rollout(progress.counted(_random_q(source.env.n_actions, cfg.seed)), source.env, cfg.episodes, cfg.seed)
        ref_mean, rnd_mean = float(ref.returns.mean()), float(rnd.returns.mean())
        q_ref = ref_fn(res.observations)
        result["reference"] = {
            "path": str(reference.path),
            "stage": reference.stage,
            "mean_return": ref_mean,
            "return_ci95": return_stats(ref.returns)["return_ci95"],
            "random_policy_mean_return": rnd_mean,
            **return_drop(ref.returns, r, rnd_mean),
            **fidelity(q_ref, actions_of(res.q_values)),
        }
        if source.outputs != "action_scores" and reference.outputs == "q_values":
            # Q errors mean something only where the model outputs Q-values (or centered ones).
            # A narrowed int8 output range saturates large scores (see quantize.narrow_output_range).
            bounds = int8_output_bounds((source.manifest.get("quantization") or {}).get("output"))
            result["reference"].update(q_errors_unsaturated(q_ref, res.q_values, source.outputs == "centered_q_values",
                                                            bounds))
    apply_gates(cfg, result)
    return result


# What stays under "reference" in the JSON record: the reference itself. Everything measured
# *against* it (agreement, regret, return drop, Q error) is a property of the evaluated policy and
# sits at the top level, under the names a recipe report's rows use (dqnc.recipe.report.row_metrics).
REFERENCE_OWN = ("path", "stage", "mean_return", "return_ci95", "random_policy_mean_return")


def record(result: dict[str, Any]) -> dict[str, Any]:
    """The output vocabulary of ``dqnc eval --json`` (and of ``run --json``'s rows): flat names,
    ``latency_p50_us`` for ``latency_us.action.p50``, ``invoke_p99_us`` for the interpreter alone,
    ``agreement``/``regret``/``return_drop_frac`` at the top level; ``reference`` keeps what
    describes the reference (its path, stage, mean return, CI, the random policy's return)."""
    out = {k: v for k, v in result.items() if k not in ("latency_us", "reference")}
    for kind, figures in (result.get("latency_us") or {}).items():
        prefix = "latency" if kind == "action" else kind
        out.update({f"{prefix}_{stat}_us": value for stat, value in figures.items()})
    ref = result.get("reference")
    if ref is not None:
        out.update({k: v for k, v in ref.items() if k not in REFERENCE_OWN})
        out["reference"] = {k: ref[k] for k in REFERENCE_OWN if k in ref}
    else:
        out["reference"] = None
    return out


def _gate(result: dict[str, Any], name: str, threshold: float, value: float, ok: bool, failure: str) -> str | None:
    result["gates"].append({"gate": name, "threshold": threshold, "value": value, "passed": bool(ok)})
    return None if ok else f"gate {name} failed: {failure}"


def apply_gates(cfg: EvalConfig, result: dict[str, Any]) -> None:
    g = cfg.gates
    fails: list[str | None] = []
    mean = result["mean_return"]
    if g.min_return is not None:
        fails.append(_gate(result, "min_return", g.min_return, mean, mean >= g.min_return,
                           f"mean return {mean:.2f} is below {g.min_return:g} by {g.min_return - mean:.2f}"))
    ref = result.get("reference")
    if g.max_return_drop is not None and ref is not None:
        drop = ref["return_drop_frac"]
        fails.append(_gate(result, "max_return_drop", g.max_return_drop, drop, drop <= g.max_return_drop,
                           f"mean return {mean:.2f} is {100 * drop:.2f}% below the reference's {ref['mean_return']:.2f} "
                           f"on the same episodes (allowed {100 * g.max_return_drop:.2f}%)"))
    if g.min_agreement is not None and ref is not None:
        agr = ref["agreement"]
        fails.append(_gate(result, "min_agreement", g.min_agreement, agr, agr >= g.min_agreement,
                           f"greedy agreement {100 * agr:.2f}% of {ref['states']:,} visited states is below "
                           f"{100 * g.min_agreement:.2f}% by {100 * (g.min_agreement - agr):.2f} points"))
    if g.min_decisive_agreement is not None and ref is not None:
        agr = ref["decisive_agreement"]
        fails.append(_gate(result, "min_decisive_agreement", g.min_decisive_agreement, agr,
                           agr >= g.min_decisive_agreement,
                           f"greedy agreement on {ref['decisive_states']:,} decisive states {100 * agr:.2f}% is below "
                           f"{100 * g.min_decisive_agreement:.2f}% by {100 * (g.min_decisive_agreement - agr):.2f} points"))
    if g.max_regret is not None and ref is not None:
        reg = ref["regret"]
        fails.append(_gate(result, "max_regret", g.max_regret, reg, reg <= g.max_regret,
                           f"mean regret {reg:.4f} of the reference's action spread exceeds {g.max_regret:g}"))
    for name, unit, div in (("max_size_kb", "kB", 1000), ("max_size_kib", "KiB", 1024)):
        limit = getattr(g, name)
        if limit is not None:
            size = result["size_bytes"] / div
            fails.append(_gate(result, name, limit, size, size <= limit,
                               f"model size {size:.1f} {unit} ({result['size_bytes']:,} bytes) exceeds {limit:g} {unit} "
                               f"by {size - limit:.1f} {unit}"))
    lat = (result.get("latency_us") or {}).get("action")
    if g.max_latency_us is not None:
        if lat is None:
            raise UsageError("the max_latency_us gate needs latency figures: set latency_samples above 0")
        fails.append(_gate(result, "max_latency_us", g.max_latency_us, lat["p50"], lat["p50"] <= g.max_latency_us,
                           f"p50 latency per action {lat['p50']:.1f} us exceeds {g.max_latency_us:g} us by "
                           f"{lat['p50'] - g.max_latency_us:.1f} us"))
    messages = [f for f in fails if f]
    if messages:
        raise GateFailed("; ".join(messages), result)
