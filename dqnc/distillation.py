"""Policy distillation shared by the prune and distill stages: one loss, one compiled loop, DAgger.

A student (a narrower MLP, or the parent itself wrapped for pruning) learns the teacher's
greedy policy from states of the teacher's epsilon-noisy rollouts, then from the states the
student itself visits, labelled by the teacher (DAgger, Ross et al. 2011), so a student that
drifts off the teacher's path is taught there.

Training runs ``chunk`` minibatch steps inside one ``tf.function`` call (XLA-compiled for plain
Dense students), with minibatches gathered in numpy from a seeded generator: there is no Keras
``fit`` and no Python call per step, and the same seed gives the same student.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dqnc import progress
from dqnc.envs import EnvSpec, QFunction, collect_states
from dqnc.qnet import QNetSpec
from dqnc.qnet.fold import scale_output, standardize_input, unscale_output, unstandardize_input
from dqnc.seeds import episode_seed

CHUNK = 100  # minibatch steps per compiled call: large enough that Python overhead vanishes
# Episode offsets inside a stage's "distill" seed block: round r of DAgger starts at (r+1) * this.
DAGGER_SEED_STRIDE = 5_000
# Where a Trainer made now writes its TensorBoard scalars (None: nowhere). A context, not an
# argument, so the prune and distill stages keep the one ``run(config, source, out)`` signature
# every stage has; a recipe run sets it around each stage (dqnc.recipe.runner).
_LOGDIR: ContextVar[Path | None] = ContextVar("dqnc_distill_logdir", default=None)


@contextmanager
def tensorboard(logdir: Path | None) -> Iterator[None]:
    """Write the distillation scalars of the stages run inside (``distill/loss`` per chunk of
    CHUNK steps, ``distill/states`` at the first fit and each DAgger round) under ``logdir``."""
    token = _LOGDIR.set(logdir)
    try:
        yield
    finally:
        _LOGDIR.reset(token)


class DistillSettings(Protocol):
    """The loss and optimizer settings PruneConfig and DistillConfig share."""

    distill_loss: str
    margin: float
    temperature: float
    score_gain: float
    advantage_weight: float
    value_weight: float
    batch_size: int
    lr: float
    epsilon: float
    seed: int


@dataclass
class Normalizer:
    """Distill in standardized coordinates, then fold the scaling back into the weights.

    Raw observations differ in scale by 10-30x and Q-values sit far from zero, which makes the
    regression badly conditioned; standardizing inputs (per feature) and targets (one scalar
    scale, so advantages keep their relative size) is an exact reparametrization of the first and
    last layers. Zeros stay zeros, and magnitude pruning then ranks first-layer weights by
    weight x input scale, their real contribution.
    """

    x_mean: np.ndarray
    x_std: np.ndarray
    q_mean: float
    q_std: float

    @classmethod
    def fit(cls, states: np.ndarray, q: np.ndarray, advantages: bool = False) -> Normalizer:
        x_std = states.std(axis=0)
        spread = (q - q.mean(axis=1, keepdims=True)).std() if advantages else q.std()
        return cls(states.mean(axis=0), np.where(x_std > 1e-6, x_std, 1.0), float(q.mean()), float(max(spread, 1e-6)))

    def x(self, states: np.ndarray) -> np.ndarray:
        return ((states - self.x_mean) / self.x_std).astype(np.float32)

    def q(self, q: np.ndarray) -> np.ndarray:
        return ((q - self.q_mean) / self.q_std).astype(np.float32)

    def to_normalized(self, w: list[np.ndarray]) -> list[np.ndarray]:
        w = [np.asarray(a, np.float64) for a in w]
        w[0], w[1] = standardize_input(w[0], w[1], self.x_mean, self.x_std)
        w[-2], w[-1] = scale_output(w[-2], w[-1], self.q_mean, self.q_std)
        return [a.astype(np.float32) for a in w]

    def to_raw(self, w: list[np.ndarray]) -> list[np.ndarray]:
        w = [np.asarray(a, np.float64) for a in w]
        w[0], w[1] = unstandardize_input(w[0], w[1], self.x_mean, self.x_std)
        w[-2], w[-1] = unscale_output(w[-2], w[-1], self.q_mean, self.q_std)
        return [a.astype(np.float32) for a in w]


class OutputNormalizer(Normalizer):
    """Targets only, for conv students: a convolution cannot absorb a per-pixel input scaling, and
    0/1 or 0..255 pixels need none. Only the output layer (the last kernel and bias) is rescaled."""

    def x(self, states: np.ndarray) -> np.ndarray:
        return np.asarray(states, np.float32)

    def to_normalized(self, w: list[np.ndarray]) -> list[np.ndarray]:
        w = [np.asarray(a, np.float64) for a in w]
        w[-2], w[-1] = scale_output(w[-2], w[-1], self.q_mean, self.q_std)
        return [a.astype(np.float32) for a in w]

    def to_raw(self, w: list[np.ndarray]) -> list[np.ndarray]:
        w = [np.asarray(a, np.float64) for a in w]
        w[-2], w[-1] = unscale_output(w[-2], w[-1], self.q_mean, self.q_std)
        return [a.astype(np.float32) for a in w]


def make_loss(s: DistillSettings, n_actions: int) -> Callable[[Any, Any], Any]:
    """The per-sample distillation loss, in units of the teacher's advantage spread."""
    from dqnc.keras import tf

    t = tf()
    aw, vw = t.constant(s.advantage_weight, t.float32), t.constant(s.value_weight, t.float32)
    tau_teacher = t.constant(s.temperature, t.float32)
    tau_student = t.constant(s.temperature * s.score_gain, t.float32)
    margin = t.constant(s.margin, t.float32)

    def loss(y_true: Any, y_pred: Any) -> Any:
        err = y_pred - y_true
        centered = err - t.reduce_mean(err, axis=1, keepdims=True)
        total = vw * t.reduce_mean(t.square(err), axis=1) + aw * t.reduce_mean(t.square(centered), axis=1)
        if s.distill_loss == "hinge":
            # The teacher's action must lead every other by ``margin``.
            best = t.argmax(y_true, axis=1, output_type=t.int32)
            lead = t.gather(y_pred, best, batch_dims=1)[:, None] - y_pred
            others = 1.0 - t.one_hot(best, n_actions)
            return total + t.reduce_sum(t.nn.relu(margin - lead) * others, axis=1) / max(1, n_actions - 1)
        # Policy distillation (Rusu et al. 2016): most states of a DQN are near-ties whose action a
        # Q-value regression gets wrong about as often as right; matching the teacher's action
        # distribution at a low temperature puts the student's decision boundary where the
        # teacher's is. The student's softer temperature scales its scores up by score_gain.
        target = t.nn.softmax(y_true / tau_teacher, axis=1)
        return total - t.reduce_sum(target * t.nn.log_softmax(y_pred / tau_student, axis=1), axis=1)

    return loss


class Trainer:
    """Minibatch distillation of ``model`` in compiled chunks of ``CHUNK`` steps.

    One optimizer and one compiled function serve every phase (first fit and DAgger rounds), so
    XLA compiles once; each phase sets its own cosine-decayed step sizes, passed in per step.
    TFMOT pruning wrappers advance their own ``pruning_step`` on each training call and update
    their masks on schedule, inside the compiled loop as in Keras ``fit``.
    """

    def __init__(self, model: Any, s: DistillSettings, n_actions: int, jit: bool = True) -> None:
        from dqnc.keras import keras, tf

        t = tf()
        self.model, self.s = model, s
        self.rng = np.random.default_rng([s.seed, 0xD157])
        self.opt = keras().optimizers.Adam(learning_rate=s.lr)
        loss_fn = make_loss(s, n_actions)
        variables = model.trainable_variables
        self._pruning_steps = [l.pruning_step for l in model.layers if hasattr(l, "pruning_step")]
        opt = self.opt

        @t.function(jit_compile=jit, reduce_retracing=True)
        def steps(xb: Any, yb: Any, lr: Any) -> Any:
            total = t.constant(0.0)
            k = t.shape(xb)[0]
            for i in t.range(k):
                opt.learning_rate.assign(lr[i])
                with t.GradientTape() as tape:
                    loss = t.reduce_mean(loss_fn(yb[i], model(xb[i], training=True)))
                grads = tape.gradient(loss, variables)
                opt.apply_gradients(zip(grads, variables))
                total += loss
            return total / t.cast(k, t.float32)

        self._steps = steps
        logdir = _LOGDIR.get()
        self._writer = t.summary.create_file_writer(str(logdir)) if logdir is not None else None
        self.step = 0  # minibatch steps run so far, over every phase: the scalars' x axis

    def scalar(self, name: str, value: float) -> None:
        """One TensorBoard scalar at the current step (nothing without a log folder)."""
        if self._writer is None:
            return
        from dqnc.keras import tf

        with self._writer.as_default(step=self.step):
            tf().summary.scalar(name, value)

    def fit(self, x: np.ndarray, y: np.ndarray, steps: int, lr_scale: float = 1.0) -> list[float]:
        """Run ``steps`` (rounded up to whole chunks) minibatch steps on ``(x, y)``; return each chunk's mean loss.

        Minibatches walk seeded permutations of the data (epochs), and the step size decays from
        ``lr * lr_scale`` to 1% of it on a cosine, so the last steps settle into a fine fit.
        """
        for v in self._pruning_steps:
            if int(v.numpy()) < 0:
                v.assign(0)  # what TFMOT's UpdatePruningStep callback does before the first batch
        calls = max(1, -(-steps // CHUNK))
        total = calls * CHUNK
        batch = min(self.s.batch_size, len(x))
        per_epoch = len(x) // batch
        epochs = -(-total // per_epoch)
        order = np.concatenate([self.rng.permutation(len(x))[: per_epoch * batch] for _ in range(epochs)])
        idx = order[: total * batch].reshape(calls, CHUNK, batch)
        base = self.s.lr * lr_scale
        lr = (base * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * np.arange(total) / total)))).astype(np.float32)
        losses = []
        for c in range(calls):
            losses.append(float(self._steps(x[idx[c]], y[idx[c]], lr[c * CHUNK:(c + 1) * CHUNK])))
            self.step += CHUNK
            self.scalar("distill/loss", losses[-1])
            progress.update((c + 1) * CHUNK, total, unit="steps", info=f"loss {losses[-1]:.4g}")
        if self._writer is not None:
            self._writer.flush()
        return losses


@dataclass
class DaggerResult:
    history: list[float]
    states: int
    steps: int


def dagger(trainer: Trainer, weights: Callable[[], list[np.ndarray]], activations: list[str], teacher_q: QFunction,
           norm: Normalizer, states: np.ndarray, q_t: np.ndarray, env: EnvSpec, s: DistillSettings,
           first_steps: int, rounds: int, round_steps: int | Callable[[int], int], extra_states: int,
           student_policy: Callable[[list[np.ndarray]], QFunction] | None = None) -> DaggerResult:
    """Distill on the teacher's states, then ``rounds`` times add ``extra_states`` states the
    student visits (labelled by the teacher) and distill again at a lower step size.

    ``round_steps`` is a step count, or a function of the round's number of states (epochs).
    ``weights()`` returns the student's current effective weights in normalized coordinates;
    ``student_policy`` runs raw weights (default: the numpy MLP with ``activations``).
    DAgger rollouts take their episodes from the "distill" seed block, after the teacher's.
    """
    progress.update(phase=f"distilling on {len(states):,} teacher states")
    trainer.scalar("distill/states", len(states))
    history = trainer.fit(norm.x(states), norm.q(q_t), first_steps)
    steps = -(-first_steps // CHUNK) * CHUNK
    base = episode_seed("distill", s.seed)
    for r in range(rounds):
        progress.update(phase=f"DAgger round {r + 1}/{rounds}: {extra_states:,} states the student visits")
        student_q = (student_policy or (lambda w: QNetSpec.from_weights(w, activations).numpy(w)))(norm.to_raw(weights()))
        visited = collect_states(student_q, env, extra_states, base + DAGGER_SEED_STRIDE * (r + 1), s.epsilon / 2)
        visited = visited.reshape(len(visited), *states.shape[1:])  # flat for MLPs, images for conv nets
        states = np.concatenate([states, visited])
        q_t = np.concatenate([q_t, teacher_q(visited)])
        n_steps = round_steps(len(states)) if callable(round_steps) else round_steps
        progress.update(phase=f"DAgger round {r + 1}/{rounds}: distilling on {len(states):,} states")
        trainer.scalar("distill/states", len(states))  # a step up per DAgger round
        trainer.scalar("distill/dagger_round", r + 1)
        history += trainer.fit(norm.x(states), norm.q(q_t), n_steps, lr_scale=0.3)
        steps += -(-n_steps // CHUNK) * CHUNK
    return DaggerResult(history, len(states), steps)


def teacher_states(teacher_q: QFunction, env: EnvSpec, n: int, s: DistillSettings) -> tuple[np.ndarray, np.ndarray]:
    """States of the teacher's epsilon-greedy rollouts and its Q-values there."""
    progress.update(phase=f"collecting {n:,} teacher states")
    states = collect_states(teacher_q, env, n, episode_seed("distill", s.seed), s.epsilon)
    # Dense students read images flattened (HWC order); every teacher runtime accepts that order too.
    states = states.reshape(len(states), -1)
    return states, np.asarray(teacher_q(states), np.float32)


def check_states(teacher_q: QFunction, env: EnvSpec, n: int, seed: int, epsilon: float) -> np.ndarray:
    """Held-out states for the fidelity check: episodes no distillation rollout replays."""
    progress.update(phase=f"checking on {n:,} held-out states")
    return collect_states(teacher_q, env, n, episode_seed("check", seed), epsilon)
