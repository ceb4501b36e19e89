"""The distill stage: any policy artifact -> a dense fp32 student (MLP or conv net) of the shape asked for.

The student starts from scratch and learns the parent's greedy policy by policy distillation
plus DAgger (see :mod:`dqnc.distillation`): a network that is small because it *is* small, not
a wide one with zeros, so every runtime (TFLite Micro included) runs it dense and the int8 file
shrinks with the parameter count. ``hidden: auto`` searches the listed widths from the narrowest
and keeps the first whose greedy return on validation episodes is within ``max_return_drop`` of
the parent's on the same episodes; the held-out episodes `dqnc eval` uses are never looked at.
On image envs ``conv`` makes the student a conv net (``[[filters, kernel, stride], ...]`` then the
hidden widths), small by construction: its bytes sit in the Dense layer after the flatten, so
fewer filters and larger strides shrink it most.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc import progress
from dqnc.fidelity import actions_of, fidelity
from dqnc.config import DistillConfig
from dqnc.distillation import Normalizer, OutputNormalizer, Trainer, check_states, dagger, teacher_states
from dqnc.envs import QFunction, rollout
from dqnc.errors import GateFailed
from dqnc.qnet import QNetSpec
from dqnc.seeds import episode_seed


@dataclass
class Student:
    hidden: tuple[int, ...]
    weights: list[np.ndarray]  # raw (unnormalized) coordinates
    history: list[float]
    states: int
    steps: int
    seconds: float

    @property
    def params(self) -> int:
        return int(sum(w.size for w in self.weights))


def train_student(cfg: DistillConfig, hidden: tuple[int, ...], teacher_q: QFunction, env: Any, states: np.ndarray,
                  q_t: np.ndarray, norm: Normalizer) -> Student:
    """Distill one student of widths ``hidden`` (the same seed gives the same student)."""
    from dqnc.keras import keras, tf

    from dqnc.qnet.keras_build import im2col_pays, use_im2col

    started = time.perf_counter()
    keras().utils.set_random_seed(cfg.seed)
    tf().config.experimental.enable_op_determinism()
    spec = student_spec(cfg, env, hidden)
    model = spec.build_plain()
    fast = spec.family == "mlp" or im2col_pays(spec)  # small images: im2col under XLA (as in training)
    if fast and spec.family == "conv":
        use_im2col(model)
    trainer = Trainer(model, cfg, env.n_actions, jit=fast)
    res = dagger(trainer, model.get_weights, list(spec.activations), teacher_q, norm, states, q_t, env, cfg,
                 first_steps=cfg.steps, rounds=cfg.dagger_rounds, round_steps=cfg.dagger_steps,
                 extra_states=max(64, cfg.states // 4), student_policy=spec.numpy)
    weights = norm.to_raw(model.get_weights())
    return Student(hidden, weights, res.history, res.states, res.steps, time.perf_counter() - started)


def student_spec(cfg: DistillConfig, env: Any, hidden: tuple[int, ...]) -> QNetSpec:
    """The student network: a conv net with ``cfg.conv`` on images, else a Dense MLP (flattened images)."""
    if cfg.conv:
        return QNetSpec.for_env(env, cfg.conv, hidden, cfg.activation, False)
    return QNetSpec.mlp(env.obs_dim, env.n_actions, hidden, cfg.activation)


def student_data(cfg: DistillConfig, env: Any, states: np.ndarray, q_t: np.ndarray) -> tuple[np.ndarray, Normalizer]:
    """The distillation states as the student reads them, and its normalizer: a conv student reads
    images and scales only its targets (a convolution cannot absorb a per-pixel scaling)."""
    if cfg.conv:
        return states.reshape(len(states), *env.obs_shape), OutputNormalizer.fit(states, q_t, advantages=cfg.value_weight == 0)
    return states, Normalizer.fit(states, q_t, advantages=cfg.value_weight == 0)


def validation_return(q_fn: QFunction, env: Any, cfg: DistillConfig) -> float:
    res = rollout(q_fn, env, cfg.validation_episodes, episode_seed("validation", cfg.seed))
    return float(res.returns.mean())


def search_width(cfg: DistillConfig, teacher_q: QFunction, env: Any, states: np.ndarray, q_t: np.ndarray,
                 norm: Normalizer, log: Callable[[str], None] | None = None) -> tuple[Student, dict[str, Any]]:
    """The narrowest student (``depth`` layers of one width from ``widths``) meeting the return gate."""
    parent_mean = validation_return(teacher_q, env, cfg)
    tried: list[dict[str, Any]] = []
    for width in sorted(set(cfg.widths)):
        hidden = (width,) * cfg.depth
        student = train_student(cfg, hidden, teacher_q, env, states, q_t, norm)
        progress.update(phase=f"width {width}: {cfg.validation_episodes} validation episodes")
        mean = validation_return(student_spec(cfg, env, hidden).numpy(student.weights), env, cfg)
        drop = (parent_mean - mean) / max(abs(parent_mean), 1e-9)
        ok = drop <= cfg.max_return_drop
        tried.append({"hidden": list(hidden), "params": student.params, "validation_mean_return": mean,
                      "return_drop_frac": drop, "passed": ok, "seconds": round(student.seconds, 2)})
        if log is not None:
            log(f"width {width}: validation return {mean:.2f} (parent {parent_mean:.2f}, drop {100 * drop:.2f}%)"
                f"{' - kept' if ok else ''}")
        if ok:
            return student, {"parent_validation_mean_return": parent_mean, "tried": tried}
    widest = tried[-1]
    raise GateFailed(
        f"no student width in {sorted(set(cfg.widths))} x {cfg.depth} layers keeps the validation return within "
        f"{100 * cfg.max_return_drop:.2f}% of the parent's {parent_mean:.2f} (widest: {widest['validation_mean_return']:.2f}, "
        f"drop {100 * widest['return_drop_frac']:.2f}%): add wider widths, more layers (depth), or more steps",
        {"tried": tried})


def run(cfg: DistillConfig, source: art.Artifact, out: Path, *, force: bool = False,
        command: list[str] | None = None, log: Callable[[str], None] | None = None) -> art.Artifact:
    """Distill ``source``'s policy into a dense student and write its SavedModel artifact at ``out``."""
    from dqnc.policy import q_function

    started = time.perf_counter()
    out = Path(out)
    art.check_output(out, force)
    teacher_q = q_function(source)
    env = source.env
    states, q_t = teacher_states(teacher_q, env, cfg.states, cfg)
    states, norm = student_data(cfg, env, states, q_t)
    search: dict[str, Any] | None = None
    if cfg.hidden == "auto":
        student, search = search_width(cfg, teacher_q, env, states, q_t, norm, log)
    else:
        student = train_student(cfg, tuple(cfg.hidden), teacher_q, env, states, q_t, norm)
    spec = student_spec(cfg, env, student.hidden)
    student_q = spec.numpy(student.weights)
    check = check_states(teacher_q, env, cfg.check_states, cfg.seed, cfg.epsilon)
    stats = fidelity(teacher_q(check), actions_of(student_q(check)))
    parent_params = (source.manifest.get("metrics") or {}).get("params") or _params_of(source)
    metrics: dict[str, Any] = {
        "hidden": list(student.hidden),
        "params": student.params,
        "parent_params": parent_params,
        "check": stats,
        "distill_states": student.states,
        "gradient_steps": student.steps,
        "loss_history": student.history[-5:],
        "distill_seconds": round(time.perf_counter() - started, 3),
    }
    if search is not None:
        metrics["width_search"] = search
    model = spec.build_plain(student.weights)
    with art.atomic_output(out, force) as tmp:
        model.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        spec.save_sidecar(tmp, student.weights)
        art.write_manifest(tmp, stage="distill", env=env, network=spec.to_network() | {"outputs": "action_scores"},
                           config=cfg.model_dump(mode="json"), metrics=metrics, parent=source, command=command)
    return art.load(out)


def _params_of(source: art.Artifact) -> int | None:
    network = source.network or {}
    if not network.get("hidden"):
        return None
    return QNetSpec.from_network(source.env, network).params()
