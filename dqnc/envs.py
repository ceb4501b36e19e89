"""Gymnasium environments: creation from ids, the spec dqnc records, and batched rollouts.

Rollouts step many environments at once and call the policy once per time step on the whole
batch, so a Keras policy costs one call per step of the longest episode, not one per action.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dqnc.errors import EnvError

QFunction = Callable[[np.ndarray], np.ndarray]

# Readable names of the discrete actions, where the env documents them.
ACTION_MEANINGS: dict[str, list[str]] = {
    "CartPole-v1": ["push cart left", "push cart right"],
    "Acrobot-v1": ["torque -1", "torque 0", "torque +1"],
    "MountainCar-v0": ["accelerate left", "don't accelerate", "accelerate right"],
    "LunarLander-v3": ["do nothing", "fire left engine", "fire main engine", "fire right engine"],
}
# MinAtar's v1 ids use each game's minimal action set (n, l, u, r, d, f = no-op, left, up, right, down, fire).
_MINATAR_ACTIONS = {"Asterix": "nlurd", "Breakout": "nlr", "Freeway": "nud", "Seaquest": "nlurdf",
                    "SpaceInvaders": "nlrf"}
_MINATAR_WORDS = {"n": "no-op", "l": "left", "u": "up", "r": "right", "d": "down", "f": "fire"}
ACTION_MEANINGS.update({f"MinAtar/{game}-v1": [_MINATAR_WORDS[c] for c in codes]
                        for game, codes in _MINATAR_ACTIONS.items()})

# Names of the observation features, where the env documents them.
OBS_NAMES: dict[str, list[str]] = {
    "CartPole-v1": ["cart position", "cart velocity", "pole angle", "pole angular velocity"],
    "Acrobot-v1": ["cos(theta1)", "sin(theta1)", "cos(theta2)", "sin(theta2)", "theta1 velocity", "theta2 velocity"],
    "MountainCar-v0": ["position", "velocity"],
    "LunarLander-v3": ["x", "y", "x velocity", "y velocity", "angle", "angular velocity", "left leg contact",
                       "right leg contact"],
}


@dataclass(frozen=True)
class EnvSpec:
    """What an artifact records about its environment."""

    id: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    obs_shape: tuple[int, ...] = ()
    obs_dtype: str = "float32"
    obs_low: list[float] = field(default_factory=list)
    obs_high: list[float] = field(default_factory=list)
    n_actions: int = 0
    action_meanings: list[str] | None = None
    obs_names: list[str] | None = None
    reward_threshold: float | None = None
    max_episode_steps: int | None = None
    # "flat" (vectors; any other shape is flattened for MLPs), "HWC" or "CHW" (3-D images).
    obs_layout: str = "flat"

    @property
    def obs_dim(self) -> int:
        return int(np.prod(self.obs_shape))

    @property
    def is_image(self) -> bool:
        return self.obs_layout in ("HWC", "CHW")

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The shape of one observation as rollouts feed it to a policy: images keep theirs."""
        return self.obs_shape if self.obs_layout == "HWC" else (self.obs_dim,)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["obs_shape"] = list(self.obs_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnvSpec:
        d = dict(d)
        d["obs_shape"] = tuple(d.get("obs_shape", ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _finite(values: np.ndarray) -> list[float]:
    # JSON has no infinity: unbounded dimensions are recorded as +-3.4e38 (float32 max).
    return [float(np.clip(v, -3.4e38, 3.4e38)) for v in np.asarray(values, np.float64).ravel()]


def register_on_demand(env_id: str) -> None:
    """Register the MinAtar ids (``MinAtar/Breakout-v1`` ...) the first time one is asked for."""
    import gymnasium as gym

    if not str(env_id).startswith("MinAtar/") or env_id in gym.registry:
        return
    try:
        import minatar.gym
    except ModuleNotFoundError:
        raise EnvError(f"cannot make env {env_id!r}: the 'minatar' package is not installed; "
                       "pip install 'dqnc[pixels]' (or minatar)") from None
    minatar.gym.register_envs()


def image_layout(shape: tuple[int, ...]) -> str:
    """'HWC' or 'CHW' for a 3-D observation shape (channels are the short axis), else 'flat'."""
    if len(shape) != 3:
        return "flat"
    return "CHW" if shape[0] < shape[-1] else "HWC"


def make_env(env_id: str, kwargs: dict[str, Any] | None = None, render_mode: str | None = None) -> Any:
    """Make one env from a registered id or a ``module:Env-v0`` id, with a clear error."""
    import gymnasium as gym

    register_on_demand(env_id)
    kwargs = dict(kwargs or {})
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        return gym.make(env_id, disable_env_checker=True, **kwargs)
    except gym.error.Error as e:
        raise EnvError(f"cannot make env {env_id!r}: {e}{_suggest_env(env_id)}") from e
    except ModuleNotFoundError as e:
        raise EnvError(
            f"cannot make env {env_id!r}: module {e.name!r} is not installed; install it or fix the "
            "'module:Env-v0' id"
        ) from e
    except TypeError as e:
        raise EnvError(f"cannot make env {env_id!r} with kwargs {kwargs}: {e}; fix env_kwargs") from e


def _suggest_env(env_id: str) -> str:
    import gymnasium as gym

    close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=1)
    return f" (did you mean {close[0]!r}?)" if close and close[0] not in str(env_id) else ""


def env_spec(env_id: str, kwargs: dict[str, Any] | None = None) -> EnvSpec:
    """Make the env once and record its spaces; reject spaces a Q-network cannot serve."""
    import gymnasium as gym

    env = make_env(env_id, kwargs)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, gym.spaces.Box):
            raise EnvError(
                f"env {env_id!r} has a {type(obs_space).__name__} observation space; dqnc needs a Box "
                "(wrap it, e.g. with FlattenObservation, in a 'module:Env-v0' id)"
            )
        if not isinstance(act_space, gym.spaces.Discrete):
            raise EnvError(
                f"env {env_id!r} has a {type(act_space).__name__} action space; DQN needs Discrete "
                "actions (discretize them in a wrapper registered as 'module:Env-v0')"
            )
        spec = env.spec
        base_id = spec.id if spec is not None else env_id
        return EnvSpec(
            id=env_id,
            kwargs=dict(kwargs or {}),
            obs_shape=tuple(int(s) for s in obs_space.shape),
            obs_dtype=str(obs_space.dtype),
            obs_low=_finite(obs_space.low),
            obs_high=_finite(obs_space.high),
            n_actions=int(act_space.n),
            action_meanings=ACTION_MEANINGS.get(base_id),
            obs_names=OBS_NAMES.get(base_id),
            reward_threshold=None if spec is None or spec.reward_threshold is None else float(spec.reward_threshold),
            max_episode_steps=None if spec is None else spec.max_episode_steps,
            obs_layout=image_layout(tuple(obs_space.shape)),
        )
    finally:
        env.close()


@dataclass
class Rollout:
    """Per-episode returns and lengths, and optionally the visited observations."""

    returns: np.ndarray
    lengths: np.ndarray
    observations: np.ndarray | None = None
    q_values: np.ndarray | None = None


def rollout(
    q_fn: QFunction,
    spec: EnvSpec,
    episodes: int,
    seed: int,
    epsilon: float = 0.0,
    record: bool = False,
    max_parallel: int = 64,
) -> Rollout:
    """Run ``episodes`` epsilon-greedy episodes, several at a time, with one policy call per step.

    Episode ``i`` is reset with seed ``seed + i`` and draws its exploration from its own RNG, so
    results do not depend on ``max_parallel``. With ``record``, the observations the policy saw
    (and its Q-values for them) are returned in visiting order, episode by episode.
    """
    if episodes < 1:
        raise ValueError("episodes must be >= 1")
    n = min(episodes, max_parallel)
    envs = [make_env(spec.id, spec.kwargs) for _ in range(n)]
    returns = np.zeros(episodes, np.float64)
    lengths = np.zeros(episodes, np.int64)
    rec_obs: list[list[np.ndarray]] = [[] for _ in range(episodes)]
    rec_q: list[list[np.ndarray]] = [[] for _ in range(episodes)]
    rngs = [np.random.default_rng([seed, i]) for i in range(episodes)]
    slot_ep = [-1] * n
    # HWC images keep their shape (a conv net takes them as they are; an MLP flattens them itself).
    shape = spec.batch_shape
    obs = np.zeros((n, *shape), np.float32)
    next_ep = 0

    def start(slot: int) -> None:
        nonlocal next_ep
        slot_ep[slot] = next_ep
        o, _ = envs[slot].reset(seed=seed + next_ep)
        obs[slot] = np.asarray(o, np.float32).reshape(shape)
        next_ep += 1

    try:
        for s in range(n):
            start(s)
        active = list(range(n))
        while active:
            q = np.asarray(q_fn(obs[active]))
            actions = q.argmax(axis=1)
            for j, slot in enumerate(active):
                ep = slot_ep[slot]
                if record:
                    rec_obs[ep].append(obs[slot].copy())
                    rec_q[ep].append(q[j].astype(np.float32))
                a = int(actions[j])
                if epsilon > 0 and rngs[ep].random() < epsilon:
                    a = int(rngs[ep].integers(spec.n_actions))
                o, r, term, trunc, _ = envs[slot].step(a)
                returns[ep] += float(r)
                lengths[ep] += 1
                obs[slot] = np.asarray(o, np.float32).reshape(shape)
                if term or trunc:
                    if next_ep < episodes:
                        start(slot)
                    else:
                        slot_ep[slot] = -1
            active = [s for s in active if slot_ep[s] >= 0]
    finally:
        for env in envs:
            env.close()
    if not record:
        return Rollout(returns, lengths)
    observations = np.concatenate([np.stack(o) for o in rec_obs]).astype(np.float32)
    q_values = np.concatenate([np.stack(q) for q in rec_q]).astype(np.float32)
    return Rollout(returns, lengths, observations, q_values)


def collect_states(q_fn: QFunction, spec: EnvSpec, n_states: int, seed: int, epsilon: float = 0.0,
                   episodes_per_round: int = 16) -> np.ndarray:
    """``n_states`` observations visited by the epsilon-greedy policy, drawn evenly from whole episodes.

    Episodes run in rounds until enough states are seen; then a seeded subsample keeps exactly
    ``n_states``, so the data covers early and late parts of episodes alike.
    """
    if n_states < 1:
        raise ValueError("n_states must be >= 1")
    seen: list[np.ndarray] = []
    total, round_ = 0, 0
    while total < n_states:
        res = rollout(q_fn, spec, episodes_per_round, seed + round_ * episodes_per_round, epsilon=epsilon, record=True)
        assert res.observations is not None
        seen.append(res.observations)
        total += len(res.observations)
        round_ += 1
    states = np.concatenate(seen)
    pick = np.random.default_rng(seed).choice(len(states), n_states, replace=False)
    return states[np.sort(pick)]
