"""The train stage: gymnasium env -> fp32 SavedModel artifact (Double DQN).

Hot paths never call Keras per env step: actions come from a numpy copy of the online network
(refreshed after every training call), and each training call runs ``gradient_steps`` minibatch
updates inside one ``tf.function``: XLA-compiled for MLPs and for conv nets on small images
(convolutions as im2col matmuls), TF's own kernels for large images.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc.config import TrainConfig
from dqnc.envs import EnvSpec, env_spec, make_env, rollout
from dqnc.errors import Interrupted, UsageError
from dqnc.qnet import QNetSpec
from dqnc.qnet.keras_build import im2col_pays, use_im2col
from dqnc.qnet.weights import effective_weights
from dqnc import replay as rp
from dqnc.replay import Replay, ReplayBuffer
from dqnc.schedules import linear
from dqnc.seeds import episode_seed

CHECKPOINT_VERSION = 2


@dataclass
class Progress:
    step: int
    total: int
    episodes: int = 0
    last_return: float | None = None
    eval_mean: float | None = None
    best_mean: float | None = None
    epsilon: float = 1.0


ProgressFn = Callable[[Progress], None]


@dataclass
class _State:
    """Counters that a checkpoint must carry besides the networks and the buffer."""

    step: int = 0
    grad_steps: int = 0
    episodes: int = 0
    best_mean: float | None = None
    best_step: int | None = None
    best_score: float | None = None
    evals: list[list[float]] = field(default_factory=list)
    confirms: list[list[float]] = field(default_factory=list)
    resets: int = 0
    recent_returns: list[float] = field(default_factory=list)
    wall_time: float = 0.0
    stopped_early: bool = False
    actor_restarts: list[int] = field(default_factory=list)  # Ape-X: each actor's starts so far (its seeds)


def _set_seeds(seed: int) -> None:
    from dqnc.keras import keras, tf

    keras().utils.set_random_seed(seed)
    tf().config.experimental.enable_op_determinism()


def _make_update_fn(q: Any, target: Any, optimizer: Any, cfg: TrainConfig, jit: bool = True) -> Callable[..., Any]:
    """One compiled call = ``K`` Double-DQN minibatch updates plus the target updates they trigger.

    ``jit=False`` for models holding ops XLA cannot compile (e.g. TFMOT's pruning wrappers).
    Observations may come as bool/uint8 (the replay buffer's own dtype): they are cast inside.
    ``discounts`` (``[K, B]``, n-step returns) replace ``gamma``. With importance ``weights``
    (``[K, B]``, prioritized replay) each loss is weighted and the call returns ``(loss, td)``, the
    per-sample TD errors ``[K, B]`` that set the new priorities; without, the mean loss alone.
    """
    from dqnc.keras import tf

    t = tf()
    gamma = t.constant(cfg.gamma, t.float32)
    tau = t.constant(cfg.tau, t.float32)
    interval = t.constant(cfg.target_update_interval, t.int64)
    counter = t.Variable(0, dtype=t.int64, trainable=False, name="grad_steps")
    qv, tv = q.trainable_variables, target.trainable_variables

    def huber(x: Any) -> Any:
        ax = t.abs(x)
        return t.where(ax < 1.0, 0.5 * t.square(x), ax - 0.5)

    @t.function(jit_compile=jit, reduce_retracing=True)
    def update(obs: Any, actions: Any, rewards: Any, next_obs: Any, terminated: Any, discounts: Any = None,
               weights: Any = None) -> Any:
        total = t.constant(0.0)
        obs, next_obs = t.cast(obs, t.float32), t.cast(next_obs, t.float32)
        k = t.shape(obs)[0]
        tds = t.TensorArray(t.float32, size=k)
        for i in t.range(k):
            q_next_target = target(next_obs[i], training=False)
            if cfg.double_dqn:
                a_next = t.argmax(q(next_obs[i], training=False), axis=1, output_type=t.int32)
            else:
                a_next = t.argmax(q_next_target, axis=1, output_type=t.int32)
            bootstrap = t.gather(q_next_target, a_next, batch_dims=1)
            discount = gamma if discounts is None else discounts[i]
            y = t.stop_gradient(rewards[i] + discount * (1.0 - terminated[i]) * bootstrap)
            with t.GradientTape() as tape:
                q_taken = t.gather(q(obs[i], training=True), actions[i], batch_dims=1)
                td = y - q_taken
                loss = t.reduce_mean(huber(td) if weights is None else weights[i] * huber(td))
            tds = tds.write(i, t.stop_gradient(td))
            grads = tape.gradient(loss, qv)
            grads, _ = t.clip_by_global_norm(grads, cfg.max_grad_norm)
            optimizer.apply_gradients(zip(grads, qv))
            counter.assign_add(1)
            if counter % interval == 0:
                for tw, w in zip(tv, qv):
                    tw.assign(tau * w + (1.0 - tau) * tw)
            total += loss
        mean = total / t.cast(k, t.float32)
        return mean if weights is None else (mean, tds.stack())

    update.counter = counter  # type: ignore[attr-defined]
    return update


@dataclass
class _Loop:
    """The env-step loop shared by training and RL fine-tuning (see :func:`_run_loop`)."""

    cfg: TrainConfig
    spec: EnvSpec
    update: Callable[..., Any]
    weights: Callable[[], list[np.ndarray]]
    activations: list[str]
    rng: np.random.Generator
    buffer: Replay | ReplayBuffer  # a bare ReplayBuffer only stores (tests drive the env loop with one)
    state: _State
    best_weights: list[np.ndarray] | None = None
    writer: Any = None
    progress: ProgressFn | None = None
    random_warmup: bool = True
    # The network acted with (numpy forward); None: the MLP that ``weights()`` and ``activations`` describe.
    net: QNetSpec | None = None

    def net_spec(self) -> QNetSpec:
        return self.net if self.net is not None else QNetSpec.from_weights(self.weights(), self.activations)


def _evaluate(loop: _Loop, policy: Any, t: Any) -> None:
    """Evaluate ``policy``; a candidate for the kept weights is confirmed on more episodes."""
    cfg, spec, state, writer = loop.cfg, loop.spec, loop.state, loop.writer
    res = rollout(policy, spec, cfg.eval_episodes, episode_seed("train_eval", cfg.seed))
    mean, worst = float(res.returns.mean()), float(res.returns.min())
    state.evals.append([state.step, mean, float(res.returns.std()), worst])
    if writer is not None:
        with writer.as_default(step=state.step):
            t.summary.scalar("eval/mean_return", mean)
    state.best_mean = mean if state.best_mean is None else max(state.best_mean, mean)
    # A candidate must beat the best *confirmed* score, not the best raw evaluation: one lucky
    # 20-episode evaluation otherwise blocks every later checkpoint from being considered
    # (measured: MinAtar Breakout kept step 300k, 15.5 raw / 13.6 confirmed, while later raw
    # evaluations of 14.7-15.3 were never confirmed; held-out 9.5).
    if state.best_score is not None and mean < state.best_score:
        return
    returns = res.returns
    if cfg.confirm_episodes > 0:
        # A candidate for the kept weights is judged on more episodes than the ones that made
        # it a candidate: a checkpoint that is lucky on 20 episodes is often brittle on new ones.
        conf = rollout(policy, spec, cfg.confirm_episodes, episode_seed("train_confirm", cfg.seed))
        state.confirms.append([state.step, float(conf.returns.mean()), float(conf.returns.min())])
        returns = np.concatenate([res.returns, conf.returns])
    score = float(returns.mean())
    if state.best_score is None or score >= state.best_score:
        state.best_score, state.best_step = score, state.step
        loop.best_weights = [w.copy() for w in loop.weights()]
    # Stop only when every episode of the evaluation and of its confirmation is solved: a mean
    # over few episodes overstates how well a policy generalizes to new starting states.
    threshold = spec.reward_threshold
    if cfg.early_stop and threshold is not None and float(returns.min()) >= threshold:
        state.stopped_early = True


@dataclass
class _Envs:
    """The vector env and the episode bookkeeping of one :func:`_run_loop` call."""

    envs: Any
    obs: np.ndarray
    ep_return: np.ndarray
    images: bool  # conv nets keep image observations as the env gives them (bool/uint8)

    def as_batch(self, o: np.ndarray, spec: EnvSpec) -> np.ndarray:
        # Images stay bool/uint8 for the replay buffer; the policy casts its own copy.
        n = len(self.ep_return)
        return o.reshape(n, *spec.obs_shape) if self.images else o.reshape(n, -1).astype(np.float32)

    def as_one(self, o: Any, spec: EnvSpec) -> np.ndarray:
        return np.asarray(o).reshape(spec.obs_shape) if self.images else np.asarray(o, np.float32).ravel()


def _open_envs(loop: _Loop, images: bool) -> _Envs:
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    cfg, n = loop.cfg, loop.cfg.num_envs
    envs = gym.vector.SyncVectorEnv(
        [lambda: make_env(cfg.env, cfg.env_kwargs) for _ in range(n)],
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    # A resumed run cannot restore simulator state; it starts new episodes from the next seed of
    # its own range (training episodes never share seeds with evaluation or other stages).
    obs, _ = envs.reset(seed=episode_seed("train", cfg.seed) + loop.state.resets * n)
    loop.state.resets += 1
    loop.buffer.end_episodes()
    run = _Envs(envs, obs, np.zeros(n), images)
    run.obs = run.as_batch(obs, loop.spec)
    return run


def _env_step(loop: _Loop, run: _Envs, policy: Any, eps: float, t: Any) -> None:
    """Act in every env (epsilon-greedy), store the transitions, count finished episodes."""
    cfg, spec, state, rng, n = loop.cfg, loop.spec, loop.state, loop.rng, loop.cfg.num_envs
    if loop.random_warmup and state.step < cfg.learning_starts:
        actions = rng.integers(0, spec.n_actions, n)
    else:
        actions = policy(run.obs).argmax(axis=1)
        explore = rng.random(n) < eps
        if explore.any():
            actions = np.where(explore, rng.integers(0, spec.n_actions, n), actions)
    next_obs, rewards, terminated, truncated, info = run.envs.step(actions)
    next_obs = run.as_batch(next_obs, spec)
    done = terminated | truncated
    real_next = next_obs
    if done.any():
        real_next = next_obs.copy()
        final = info["final_obs"]
        for i in np.arange(n)[done]:
            real_next[i] = run.as_one(final[i], spec)
    loop.buffer.add(run.obs, actions, rewards, real_next, terminated, truncated)
    run.ep_return += rewards
    if done.any():
        for i in np.arange(n)[done]:
            state.episodes += 1
            state.recent_returns = (state.recent_returns + [float(run.ep_return[i])])[-100:]
            if loop.writer is not None:
                with loop.writer.as_default(step=state.step):
                    t.summary.scalar("train/episode_return", run.ep_return[i])
        run.ep_return[done] = 0.0
    run.obs = next_obs


def _train_step(loop: _Loop, policy: Any, images: bool, eps: float, t: Any) -> None:
    cfg, state = loop.cfg, loop.state
    assert isinstance(loop.buffer, Replay)
    beta = linear(cfg.per_beta_start, 1.0, 1.0, cfg.total_steps, state.step)
    b = loop.buffer.sample(loop.rng, cfg.gradient_steps, cfg.batch_size, as_float=not images, beta=beta)
    if b.weights is None:
        loss = float(loop.update(b.obs, b.actions, b.rewards, b.next_obs, b.terminated, b.discounts))
    else:
        mean, td = loop.update(b.obs, b.actions, b.rewards, b.next_obs, b.terminated, b.discounts, b.weights)
        loss = float(mean)
        loop.buffer.update_priorities(b.slots, td.numpy())
    state.grad_steps += cfg.gradient_steps
    policy.set_weights(loop.weights())
    if loop.writer is not None:
        with loop.writer.as_default(step=state.step):
            t.summary.scalar("train/loss", loss)
            t.summary.scalar("train/epsilon", eps)


def _run_loop(loop: _Loop) -> None:
    """Step the envs, store transitions, train every ``train_freq`` steps, evaluate every
    ``eval_freq`` steps keeping the best weights. KeyboardInterrupt propagates with ``loop.state``
    consistent, so the caller can checkpoint."""
    from dqnc.keras import tf

    cfg, state, writer = loop.cfg, loop.state, loop.writer
    t = tf() if writer is not None else None
    net = loop.net_spec()
    policy = net.numpy(loop.weights())
    images = net.family == "conv"
    run = _open_envs(loop, images)
    started = time.perf_counter() - state.wall_time
    try:
        while state.step < cfg.total_steps and not state.stopped_early:
            eps = linear(cfg.eps_start, cfg.eps_end, cfg.eps_fraction, cfg.total_steps, state.step)
            _env_step(loop, run, policy, eps, t)
            prev = state.step
            state.step += cfg.num_envs
            if state.step >= cfg.learning_starts and state.step // cfg.train_freq > prev // cfg.train_freq:
                _train_step(loop, policy, images, eps, t)
            if state.step // cfg.eval_freq > prev // cfg.eval_freq and state.step >= cfg.learning_starts:
                _evaluate(loop, policy, t)
            _report(loop, prev, eps)
        if not state.evals or state.evals[-1][0] != state.step:
            _evaluate(loop, policy, t)
    finally:
        state.wall_time = time.perf_counter() - started
        run.envs.close()
        if writer is not None:
            writer.flush()


def _report(loop: _Loop, prev: int, eps: float) -> None:
    """Progress, every 500 env steps (``prev``: the step count before the last ones)."""
    state = loop.state
    if loop.progress is not None and (state.step // 500 > prev // 500 or state.stopped_early):
        loop.progress(Progress(state.step, loop.cfg.total_steps, state.episodes,
                               state.recent_returns[-1] if state.recent_returns else None,
                               state.evals[-1][1] if state.evals else None, state.best_score, eps))


def run(
    cfg: TrainConfig,
    out: Path,
    *,
    force: bool = False,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    logdir: Path | None = None,
    progress: ProgressFn | None = None,
    command: list[str] | None = None,
    address: str | None = None,
) -> art.Artifact:
    """Train a Q-network on ``cfg.env`` and write it as a SavedModel artifact at ``out``. With
    ``cfg.actors`` the envs are stepped by Ape-X actors on Ray (:mod:`dqnc.apex`), on the cluster
    at ``address`` (or RAY_ADDRESS; default: a local Ray)."""
    out = Path(out)
    art.check_output(out, force)
    if checkpoint_dir is not None:
        check_checkpoint_dir(Path(checkpoint_dir))
    if resume and (checkpoint_dir is None or not (checkpoint_dir / "state.json").is_file()):
        raise UsageError(f"--resume: no checkpoint at {str(checkpoint_dir)!r}; run without --resume to start afresh")
    spec = env_spec(cfg.env, cfg.env_kwargs)

    from dqnc.keras import keras, tf

    k, t = keras(), tf()
    _set_seeds(cfg.seed)
    net = QNetSpec.for_env(spec, cfg.conv, cfg.hidden, cfg.activation, cfg.dueling)
    q, target = net.build_trainable("q_network"), net.build_trainable("target_network")
    buffer = rp.build(cfg, spec, images=net.family == "conv")
    target.set_weights(q.get_weights())
    optimizer = k.optimizers.Adam(learning_rate=cfg.lr)
    # Conv nets on small images (MinAtar's) train under XLA with im2col convolutions; large images
    # (Atari's) with TF's own conv kernels outside XLA (keras_build.IM2COL_MAX_SIDE).
    fast_conv = im2col_pays(net)
    if fast_conv:
        for model in (q, target):
            use_im2col(model)
    update = _make_update_fn(q, target, optimizer, cfg, jit=net.family == "mlp" or fast_conv)
    rng = np.random.default_rng(cfg.seed)
    state = _State()
    best_weights: list[np.ndarray] | None = None
    if resume:
        assert checkpoint_dir is not None
        state, best_weights = _load_checkpoint(checkpoint_dir, cfg, q, target, optimizer, update, rng, buffer)

    loop = _Loop(cfg, spec, update, lambda: effective_weights(q), list(net.activations), rng, buffer,
                 state, best_weights, t.summary.create_file_writer(str(logdir)) if logdir is not None else None,
                 progress, net=net)
    try:
        if cfg.actors:
            from dqnc import apex

            apex.learn(loop, address, _train_step, _evaluate, lambda prev, eps: _report(loop, prev, eps))
        else:
            _run_loop(loop)
    except KeyboardInterrupt:
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, cfg, state, q, target, optimizer, update, buffer, rng, loop.best_weights)
            raise Interrupted(
                f"interrupted at step {state.step:,}/{cfg.total_steps:,}; checkpoint saved to {str(checkpoint_dir)!r}: "
                "re-run the same command with --resume to continue"
            ) from None
        raise Interrupted(f"interrupted at step {state.step:,}/{cfg.total_steps:,}; nothing was written") from None

    weights = loop.best_weights if loop.best_weights is not None else effective_weights(q)
    _write(out, force, cfg, spec, net, weights, loop.state, command)
    if checkpoint_dir is not None and checkpoint_dir.exists() and art.foreign_checkpoint_entry(checkpoint_dir) is None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return art.load(out)


def _write(out: Path, force: bool, cfg: TrainConfig, spec: EnvSpec, net: QNetSpec, weights: list[np.ndarray],
           state: _State, command: list[str] | None) -> None:
    """The artifact: the plain (dueling-folded) SavedModel, its numpy sidecar and the manifest."""
    model = net.build_plain(weights)
    metrics = {
        "env_steps": state.step,
        "gradient_steps": state.grad_steps,
        "episodes": state.episodes,
        "train_seconds": round(state.wall_time, 3),
        "steps_per_second": round(state.step / max(state.wall_time, 1e-9), 1),
        "stopped_early": state.stopped_early,
        "best_eval_mean_return": state.best_mean,
        "best_score": state.best_score,
        "best_eval_step": state.best_step,
        "eval_episodes": cfg.eval_episodes,
        "confirm_episodes": cfg.confirm_episodes,
        "evals": state.evals,
        "confirms": state.confirms,
        "mean_return_last_100_train_episodes": float(np.mean(state.recent_returns)) if state.recent_returns else None,
    }
    if cfg.actors:
        metrics["actor_starts"] = [r + 1 for r in state.actor_restarts]  # 1 each: no actor died, none resumed
    with art.atomic_output(out, force) as tmp:
        model.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        net.save_sidecar(tmp, weights)
        art.write_manifest(tmp, stage="train", env=spec, network=net.to_network(),
                           config=cfg.model_dump(mode="json"), metrics=metrics, command=command)


def rl_finetune(student: Any, cfg: TrainConfig, weights: Callable[[], list[np.ndarray]],
                activations: list[str], progress: ProgressFn | None = None) -> list[float]:
    """Continue Double-DQN training of an existing (e.g. pruning-wrapped) model for
    ``cfg.total_steps`` env steps, acting with it from the first step. Returns eval means."""
    from dqnc.keras import keras

    k = keras()
    spec = env_spec(cfg.env, cfg.env_kwargs)
    target = k.models.clone_model(student)
    target.set_weights(student.get_weights())
    optimizer = k.optimizers.Adam(learning_rate=cfg.lr)
    update = _make_update_fn(student, target, optimizer, cfg, jit=False)
    loop = _Loop(cfg, spec, update, weights, activations, np.random.default_rng(cfg.seed),
                 rp.build(cfg, spec, images=False), _State(), progress=progress, random_warmup=False)
    _run_loop(loop)
    return [e[1] for e in loop.state.evals]


# --- checkpoints -----------------------------------------------------------------------------

def check_checkpoint_dir(path: Path) -> None:
    """Refuse a checkpoint path that holds anything dqnc's checkpoint writer did not make: it is
    replaced on Ctrl-C and deleted when training finishes."""
    if not (path.exists() or path.is_symlink()):
        return
    foreign = art.foreign_checkpoint_entry(path)
    if foreign is not None:
        raise UsageError(f"checkpoint folder {str(path)!r} holds {str(foreign)!r}, which dqnc did not write: "
                         "move it away or choose another output path (the checkpoint goes next to the output)")


def _save_checkpoint(path: Path, cfg: TrainConfig, state: _State, q: Any, target: Any, optimizer: Any,
                     update: Any, buffer: Replay, rng: np.random.Generator,
                     best_weights: list[np.ndarray] | None) -> None:
    """Write a resumable checkpoint atomically (a second Ctrl-C while writing loses only the new one)."""
    from dqnc.keras import tf

    t = tf()
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # An interrupt before the first update leaves the optimizer unbuilt; its slots must be in the
    # checkpoint all the same, or the resume (which builds them) cannot match it.
    optimizer.build(q.trainable_variables)
    ckpt = t.train.Checkpoint(q=q, target=target, optimizer=optimizer, counter=update.counter)
    ckpt.write(str(tmp / "tf" / "ckpt"))
    buffer.save(tmp / "buffer.npz")
    if best_weights is not None:
        np.savez(tmp / "best.npz", *best_weights)
    meta = {
        "version": CHECKPOINT_VERSION,
        "config": cfg.model_dump(mode="json"),
        "state": state.__dict__,
        "rng": rng.bit_generator.state,
    }
    (tmp / "state.json").write_text(json.dumps(meta, default=int), encoding="utf-8")
    if path.exists() or path.is_symlink():
        check_checkpoint_dir(path)
        shutil.rmtree(path)
    tmp.rename(path)


def checkpoint_mismatch(path: Path, cfg: TrainConfig) -> str | None:
    """Why the checkpoint at ``path`` cannot continue a run of ``cfg`` (None if it can)."""
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its state.json is unreadable"
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        return "it was written by another dqnc version"
    saved = dict(meta.get("config") or {})
    current = cfg.model_dump(mode="json")
    # An option added since the checkpoint was written ran at its default.
    defaults = {k: f.default for k, f in TrainConfig.model_fields.items() if not f.is_required()}
    changed = sorted(k for k in current if k != "total_steps" and saved.get(k, defaults.get(k)) != current[k])
    if changed:
        return f"it was made with different options ({', '.join(changed)})"
    return None


def _load_checkpoint(path: Path, cfg: TrainConfig, q: Any, target: Any, optimizer: Any, update: Any,
                     rng: np.random.Generator, buffer: Replay) -> tuple[_State, list[np.ndarray] | None]:
    """Restore the networks, optimizer, counters, rng and the whole replay (storage, priorities,
    n-step queues) of an interrupted run."""
    from dqnc.keras import tf

    t = tf()
    stale = checkpoint_mismatch(path, cfg)
    if stale:
        raise UsageError(f"--resume: the checkpoint at {str(path)!r} cannot continue this run: {stale}; "
                         "resume with the same options, or start afresh without --resume")
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    # The optimizer's slot variables must exist before a restore can fill them.
    optimizer.build(q.trainable_variables)
    ckpt = t.train.Checkpoint(q=q, target=target, optimizer=optimizer, counter=update.counter)
    ckpt.read(str(path / "tf" / "ckpt")).assert_existing_objects_matched()
    buffer.restore(path / "buffer.npz")
    best = None
    if (path / "best.npz").is_file():
        with np.load(path / "best.npz") as d:
            best = [d[f"arr_{i}"] for i in range(len(d.files))]
    rng.bit_generator.state = meta["rng"]
    state = _State(**meta["state"])
    return state, best
