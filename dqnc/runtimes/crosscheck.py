"""Cross-runtime verification: one policy run by two runtimes on identical quantized inputs, judged
by the parent where there is one. Returns a :class:`CrossCheck`; the caller decides what a failure
means (export refuses to write the bundle).

Every action must agree, with one measured exception: TFLM's reference kernels requantize with
TFLite's default double rounding, while LiteRT 2.x's kernels round once (TFLITE_SINGLE_ROUNDING;
XNNPACK nearly so), so an int8 activation can differ by one step and, near a tie, the action flips
(measured: 61 of 10,000 CartPole states for an unpruned 128x128 model with a narrowed output
range). For int8 fully connected models dqnc recomputes TFLM's arithmetic exactly
(:mod:`dqnc.cpolicy`); disagreements are then accepted, and counted, only when every candidate
output equals that computation and they are at most ``max_mismatch`` of the states. For conv nets,
whose arithmetic dqnc does not recompute, a flip is accepted as a tie: where the parent itself
(``q_parent``, its Q-values on ``states``) rates the two actions within the decisive threshold
(``fidelity.DECISIVE_FRAC`` of its Q range), or, without a parent, where both runtimes' outputs are
within NEAR_TIE_STEPS int8 steps.

With the parent's Q-values, the parent is the judge: the candidate's actions must meet the gates
quantize's check applies to LiteRT's (``max_regret``, ``min_decisive_agreement``); the raw
mismatch between the runtimes is reported, and refuses only beyond ``max_mismatch`` when that is
set. Without a parent, every flip must be explained by the runtimes' rounding and at most
``max_mismatch`` (default NO_PARENT_MAX_MISMATCH) of the states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dqnc.runtimes.names import LITERT, TFLM

# int8 output steps within which TFLM and LiteRT may rank two actions differently for models whose
# arithmetic dqnc does not recompute (conv nets): one requantization rounding per layer or two.
NEAR_TIE_STEPS = 2
# Without a parent to judge by, the share of states on which TFLM may act unlike LiteRT (each flip
# explained by the runtimes' rounding): measured 0.61% for an unpruned 128x128 CartPole model.
NO_PARENT_MAX_MISMATCH = 0.01
# label -> (title, short title) in messages
TITLES = {TFLM: ("TensorFlow Lite Micro", "TFLM"), LITERT: ("LiteRT", "LiteRT")}


@dataclass
class CrossCheck:
    """The verdict. ``figures`` go into manifests as they are; ``why`` says what failed (None if ok).
    ``xq`` are the quantized inputs both runtimes ran, ``raw_*`` their raw outputs."""

    figures: dict[str, Any]
    ok: bool
    why: str | None
    by_parent: bool
    xq: np.ndarray
    raw_reference: np.ndarray
    raw_candidate: np.ndarray
    labels: tuple[str, str] = (TFLM, LITERT)
    extra: dict[str, Any] = field(default_factory=dict)


def first_max(raw: np.ndarray) -> np.ndarray:
    return raw.argmax(axis=1)  # numpy's argmax returns the first maximum: the tie rule shipped


def raw_outputs(policy: Any, xq: np.ndarray) -> np.ndarray:
    """``policy``'s raw outputs, one invoke per quantized input row."""
    return np.stack([np.array(policy.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])


def crosscheck(reference: Any, candidate: Any, states: np.ndarray, *, q_parent: np.ndarray | None = None,
               max_mismatch: float | None = None, max_regret: float = 0.05,
               min_decisive_agreement: float | None = None, content: bytes | None = None,
               labels: tuple[str, str] = (TFLM, LITERT)) -> CrossCheck:
    """Run ``states`` through ``candidate`` and ``reference`` (both take ``invoke_quantized``) on the
    inputs the reference quantizes, and judge the candidate (see the module doc). ``content`` is the
    .tflite both run (its int8 arithmetic is recomputed where dqnc can); ``labels`` name the
    candidate and the reference in figures and messages."""
    xq = reference.quantize_input(states).reshape((len(states), *reference.input_shape[1:]))
    raw_c, raw_r = raw_outputs(candidate, xq), raw_outputs(reference, xq)
    same = first_max(raw_c) == first_max(raw_r)
    figures: dict[str, Any] = {"states": int(len(states)), "actions_equal": int(same.sum())}
    if raw_c.dtype.kind in "iu":
        diff = np.abs(raw_c.astype(np.int64) - raw_r.astype(np.int64))
        figures["int_output_differences"] = int((diff > 0).sum())
        figures["int_output_max_difference"] = int(diff.max()) if diff.size else 0
    else:
        figures["output_max_abs_difference"] = float(np.abs(raw_c - raw_r).max())
    explained = False
    if not same.all() and raw_c.dtype.kind in "iu":
        explained = _explain_int(content, xq, raw_c, raw_r, same, diff, q_parent, figures, labels)
    elif not same.all():
        explained = _explain_float(raw_c, raw_r, same, figures)
    share = float((~same).mean())
    figures["action_mismatch_share"] = share
    result = CrossCheck(figures, True, None, q_parent is not None, xq, raw_r, raw_c, labels)
    (title_c, short_c), (title_r, _) = (TITLES.get(l, (l, l)) for l in labels)
    if q_parent is not None:
        problems = judge_by_parent(q_parent, raw_c, raw_r, figures, share, max_mismatch, max_regret,
                                   min_decisive_agreement, reference.runtime, labels)
        if problems:
            result.ok, result.why = False, (f"on {title_c} the policy strays from its parent on {len(states):,} "
                                            f"held-out states: {'; '.join(problems)}")
        return result
    limit = NO_PARENT_MAX_MISMATCH if max_mismatch is None else max_mismatch
    if not same.all() and (not explained or share > limit):
        why = (f"{100 * share:.2f}% exceeds the allowed {100 * limit:.2f}% (--max-action-mismatch)" if explained
               else "more than the two runtimes' rounding explains")
        result.ok, result.why = False, (f"{title_c} and {title_r} ({reference.runtime}) choose different actions on "
                                        f"{int((~same).sum())} of {len(states):,} held-out states, {why}")
    return result


def _explain_int(content: bytes | None, xq: np.ndarray, raw_c: np.ndarray, raw_r: np.ndarray, same: np.ndarray,
                 diff: np.ndarray, q_parent: np.ndarray | None, figures: dict[str, Any], labels: tuple[str, str]) -> bool:
    """Whether the integer models' flips are the runtimes' rounding (figures say how it was told)."""
    from dqnc import cpolicy

    mlp = cpolicy.extract(content) if content is not None else "no model bytes to recompute"
    if not isinstance(mlp, str):
        flat = xq.reshape(len(xq), -1)
        exact = bool((mlp.forward(flat, "double") == raw_c).all())
        single = mlp.forward(flat, "single")
        figures.update(tflm_equals_double_rounding=exact,
                       litert_outputs_equal_single_rounding=int((single == raw_r).all(axis=1).sum()))
        return exact
    # Conv nets: dqnc does not recompute TFLM's conv arithmetic, so a flip is accepted only as a near
    # tie: every output within NEAR_TIE_STEPS int8 steps in both runtimes, and the two actions within
    # that many steps of each other in both (measured on MinAtar Breakout: outputs differ by <= 2
    # steps, 36 of 40 flips are exact ties in LiteRT).
    rows = np.flatnonzero(~same)
    a_c, a_r = first_max(raw_c)[rows], first_max(raw_r)[rows]
    c, r = raw_c.astype(np.int64)[rows], raw_r.astype(np.int64)[rows]
    at = np.arange(len(rows))
    gaps = np.concatenate([r[at, a_r] - r[at, a_c], c[at, a_c] - c[at, a_r]])
    explained = bool(diff.max() <= NEAR_TIE_STEPS and gaps.max() <= NEAR_TIE_STEPS)
    figures.update(int8_near_ties=int(len(rows)) if explained else 0, near_tie_steps=NEAR_TIE_STEPS,
                   flip_gap_max_steps=int(gaps.max()))
    if q_parent is None:
        return explained
    # The output scale may be narrowed (quantize's 'ranking' range), which counts the same rounding
    # in more int8 steps; what matters is whether the parent cares.
    from dqnc.fidelity import DECISIVE_FRAC

    q_range = float(q_parent.max() - q_parent.min())
    parent_gap = np.abs(q_parent[rows, a_c] - q_parent[rows, a_r])
    parent_ties = bool((parent_gap < DECISIVE_FRAC * q_range).all()) if q_range > 0 else True
    figures.update(parent_ties=int(len(rows)) if parent_ties else 0,
                   flip_parent_gap_max=float(parent_gap.max() / q_range) if q_range > 0 else 0.0,
                   **_vs_parent(q_parent, raw_c, raw_r, labels)[0])
    return explained or parent_ties


def _explain_float(raw_c: np.ndarray, raw_r: np.ndarray, same: np.ndarray, figures: dict[str, Any]) -> bool:
    # Float kernels sum in different orders: a flip is a float tie when the candidate's choice scores
    # within float32 rounding of the reference's best in the reference's own outputs.
    rows = np.flatnonzero(~same)
    best = raw_r[rows, first_max(raw_r)[rows]]
    of_candidate = raw_r[rows, first_max(raw_c)[rows]]
    tol = 1e-5 * np.maximum(1.0, np.abs(raw_r[rows]).max(axis=1))
    explained = bool((best - of_candidate <= tol).all())
    figures["float_ties"] = int(len(rows)) if explained else 0
    return explained


def _vs_parent(q_parent: np.ndarray, raw_c: np.ndarray, raw_r: np.ndarray, labels: tuple[str, str]
               ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from dqnc.fidelity import actions_of, fidelity

    on_c, on_r = fidelity(q_parent, actions_of(raw_c)), fidelity(q_parent, actions_of(raw_r))
    figures = {f"{k}_vs_parent": {labels[0]: on_c[k], labels[1]: on_r[k]} for k in ("regret", "agreement", "decisive_agreement")}
    return figures, on_c, on_r


def judge_by_parent(q_parent: np.ndarray, raw_c: np.ndarray, raw_r: np.ndarray, figures: dict[str, Any],
                    share: float, max_mismatch: float | None, max_regret: float,
                    min_decisive_agreement: float | None, reference_name: str,
                    labels: tuple[str, str] = (TFLM, LITERT)) -> list[str]:
    """Judge the candidate's actions by the parent's Q-values, as quantize's check judges LiteRT's:
    the figures are added, the problems returned (none: it passes)."""
    vs, on_c, on_r = _vs_parent(q_parent, raw_c, raw_r, labels)
    figures.update(vs)
    figures["decisive_states"] = on_c["decisive_states"]
    (_, short_c), (title_r, _) = (TITLES.get(l, (l, l)) for l in labels)
    problems = []
    if on_c["regret"] > max_regret:
        problems.append(f"regret {on_c['regret']:.4f} of the parent's action spread > {max_regret:g} "
                        f"({title_r}: {on_r['regret']:.4f})")
    if min_decisive_agreement is not None and on_c["decisive_agreement"] < min_decisive_agreement:
        problems.append(f"decisive agreement {on_c['decisive_agreement']:.4f} < {min_decisive_agreement:g} "
                        f"({title_r}: {on_r['decisive_agreement']:.4f})")
    if max_mismatch is not None and share > max_mismatch:
        problems.append(f"{short_c} and {title_r} ({reference_name}) choose different actions on {100 * share:.2f}% of the "
                        f"states > {100 * max_mismatch:.2f}% (--max-action-mismatch)")
    return problems


def closed_loop(reference_q: Any, candidate_q: Any, env: Any, episodes: int, seed: int, max_return_drop: float,
                label: str = TFLM) -> tuple[dict[str, Any], str | None]:
    """Episodes of the parent (``reference_q``) and the candidate on the same seeds: the return
    figures, and why the candidate fails (its drop exceeds ``max_return_drop`` and the paired 95%
    CI of the drop excludes 0), or None."""
    from dqnc.envs import rollout
    from dqnc.fidelity import return_drop

    ref = rollout(reference_q, env, episodes, seed).returns
    new = rollout(candidate_q, env, episodes, seed).returns
    drop = return_drop(ref, new)
    figures = dict(check_episodes=episodes, return_seed=seed, parent_mean_return=float(ref.mean()),
                   **{f"{label}_mean_return": float(new.mean())}, **drop)
    if drop["return_drop_frac"] > max_return_drop and drop["return_drop_ci95"][0] > 0:
        return figures, (f"returns {new.mean():.2f} over {episodes} check episodes against the parent's {ref.mean():.2f} "
                         f"(drop {100 * drop['return_drop_frac']:.2f}%, allowed {100 * max_return_drop:.2f}%, "
                         "the paired 95% CI excludes 0)")
    return figures, None
