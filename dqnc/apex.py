"""Ape-X training on Ray (Horgan et al. 2018): ``actors`` Ray actors act, the driver learns.

Each actor steps its own vector env with the numpy Q-network (:mod:`dqnc.qnet.forward`) at its
own epsilon (the Ape-X ladder ``0.4 ** (1 + 7 i / (N - 1))``), turns its steps into n-step
transitions itself, computes their initial priorities (|TD error| under its copy of the network)
and sends them back in one batch per task. The learner, in the driver, adds each batch to the
prioritized replay, runs the compiled update at the single-process replay ratio (``gradient_steps``
updates per ``train_freq`` env steps) and publishes its weights through the object store; each
actor's next task takes the newest. Every actor has exactly one task in flight, each task a bounded
number of steps: nothing queues without bound. An actor that dies is started again with the same
index and its own block of training episode seeds, and the run goes on until it has the planned
env steps. Interrupted, the learner's checkpoint holds the replay and each actor's restart count.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dqnc.config import TrainConfig
from dqnc.envs import EnvSpec, make_env, trust
from dqnc.errors import DqncError, EnvError
from dqnc.qnet import QNetSpec
from dqnc.replay import NStep
from dqnc.raycluster import init_ray
from dqnc.seeds import PER_SEED, episode_seed

MAX_ACTORS = 64  # each actor's training episode seeds: its own slice of the run's training block
EPS_BASE, EPS_SPREAD = 0.4, 7.0
ACTOR_PREFIX = "dqnc-apex-"
MAX_DEATHS_IN_A_ROW = 3  # an actor that cannot start (a broken node) ends the run instead of looping


def actor_epsilon(index: int, n_actors: int) -> float:
    """The Ape-X ladder: actor 0 explores most (0.4), the last least (0.4 ** 8)."""
    return EPS_BASE ** (1.0 + EPS_SPREAD * index / (n_actors - 1)) if n_actors > 1 else EPS_BASE


def actor_seed(cfg: TrainConfig, index: int, restarts: int) -> int:
    """The first training episode seed of actor ``index``'s ``restarts``-th start: the run's training
    sub-block (single-process runs use its first slice) split in ``MAX_ACTORS + 1`` slices."""
    per_actor = PER_SEED // (MAX_ACTORS + 1)
    return episode_seed("train", cfg.seed) + (index + 1) * per_actor + restarts * cfg.num_envs


@dataclass
class Chunk:
    """One actor task's output: n-step transitions with initial priorities, and what it saw."""

    index: int
    obs: np.ndarray
    next_obs: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    terminated: np.ndarray
    discounts: np.ndarray
    priorities: np.ndarray
    steps: int
    episode_returns: list[float]


class Actor:
    """What runs in one Ray actor process (wrapped with ``ray.remote`` by :func:`learn`)."""

    def __init__(self, cfg: TrainConfig, spec: EnvSpec, net: QNetSpec, weights: list[np.ndarray], index: int,
                 n_actors: int, restarts: int) -> None:
        import gymnasium as gym
        from gymnasium.vector import AutoresetMode

        trust(cfg.env)  # the user named it in the driver
        self.cfg, self.spec, self.index = cfg, spec, index
        self.images = net.family == "conv"
        self.eps = actor_epsilon(index, n_actors)
        self.policy = net.numpy(weights)
        self.rng = np.random.default_rng([cfg.seed, index, restarts])
        self.envs = gym.vector.SyncVectorEnv([lambda: make_env(cfg.env, cfg.env_kwargs) for _ in range(cfg.num_envs)],
                                             autoreset_mode=AutoresetMode.SAME_STEP)
        obs, _ = self.envs.reset(seed=actor_seed(cfg, index, restarts))
        self.obs = self.batch(obs)
        self.ep_return = np.zeros(cfg.num_envs)
        self.nstep = NStep(cfg.n_step, cfg.gamma)

    def node_id(self) -> str:
        """The Ray node this actor runs on (hex id): where a multi-node cluster placed it."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def batch(self, o: Any, n: int | None = None) -> np.ndarray:
        """Observations as the learner's replay stores them: images in their dtype, vectors flat float32."""
        n = self.cfg.num_envs if n is None else n
        return np.asarray(o).reshape(n, *self.spec.obs_shape) if self.images else np.asarray(o, np.float32).reshape(n, -1)

    def run(self, weights: list[np.ndarray], steps: int) -> Chunk:
        """``steps`` steps of every env with ``weights``; the transitions completed meanwhile."""
        self.policy.set_weights(weights)
        n, out, finished = self.cfg.num_envs, [], []
        for _ in range(steps):
            actions = self.policy(self.obs).argmax(axis=1)
            explore = self.rng.random(n) < self.eps
            actions = np.where(explore, self.rng.integers(0, self.spec.n_actions, n), actions)
            next_obs, rewards, terminated, truncated, info = self.envs.step(actions)
            next_obs = self.batch(next_obs)
            real_next = next_obs.copy()
            for i in np.flatnonzero(terminated | truncated):
                real_next[i] = self.batch(info["final_obs"][i], 1)[0]
                finished.append(float(self.ep_return[i] + rewards[i]))
            out += self.nstep.push(self.obs, actions, rewards, real_next, terminated, truncated)
            self.ep_return = np.where(terminated | truncated, 0.0, self.ep_return + rewards)
            self.obs = next_obs
        return self.chunk(out, steps * n, finished)

    def chunk(self, out: list[tuple], steps: int, finished: list[float]) -> Chunk:
        if not out:
            empty = np.zeros((0, *self.obs.shape[1:]), self.obs.dtype)
            return Chunk(self.index, empty, empty, np.zeros(0, np.int32), *(np.zeros(0, np.float32),) * 4, steps,
                         finished)
        obs, nxt, act, ret, term, disc = (np.asarray(c) for c in zip(*out))
        act = act.astype(np.int32)
        ret, term, disc = ret.astype(np.float32), term.astype(np.float32), disc.astype(np.float32)
        # Initial priorities: |TD error| under this actor's network (Ape-X: no target copy here).
        q, q_next = self.policy(obs.astype(np.float32)), self.policy(nxt.astype(np.float32))
        td = ret + disc * (1.0 - term) * q_next.max(axis=1) - q[np.arange(len(act)), act]
        return Chunk(self.index, obs, nxt, act, ret, term, disc, np.abs(td).astype(np.float32), steps, finished)


@dataclass
class Fleet:
    """The actors, their restart counts and the one task each has in flight."""

    remote: Any
    loop: Any
    actors: dict[int, Any]
    restarts: list[int]
    tasks: dict[Any, int]
    run_id: str
    deaths: dict[int, int] = field(default_factory=dict)  # in a row, without a task delivered between

    def died(self, i: int, e: Exception) -> None:
        self.deaths[i] = self.deaths.get(i, 0) + 1
        if self.deaths[i] > MAX_DEATHS_IN_A_ROW:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EnvError(f"Ape-X actor {i} died {self.deaths[i]} times in a row without delivering a step ({first}); "
                           "check the env and the Ray nodes (dqnc must be installed on each)")
        self.restarts[i] += 1

    def start(self, i: int, weights_ref: Any) -> None:
        cfg, net = self.loop.cfg, self.loop.net_spec()
        # Named (dqnc-apex-<index>-<run>) so that an operator, or a test, can find and kill one.
        self.actors[i] = self.remote.options(name=f"{ACTOR_PREFIX}{i}-{self.run_id}-{self.restarts[i]}").remote(
            cfg, self.loop.spec, net, weights_ref, i, cfg.actors, self.restarts[i])

    def submit(self, i: int, weights_ref: Any, steps: int) -> None:
        self.tasks[self.actors[i].run.remote(weights_ref, steps)] = i

    def stop(self) -> None:
        import ray

        for a in self.actors.values():
            ray.kill(a, no_restart=True)


def learn(loop: Any, address: str | None, train_step: Callable[..., None], evaluate: Callable[..., None],
          report: Callable[[int, float], None]) -> None:
    """Run ``loop`` (train's loop state: config, replay, update, counters) with ``loop.cfg.actors``
    Ray actors acting. ``train_step``, ``evaluate`` and ``report`` (progress after a step count) are
    the single-process loop's own. KeyboardInterrupt propagates with ``loop.state`` consistent, so
    the caller can checkpoint."""
    import ray

    cfg, state = loop.cfg, loop.state
    owns = init_ray(address)
    started = time.perf_counter() - state.wall_time  # train_seconds: the actors' start counts, Ray's own not
    restarts = list(state.actor_restarts) + [0] * (cfg.actors - len(state.actor_restarts))
    fleet = Fleet(ray.remote(num_cpus=1, max_restarts=0)(Actor), loop, {}, restarts, {}, uuid.uuid4().hex[:8])
    policy = loop.net_spec().numpy(loop.weights())
    steps = max(1, min(cfg.train_freq, 400) // cfg.num_envs)  # per env and task: Ape-X actors sync every ~400 steps
    try:
        weights_ref = ray.put(loop.weights())
        for i in range(cfg.actors):
            if state.step:  # a resumed run's actors start new episodes, from their next seeds
                fleet.restarts[i] += 1
            fleet.start(i, weights_ref)
            fleet.submit(i, weights_ref, steps)
        state.actor_restarts = list(fleet.restarts)
        while state.step < cfg.total_steps and not state.stopped_early:
            (ref,), _ = ray.wait(list(fleet.tasks), num_returns=1)
            i = fleet.tasks.pop(ref)
            try:
                chunk = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the actor's own code raised: an env error, a bug
                raise e.cause if isinstance(e.cause, DqncError) else e from None
            except ray.exceptions.RayActorError as e:
                fleet.died(i, e)  # the same index, its next seeds; the lost task's steps are not counted
                state.actor_restarts = list(fleet.restarts)
                fleet.start(i, weights_ref)
                fleet.submit(i, weights_ref, steps)
                continue
            fleet.deaths[i] = 0
            if state.step + chunk.steps < cfg.total_steps:
                fleet.submit(i, weights_ref, steps)  # act on while the learner learns
            if _absorb(loop, chunk, policy, train_step, evaluate, report):
                weights_ref = ray.put(loop.weights())
        if not state.evals or state.evals[-1][0] != state.step:
            evaluate(loop, policy, _summaries(loop))
    finally:
        state.wall_time = time.perf_counter() - started
        fleet.stop()
        if owns:
            ray.shutdown()


def _summaries(loop: Any) -> Any:
    from dqnc.keras import tf

    return tf() if loop.writer is not None else None


def _absorb(loop: Any, chunk: Chunk, policy: Any, train_step: Callable[..., None], evaluate: Callable[..., None],
            report: Callable[[int, float], None]) -> bool:
    """Store one chunk; train and evaluate as its env steps make due (the single-process cadence).
    True when the learner trained (its weights changed)."""
    cfg, state = loop.cfg, loop.state
    if len(chunk.actions):
        loop.buffer.put_transitions(chunk.obs, chunk.next_obs, chunk.actions, chunk.returns, chunk.terminated,
                                    chunk.discounts, chunk.priorities)
    for r in chunk.episode_returns:
        state.episodes += 1
        state.recent_returns = (state.recent_returns + [r])[-100:]
    prev = state.step
    state.step += chunk.steps
    t = _summaries(loop)
    eps = actor_epsilon(chunk.index, cfg.actors)
    trained = False
    if state.step >= cfg.learning_starts and len(loop.buffer):
        for _ in range(state.step // cfg.train_freq - prev // cfg.train_freq):
            train_step(loop, policy, loop.net_spec().family == "conv", eps, t)
            trained = True
    if state.step // cfg.eval_freq > prev // cfg.eval_freq and state.step >= cfg.learning_starts:
        evaluate(loop, policy, t)
    report(prev, eps)
    return trained
