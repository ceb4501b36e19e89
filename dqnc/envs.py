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

from dqnc.errors import DqncError, EnvError
from dqnc.limits import clip

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
    # "flat" (vectors; any other shape is flattened for MLPs), "HWC" or "CHW" (3-D images: a conv
    # net reads them in this layout, so every runtime is fed the env's observation as it is).
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
        return self.obs_shape if self.is_image else (self.obs_dim,)

    @property
    def wrappers(self) -> list[Any]:
        """The gymnasium wrappers this env is made with (``env_kwargs['wrappers']``), in order."""
        return list(self.kwargs.get(WRAPPERS_KEY) or [])

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


def _bounds(values: np.ndarray) -> list[float]:
    """Per-feature bounds; an image's uniform bound is recorded once (Atari frames: 28,224 equal values)."""
    v = np.asarray(values)
    if v.ndim == 3 and v.size and (v == v.flat[0]).all():
        return _finite(v.flat[:1])
    return _finite(v)


def _ale_action_meanings(env: Any) -> list[str] | None:
    meanings = getattr(env.unwrapped, "get_action_meanings", None)
    return [str(m) for m in meanings()] if callable(meanings) else None


def _finite(values: np.ndarray) -> list[float]:
    # JSON has no infinity: unbounded dimensions are recorded as +-3.4e38 (float32 max).
    return [float(np.clip(v, -3.4e38, 3.4e38)) for v in np.asarray(values, np.float64).ravel()]


def register_on_demand(env_id: str) -> None:
    """Register the MinAtar ids (``MinAtar/Breakout-v1`` ...) and the Atari ids (``ALE/Breakout-v5``,
    ``BreakoutNoFrameskip-v4`` ...) the first time one is asked for."""
    import gymnasium as gym

    if env_id in gym.registry:
        return
    if str(env_id).startswith("MinAtar/"):
        try:
            import minatar.gym
        except ModuleNotFoundError:
            raise EnvError(f"cannot make env {env_id!r}: the 'minatar' package is not installed; "
                           "pip install 'dqnc[pixels]' (or minatar)") from None
        minatar.gym.register_envs()
    elif is_atari(env_id):
        try:
            import ale_py
        except ModuleNotFoundError:
            raise EnvError(f"cannot make env {env_id!r}: the 'ale-py' package is not installed; "
                           "pip install 'dqnc[atari]' (ale-py ships the ROMs, opencv-python-headless resizes frames)") from None
        gym.register_envs(ale_py)


# --- wrappers ------------------------------------------------------------------------------------
# ``env_kwargs['wrappers']`` names gymnasium wrappers applied in order after gym.make, each as a
# class name or a one-key mapping ``{ClassName: {kwargs}}``. It is the env's own kwargs that every
# stage passes on (EnvSpec.kwargs), so an artifact's manifest names its wrappers and every rollout,
# check and evaluation recreates the same observations.
WRAPPERS_KEY = "wrappers"

# Atari ids get the DQN preprocessing of Mnih et al. (2015) through gymnasium's own wrappers unless
# env_kwargs names others: 4-frame skip with max-pooling of the last two frames, 84x84 grayscale,
# up to 30 no-ops at reset, 4 frames stacked into a uint8 (4, 84, 84) CHW observation. ALE v5 ids
# skip 4 frames themselves, so the base env is made with frameskip=1 and AtariPreprocessing skips.
ATARI_WRAPPERS: list[dict[str, dict[str, Any]]] = [
    {"AtariPreprocessing": {"frame_skip": 4, "screen_size": 84, "noop_max": 30, "grayscale_obs": True,
                            "terminal_on_life_loss": False, "scale_obs": False}},
    {"FrameStackObservation": {"stack_size": 4}},
]


# Named presets (``env_kwargs: {preset: NAME}``): a wrapper list recorded in full beside the name.
# ``sb3-atari`` is Stable-Baselines3's AtariWrapper as rl-baselines3-zoo evaluates its Atari models
# (make_atari_env + VecFrameStack(4) + VecTransposeImage): 1-30 no-ops at reset, each action
# repeated 4 frames with the max of the last two RGB frames, FIRE pressed after reset, OpenCV
# grayscale 84x84, 4 frames stacked channels-first and zero-filled at reset (the newest frame
# last), no reward clipping and no end of episode at a lost life (both training-only in SB3:
# dqnc.atari.EpisodicLife and ClipReward can be named for a training env). Use it with the
# *NoFrameskip-v4 ids those models were trained on (no sticky actions). With the preset,
# ``max_episode_steps`` caps an episode in agent steps (a TimeLimit after the frame skip).
PRESET_KEY = "preset"
ENV_PRESETS: dict[str, list[dict[str, dict[str, Any]]]] = {
    "sb3-atari": [
        {"NoopReset": {"noop_max": 30}},
        {"MaxAndSkip": {"skip": 4}},
        {"FireReset": {}},
        {"WarpFrame": {"size": 84}},
        {"FrameStackObservation": {"stack_size": 4, "padding_type": "zero"}},
    ],
}
_CAP_KEY = "max_episode_steps"


def is_atari(env_id: str) -> bool:
    """ALE v5 ids (``ALE/Breakout-v5``) and the legacy ``*NoFrameskip-v4`` ids rl-zoo's models use."""
    return str(env_id).startswith("ALE/") or str(env_id).endswith("NoFrameskip-v4")


def _preset_wrappers(env_id: str, kw: dict[str, Any]) -> list[Any]:
    """The preset's wrapper list (with the episode cap as a last TimeLimit); ``kw`` loses the cap."""
    name = kw[PRESET_KEY]
    if name not in ENV_PRESETS:
        close = difflib.get_close_matches(str(name), list(ENV_PRESETS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(ENV_PRESETS)}"
        raise EnvError(f"env {env_id!r}: unknown env preset {clip(name)!r}: {hint}")
    if not is_atari(env_id):
        raise EnvError(f"env {env_id!r}: preset {name!r} wraps Atari games; use an Atari id such as "
                       "BreakoutNoFrameskip-v4")
    wrappers = [dict((n, dict(a)) for n, a in w.items()) for w in ENV_PRESETS[name]]
    cap = kw.pop(_CAP_KEY, None)
    if cap is not None:
        wrappers.append({"TimeLimit": {_CAP_KEY: cap}})
    if WRAPPERS_KEY in kw:  # already resolved (a manifest's kwargs): the list must be the preset's
        given = [_wrapper_entry(env_id, w) for w in kw[WRAPPERS_KEY]]
        expected = [_wrapper_entry(env_id, w) for w in wrappers]
        extra = [n for n, _ in given[len(expected):]]
        if cap is not None or given[:len(expected)] != expected or extra not in ([], ["TimeLimit"]):
            raise EnvError(f"env {env_id!r}: env_kwargs names preset {name!r} and its own 'wrappers'; "
                           "give one of them (the preset records its wrappers itself)")
        return list(kw[WRAPPERS_KEY])
    return wrappers


def resolve_env_kwargs(env_id: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The env kwargs with a preset's or Atari's default wrappers filled in (idempotent; other ids
    unchanged)."""
    kw = dict(kwargs or {})
    if not isinstance(kw.get(WRAPPERS_KEY, []), list):
        raise EnvError(f"env {env_id!r}: env_kwargs 'wrappers' must be a list, got {type(kw[WRAPPERS_KEY]).__name__}: "
                       "e.g. [{FrameStackObservation: {stack_size: 4}}]")
    if PRESET_KEY in kw:
        kw[WRAPPERS_KEY] = _preset_wrappers(env_id, kw)
    if not is_atari(env_id):
        return kw
    if WRAPPERS_KEY not in kw:
        kw[WRAPPERS_KEY] = [dict((name, dict(args)) for name, args in w.items()) for w in ATARI_WRAPPERS]
    skipping = [name for name, args in (_wrapper_entry(env_id, w) for w in kw[WRAPPERS_KEY])
                if (name == "AtariPreprocessing" and int(args.get("frame_skip", 4)) > 1)
                or (name == "MaxAndSkip" and int(args.get("skip", 4)) > 1)]
    if skipping:
        if "frameskip" in kw and kw["frameskip"] != 1:
            raise EnvError(f"env {env_id!r}: frameskip={kw['frameskip']} and {skipping[0]}'s frame skip would skip "
                           f"frames twice; set env_kwargs frameskip to 1 (or {skipping[0]}'s skip to 1)")
        kw["frameskip"] = 1
    return kw


def _wrapper_entry(env_id: str, entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, str):
        return entry, {}
    if isinstance(entry, dict) and len(entry) == 1:
        name, args = next(iter(entry.items()))
        if isinstance(name, str) and isinstance(args, dict | None):
            return name, dict(args or {})
    raise EnvError(f"env {env_id!r}: wrapper {entry!r} must be a class name or a one-key mapping "
                   "{ClassName: {kwargs}}, e.g. {FrameStackObservation: {stack_size: 4}}")


def _wrapper_class(env_id: str, name: str) -> Any:
    """A gymnasium wrapper class, or one of dqnc.atari's: the only classes a name can reach."""
    import gymnasium as gym
    import gymnasium.wrappers as gw

    from dqnc.atari import WRAPPERS as DQNC_WRAPPERS

    cls = DQNC_WRAPPERS.get(name) or getattr(gw, name, None)
    if not (isinstance(cls, type) and issubclass(cls, gym.Wrapper)):
        known = [n for n in dir(gw) if isinstance(getattr(gw, n), type) and issubclass(getattr(gw, n), gym.Wrapper)]
        known += list(DQNC_WRAPPERS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "name a class of gymnasium.wrappers or dqnc.atari"
        raise EnvError(f"env {env_id!r}: unknown wrapper {name!r}: {hint}")
    return cls


def apply_wrappers(env: Any, env_id: str, wrappers: list[Any]) -> Any:
    """Wrap ``env`` with the named gymnasium wrappers, in order, with one-line errors."""
    for entry in wrappers:
        name, args = _wrapper_entry(env_id, entry)
        cls = _wrapper_class(env_id, name)
        try:
            env = cls(env, **args)
        except (TypeError, ValueError) as e:
            env.close()
            raise EnvError(f"env {env_id!r}: wrapper {name} with {args}: {e}; fix env_kwargs 'wrappers'") from None
        except Exception as e:  # gymnasium.error.DependencyNotInstalled (cv2) and the like
            env.close()
            raise EnvError(f"env {env_id!r}: wrapper {name}: {e}") from None
    return env


def image_layout(shape: tuple[int, ...]) -> str:
    """'HWC' or 'CHW' for a 3-D observation shape (channels are the short axis), else 'flat'."""
    if len(shape) != 3:
        return "flat"
    return "CHW" if shape[0] < shape[-1] else "HWC"


# --- trust ----------------------------------------------------------------------------------------
# A ``module:Env-v0`` id makes gymnasium import ``module``: Python code runs. dqnc runs it only for
# ids the user named (on the command line, in a config file or recipe they pass, or through the
# Python API with :func:`trust`), never for an id read from an artifact's manifest: that id is
# compared with the user's, not executed. Registered ids (``CartPole-v1``) import nothing new.
_TRUSTED: set[str] = set()


def names_module(env_id: str) -> bool:
    return ":" in str(env_id)


def trust(env_id: str | None) -> None:
    """Mark an env id as named by the user: its ``module:`` part may be imported."""
    if env_id and names_module(env_id):
        _TRUSTED.add(str(env_id))


def check_trusted(env_id: str) -> None:
    if names_module(env_id) and env_id not in _TRUSTED:
        raise EnvError(f"env {clip(env_id)!r} names a Python module, and it comes from a file, not from you: dqnc "
                       f"imports env code only when you name it: pass --env {clip(env_id)} (in a recipe: source.env) "
                       "if you trust that module")


def make_env(env_id: str, kwargs: dict[str, Any] | None = None, render_mode: str | None = None) -> Any:
    """Make one env from a registered id or a (trusted) ``module:Env-v0`` id, with a clear error."""
    import gymnasium as gym

    check_trusted(env_id)
    register_on_demand(env_id)
    kwargs = resolve_env_kwargs(env_id, kwargs)
    wrappers = kwargs.pop(WRAPPERS_KEY, None) or []
    kwargs.pop(PRESET_KEY, None)  # a name for the wrappers, not an env constructor argument
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    try:
        return apply_wrappers(gym.make(env_id, disable_env_checker=True, **kwargs), env_id, wrappers)
    except DqncError:
        raise
    except gym.error.Error as e:
        raise EnvError(f"cannot make env {env_id!r}: {e}{_suggest_env(env_id)}") from e
    except ModuleNotFoundError as e:
        module = e.name or str(env_id).split(":", 1)[0]
        raise EnvError(
            f"cannot make env {clip(env_id)!r}: module {module!r} cannot be imported: install it, or if it is your own "
            f"file, run from its folder or put that folder on PYTHONPATH (e.g. PYTHONPATH=. dqnc ...)"
        ) from e
    except (TypeError, ValueError, AssertionError, OverflowError, ArithmeticError) as e:
        raise EnvError(f"cannot make env {clip(env_id)!r} with kwargs {clip(kwargs)}: {clip(e)}; fix env_kwargs") from e
    except Exception as e:  # the env's own constructor failed: its code, the user's kwargs
        raise EnvError(f"cannot make env {clip(env_id)!r} with kwargs {clip(kwargs)}: {type(e).__name__}: {clip(e)}; "
                       "fix env_kwargs or the env") from e


def _suggest_env(env_id: str) -> str:
    import gymnasium as gym

    close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=1)
    return f" (did you mean {close[0]!r}?)" if close and close[0] not in str(env_id) else ""


def env_spec(env_id: str, kwargs: dict[str, Any] | None = None) -> EnvSpec:
    """Make the env once and record its spaces; reject spaces a Q-network cannot serve."""
    import gymnasium as gym

    kwargs = resolve_env_kwargs(env_id, kwargs)
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
            obs_low=_bounds(obs_space.low),
            obs_high=_bounds(obs_space.high),
            n_actions=int(act_space.n),
            action_meanings=ACTION_MEANINGS.get(base_id) or _ale_action_meanings(env),
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
    (and its Q-values for them) are returned in visiting order, episode by episode: float32, except
    uint8 images, which stay uint8 (an Atari state is 28 kB so, 113 kB as float32).
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
    rec_dtype = np.uint8 if spec.is_image and spec.obs_dtype == "uint8" else np.float32
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
                    rec_obs[ep].append(obs[slot].astype(rec_dtype))
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
    observations = np.concatenate([np.stack(o) for o in rec_obs]).astype(rec_dtype, copy=False)
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
