"""Typed stage configs, per-env training defaults, and config files with precise errors.

Nothing here imports TensorFlow: configs validate in milliseconds.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dqnc.errors import ConfigError
from dqnc.envs import is_atari
from dqnc.seeds import EVAL_SEED


def check_conv_layers(conv: list[list[int]] | None) -> None:
    """Conv layers ``[filters, kernel, stride]`` within dqnc's bounds (ValueError naming the layer)."""
    for layer in conv or []:
        if len(layer) != 3 or not (1 <= layer[0] <= 4096 and 1 <= layer[1] <= 32 and 1 <= layer[2] <= 32):
            raise ValueError(f"conv layer {layer} must be [filters 1..4096, kernel 1..32, stride 1..32]")


class TrainConfig(BaseModel):
    """Everything that determines a training run (with the seed, the run is reproducible)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str = Field(min_length=1, description="gymnasium id, or 'module:Env-v0'")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="env constructor kwargs (on the command line: JSON, e.g. '{\"continuous\": false}')")
    seed: int = Field(0, ge=0, le=999, description="random seed; a run is reproducible on CPU for a given seed")
    total_steps: int = Field(100_000, ge=1, description="env steps over all vectorized envs")
    num_envs: int = Field(1, ge=1, le=256, description="vectorized envs stepped together")
    hidden: list[int] = Field(default_factory=lambda: [128, 128], min_length=1, max_length=8,
                              description="hidden layer widths (on the command line: 64,64)")
    conv: list[list[int]] | None = Field(None, max_length=8, description="conv layers [filters, kernel, stride] "
                                         "before the hidden layers, for image observations (HWC or CHW)")
    activation: Literal["relu", "tanh", "elu"] = Field("relu", description="hidden activation")
    dueling: bool = Field(False, description="dueling head (folded into a plain MLP on save)")
    double_dqn: bool = Field(True, description="Double DQN targets: the online network picks the next action")
    lr: float = Field(2.3e-3, gt=0, le=1, description="Adam learning rate")
    batch_size: int = Field(64, ge=1, le=65536, description="minibatch size")
    buffer_size: int = Field(100_000, ge=1, description="replay buffer capacity")
    frame_dedup: Literal["auto", "on", "off"] = Field("auto", description="store each frame of frame-stacked image "
                                                      "observations once (Atari: 7 kB a transition, not 56 kB); "
                                                      "training is the same either way; auto: on when the env's "
                                                      "last wrapper is FrameStackObservation")
    replay: Literal["uniform", "prioritized"] = Field("uniform", description="how minibatches are drawn: uniformly, "
                                                      "or in proportion to |TD error|^per_alpha (Schaul et al. 2016)")
    per_alpha: float = Field(0.6, ge=0, le=1, description="prioritized replay: how strongly priorities skew "
                             "sampling (0: uniform)")
    per_beta_start: float = Field(0.4, ge=0, le=1, description="prioritized replay: importance-weight exponent at "
                                  "the start, annealed linearly to 1 at the end of the run")
    n_step: int = Field(1, ge=1, le=100, description="n-step returns: rewards summed over up to n steps before "
                        "bootstrapping (an episode's end shortens them; a truncation still bootstraps)")
    actors: int = Field(0, ge=0, le=64, description="Ape-X: Ray actors that step the envs (each num_envs of them, "
                        "at its own epsilon) while this process learns; 0: act and learn in this process")
    learning_starts: int = Field(1000, ge=0, description="random-action steps before training starts")
    gamma: float = Field(0.99, ge=0, le=1, description="discount factor")
    train_freq: int = Field(256, ge=1, description="env steps between training calls")
    gradient_steps: int = Field(128, ge=1, description="gradient steps per training call")
    target_update_interval: int = Field(128, ge=1, description="gradient steps between target updates")
    tau: float = Field(1.0, gt=0, le=1, description="1 = hard copy, < 1 = Polyak averaging")
    max_grad_norm: float = Field(10.0, gt=0, description="gradients are clipped to this global norm")
    eps_start: float = Field(1.0, ge=0, le=1, description="initial exploration epsilon")
    eps_end: float = Field(0.04, ge=0, le=1, description="final exploration epsilon")
    eps_fraction: float = Field(0.16, gt=0, le=1, description="share of the run over which epsilon decays")
    eval_freq: int = Field(2500, ge=1, description="env steps between greedy evaluations")
    eval_episodes: int = Field(20, ge=1, description="episodes per greedy evaluation")
    confirm_episodes: int = Field(50, ge=0, description="episodes (from a second, disjoint seed range) that confirm "
                                  "a new best evaluation before its weights are kept or training stops early")
    early_stop: bool = Field(True, description="stop once every episode of a greedy evaluation and its confirmation "
                             "reaches the env's reward threshold")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if any(h < 1 or h > 65536 for h in self.hidden):
            raise ValueError("hidden layer widths must be between 1 and 65536")
        check_conv_layers(self.conv)
        return self


# Tuned per env and measured (see BENCHMARKS.md). TrainConfig's own defaults are CartPole-v1's
# (10 of 10 seeds >= 475 over 100 episodes); anything not listed here uses them.
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "CartPole-v1": {},
    "Acrobot-v1": dict(
        total_steps=100_000, lr=6.3e-4, batch_size=128, buffer_size=50_000, learning_starts=1000,
        train_freq=64, gradient_steps=64, target_update_interval=250, eps_fraction=0.12, eps_end=0.1,
        eval_freq=5000, eval_episodes=20,
    ),
    "MountainCar-v0": dict(
        total_steps=120_000, lr=4e-3, batch_size=128, buffer_size=10_000, learning_starts=1000,
        gamma=0.98, train_freq=64, gradient_steps=32, target_update_interval=300, eps_fraction=0.2,
        eps_end=0.07, hidden=[256, 256], eval_freq=5000, eval_episodes=20,
    ),
    "LunarLander-v3": dict(
        total_steps=300_000, lr=6.3e-4, batch_size=128, buffer_size=100_000, learning_starts=1000,
        train_freq=64, gradient_steps=16, target_update_interval=250, eps_fraction=0.12, eps_end=0.05,
        hidden=[128, 128], eval_freq=10_000, eval_episodes=20,
    ),
}
# MinAtar (10x10xC images): Young & Tian's network (one 3x3 conv, 16 filters, then 128 units); the
# schedule was tuned briefly on Breakout-v1 only (see BENCHMARKS.md) and is shared by the five games
# (each of the five measured with it at 1M steps: BENCHMARKS.md, "MinAtar Breakout and SpaceInvaders at 1M steps").
_MINATAR = dict(
    conv=[[16, 3, 1]], hidden=[128], total_steps=1_000_000, num_envs=8, lr=3e-4, batch_size=64,
    buffer_size=100_000, learning_starts=5000, train_freq=64, gradient_steps=16, target_update_interval=250,
    eps_fraction=0.1, eps_end=0.05, eval_freq=25_000, eval_episodes=20, confirm_episodes=20,
)
ENV_DEFAULTS.update({f"MinAtar/{game}-v1": dict(_MINATAR)
                     for game in ("Asterix", "Breakout", "Freeway", "Seaquest", "SpaceInvaders")})
# Atari (ALE/*-v5 through dqnc.envs.ATARI_WRAPPERS: uint8 (4, 84, 84) CHW): the Nature DQN network
# (Mnih et al. 2015) and its schedule as CleanRL's dqn_atari runs it with Adam (lr 1e-4, batch 32,
# one gradient step per 4 agent steps, target copy every 1,000 agent steps, epsilon 1 -> 0.01 over
# the first 10%), over 10M frames (2.5M agent steps). Not tuned here: see recipes/atari-breakout.yaml.
# The buffer holds 100k transitions (obs and next obs, 2 x 28 kB each: 5.6 GB), not the paper's 1M.
_ATARI = dict(
    conv=[[32, 8, 4], [64, 4, 2], [64, 3, 1]], hidden=[512], total_steps=2_500_000, num_envs=8, lr=1e-4,
    batch_size=32, buffer_size=100_000, learning_starts=80_000, train_freq=64, gradient_steps=16,
    target_update_interval=250, eps_fraction=0.1, eps_end=0.01, eval_freq=250_000, eval_episodes=10,
    confirm_episodes=0,
)


def train_defaults(env: str) -> dict[str, Any]:
    if env not in ENV_DEFAULTS and is_atari(env):  # every Atari game (ALE/Pong-v5, PongNoFrameskip-v4 ...)
        return dict(_ATARI)
    return dict(ENV_DEFAULTS.get(env, {}))


def build_train_config(env: str | None, file_values: dict[str, Any], overrides: dict[str, Any],
                       source: str = "options") -> TrainConfig:
    """Merge env defaults < config file < command-line overrides, then validate."""
    merged = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    env = merged.get("env", env)
    if not env:
        raise ConfigError("no environment given: pass --env ENV_ID (e.g. CartPole-v1) or set 'env' in the config file")
    values = {**train_defaults(str(env)), **merged, "env": env}
    from dqnc.envs import trust

    trust(str(env))  # the user named it: a 'module:Env' id may be imported
    return validate(TrainConfig, values, source)


def validate(model: type[BaseModel], values: dict[str, Any], source: str, lines: dict[tuple, int] | None = None) -> Any:
    """Validate ``values`` against ``model``; raise one ConfigError naming the first problem."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model, source, lines)) from None


def format_validation_error(e: ValidationError, model: type[BaseModel], source: str,
                            lines: dict[tuple, int] | None = None) -> str:
    err = first_error(e)
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    where = source
    if lines:
        line = lines.get(loc) or lines.get(loc[:-1]) if loc else None
        if line:
            where = f"{source}:{line}"
    if err["type"] == "extra_forbidden":
        return unknown_key_message(where, path, str(loc[-1]), fields_at(model, loc[:-1]))
    msg = err["msg"]
    if "input" in err and err["type"] != "missing":
        msg += f" (got {err['input']!r})"
    if source == "options" and loc and isinstance(loc[0], str):
        # Command-line options: name the flag the user typed.
        return f"--{loc[0].replace('_', '-')}: {msg}"
    return f"{where}: {path}: {msg}"


def first_error(e: ValidationError) -> Any:
    """The error to show: a misspelt key explains a 'missing' one, so unknown keys come first."""
    return min(e.errors(), key=lambda x: {"extra_forbidden": 0, "missing": 2}.get(x["type"], 1))


def unknown_key_message(where: str, path: str, key: str, fields: list[str]) -> str:
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(fields))}"
    return f"{where}: unknown key {path!r}: {hint}"


def fields_at(model: Any, loc: tuple) -> list[str]:
    """The keys valid at ``loc`` inside ``model`` (list indices skipped, Optional/Union unwrapped)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
        for arg in getattr(current, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    return list(getattr(current, "model_fields", {}).keys())


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a config or recipe file, or one ConfigError saying what is wrong."""
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist: check the path")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {e}") from None


def load_yaml_mapping(path: Path) -> dict[str, Any]:
    """Load a YAML file that must hold a mapping, with safe loading and one-line errors."""
    from dqnc import yamlio

    data = yamlio.compose_file(read_text(path, "config file"), path, construct_too=True)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; it must hold a mapping of options")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level, got {type(data).__name__}")
    return data


class _StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruneConfig(_StageConfig):
    """Magnitude pruning with fine-tuning (see dqnc.prune)."""

    sparsity: float = Field(0.8, ge=0.0, lt=1.0, description="target sparsity of the pruned kernels")
    schedule: Literal["polynomial", "constant"] = Field(
        "polynomial", description="polynomial (masks tighten gradually) or constant")
    distribution: Literal["uniform", "erk"] = Field("uniform", description="uniform, or erk (small layers stay denser)")
    finetune: Literal["distill", "rl", "none"] = Field(
        "distill", description="distill (the parent teaches), rl (DQN in the env) or none (one-shot)")
    keep_dense: tuple[str, ...] = Field(("first", "last"), description="layers left dense, by name or 'first'/'last' (on the command line: repeatable)")
    layer_sparsity: dict[str, float] = Field(default_factory=dict, description="per-layer targets, e.g. {dense_1: 0.9} (on the command line: NAME=SPARSITY, repeatable)")
    states: int = Field(20_000, ge=64, description="rollout states to distill on")
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="exploration of the teacher rollouts")
    epochs: int = Field(100, ge=1, description="distillation epochs")
    batch_size: int = Field(256, ge=1, description="distillation minibatch size")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="distillation learning rate (Adam)")
    # The distillation loss, in units of the teacher's advantage spread: policy distillation
    # (cross-entropy between the teacher's action softmax at ``temperature`` and the student's at
    # ``temperature * score_gain``), a light regression on advantages (the ranking of the other
    # actions), and optionally the raw Q error (``value_weight`` > 0 keeps the outputs Q-values;
    # 0 frees the hidden layers from the state value, which int8 cannot resolve next to the small
    # advantages). A gain > 1 makes the student's scores near a tie that much steeper than the
    # teacher's, so int8 rounding flips fewer near-tied actions.
    distill_loss: Literal["policy", "hinge"] = Field(
        "policy", description="policy: softmax cross-entropy (below); hinge: the teacher's action must lead by 'margin' "
        "(dqnc 0.1's loss; LunarLander's int8 return holds up better with it)")
    margin: float = Field(1.5, ge=0.0, description="hinge margin, in advantage-spread units (distill_loss: hinge)")
    temperature: float = Field(0.01, gt=0.0, description="teacher softmax temperature, in advantage-spread units")
    score_gain: float = Field(20.0, ge=1.0, description="how much steeper the student's scores are than the teacher's near ties")
    advantage_weight: float = Field(0.1, ge=0.0, description="weight of the advantage regression in the loss")
    value_weight: float = Field(0.0, ge=0.0, description="weight of the raw Q error in the loss (0 frees the hidden "
                                "layers from the state value)")
    dagger_rounds: int = Field(6, ge=0, le=10, description="extra rounds on states the student visits, labelled by the teacher")
    rl_steps: int = Field(20_000, ge=100, description="env steps of RL fine-tuning (finetune: rl)")
    seed: int = Field(0, ge=0, le=999, description="random seed")
    check_states: int = Field(2000, ge=16, description="held-out states the pruned policy is checked on")
    structure: Literal["weights", "units", "2by4"] = Field(
        "weights", description="weights: zero single weights (TFMOT magnitude pruning, same shape); units: remove whole "
        "hidden units, 'sparsity' being the share of each hidden layer's units removed (a narrower dense network); "
        "2by4: TFMOT's 2:4 pattern, two zeros in every four consecutive input weights of each unit (50%, "
        "'sparsity' unused; the layout sparse tensor cores and some NPUs accelerate)")
    importance: Literal["taylor", "magnitude"] = Field(
        "taylor", description="structure: units: rank units by the first-order Taylor estimate of the loss change "
        "(Molchanov et al. 2017) or by the norms of their incoming and outgoing weights")
    unit_rounds: int = Field(4, ge=1, le=20, description="structure: units: remove units in this many rounds, "
                             "fine-tuning by distillation after each")

    @model_validator(mode="after")
    def _check_layers(self) -> PruneConfig:
        for name, s in self.layer_sparsity.items():
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity of layer {name!r} must be in [0, 1), got {s}")
        return self


class QuantizeConfig(_StageConfig):
    """TFLite conversion, calibrated on rollouts and checked against the parent (see dqnc.quantize)."""

    mode: Literal["int8", "int16x8", "float16", "dynamic", "fp32"] = Field(
        "int8", description="int8 (full integer), int16x8, float16, dynamic or fp32")
    float_io: bool = Field(False, description="keep float32 input/output (int8/int16x8 inside)")
    target: Literal["mcu", "linux"] = Field(
        "mcu", description="where the model will run: mcu (TFLite Micro too: dense encoding) or linux (LiteRT, "
        "tflite-runtime: the sparse encoding is allowed)")
    sparse_encoding: Literal["auto", "on", "off"] = Field(
        "auto", description="store sparse kernels sparsely: smaller files, but TFLite Micro cannot run them "
        "and XNNPACK does not accelerate them; auto = dense for target mcu, sparse for target linux when at "
        "least 30% of the weights are zero and the sparse file is the smaller")
    output_range: Literal["ranking", "full"] = Field(
        "ranking", description="int8 output scale: 'ranking' narrows it so near-tied actions stay apart (larger scores "
        "saturate) and also tries cross-layer equalization, each variant chosen by greedy agreement with the parent on "
        "separate selection rollouts; 'full' keeps the converter's range over every calibrated Q-value, unequalized")
    calibration_states: int = Field(2000, ge=16, description="rollout states to calibrate on")
    calibration_epsilon: float = Field(0.1, ge=0.0, le=1.0, description="exploration of the calibration rollouts")
    check_states: int = Field(2000, ge=16, description="held-out states the result is checked on")
    seed: int = Field(0, ge=0, le=999, description="seed of the calibration, selection and check rollouts")
    # The check refuses what loses something (dqnc.fidelity): regret on the parent's states, and
    # the return of closed-loop episodes. Agreement and Q-error limits are opt-in.
    max_regret: float = Field(0.05, ge=0.0, description="mean regret on the check states, as a fraction of the "
                              "parent's action spread")
    max_return_drop: float = Field(0.05, ge=0.0, description="mean return drop over check_episodes, as a fraction of "
                                   "|parent mean|; fails only when the paired 95% CI of the drop excludes 0")
    check_episodes: int = Field(20, ge=0, le=10_000, description="closed-loop check episodes (0 = off)")
    min_agreement: float | None = Field(None, ge=0.0, le=1.0, description="greedy agreement on all check states")
    min_decisive_agreement: float | None = Field(None, ge=0.0, le=1.0, description="greedy agreement on decisive states")
    max_q_rel_error: float | None = Field(None, ge=0.0, description="p99 |dQ| as a fraction of the parent's Q range "
                                          "(Q-value outputs only)")
    strip_strings: bool = Field(True, description="drop tensor names and signatures from the .tflite (runtimes address "
                                "tensors by index; a 16x16 int8 policy shrinks by ~20%)")
    weight_bits: Literal[8, 4, 2] = Field(
        8, description="int8 weights per layer take at most 2^bits values: 4 or 2 cluster each Dense kernel (TFMOT "
        "weight clustering, fine-tuned by distillation against the source) and quantize it with one scale per layer, "
        "so export can store bits-wide indices plus a table (TFLite Micro LUT compression, packed policy.c)")
    cluster_steps: int = Field(1500, ge=1, description="weight_bits 4|2: distillation steps fine-tuning the clusters")
    weight_scales: Literal["channel", "layer"] = Field(
        "channel", description="int8 Dense kernels: one scale per output channel (the converter's default), or one per "
        "layer (drops the per-channel scale and zero-point arrays: a 16x16 int8 policy shrinks by ~26%; "
        "weight_bits 4|2 always use 'layer')")

    @model_validator(mode="after")
    def _check_target(self) -> QuantizeConfig:
        if self.target == "mcu" and self.sparse_encoding == "on":
            raise ValueError("sparse_encoding 'on' needs target 'linux': TFLite Micro cannot run sparse tensors")
        if self.weight_bits < 8 and self.mode != "int8":
            raise ValueError(f"weight_bits {self.weight_bits} needs mode 'int8' (clustered kernels are stored as int8)")
        return self


class ExportConfig(_StageConfig):
    """The edge bundle (see dqnc.export)."""

    c_name: str = Field("g_dqnc_model", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of the C array")
    target: Literal["mcu", "linux"] = Field(
        "mcu", description="mcu: a bundle every runtime runs (dense, ops TFLite Micro has; verified on TFLM, with "
        "C deliverables); linux: LiteRT/tflite-runtime only (sparse encoding allowed)")
    check_states: int = Field(10_000, ge=1, description="held-out states run through every runtime before shipping")
    seed: int = Field(0, ge=0, le=999, description="seed of the verification rollouts (episode_seed('export_check', seed))")
    # target mcu: the policy as TFLite Micro (and policy.c, bit-identical to it) runs it is judged against the
    # parent, with the gates quantize's check applies to LiteRT (dqnc.fidelity): TFLM and LiteRT round differently,
    # so their raw action mismatch is reported, and refuses only when max_action_mismatch is set.
    max_regret: float = Field(0.05, ge=0.0, description="mcu: mean regret of TFLM's actions on the check states, as a "
                              "fraction of the parent's action spread")
    min_decisive_agreement: float | None = Field(None, ge=0.0, le=1.0, description="mcu: TFLM's greedy agreement with "
                                                 "the parent on decisive states")
    max_return_drop: float = Field(0.05, ge=0.0, description="mcu: mean return drop of TFLM against the parent over "
                                   "check_episodes, as a fraction of |parent mean|; fails only when the paired 95% CI "
                                   "of the drop excludes 0")
    check_episodes: int = Field(20, ge=0, le=10_000, description="mcu: closed-loop episodes TFLM and the parent play "
                                "on the same seeds (0 = off)")
    max_action_mismatch: float | None = Field(
        None, ge=0.0, le=1.0, description="mcu: share of check states on which TFLM may pick another action than "
        "LiteRT (off by default: the parent is the judge); without a parent, 0.01, and only where the two runtimes' "
        "rounding explains each flip (see dqnc.export.verify_tflm)")
    onnx: bool = Field(False, description="also write model.onnx (int8 as QDQ with the .tflite's own scales, fp32 as "
                       "is), checked in ONNX Runtime against LiteRT on the check states (needs the onnx extra)")


class Gates(_StageConfig):
    """Quality gates: each failing one makes the command exit 1."""

    min_return: float | None = Field(None, description="gate: exit 1 if the mean return is below this")
    max_return_drop: float | None = Field(None, description="gate: exit 1 if the mean return is more than this "
                                           "fraction of |reference mean return| below it (0.01 = 1%)")
    min_agreement: float | None = Field(None, ge=0.0, le=1.0, description="gate: exit 1 if greedy agreement with the "
                                         "reference over every visited state is below this (0.95 = 95%)")
    min_decisive_agreement: float | None = Field(None, ge=0.0, le=1.0, description="gate: the same on "
                                                  "decisive states only (their count is reported)")
    max_regret: float | None = Field(None, ge=0.0, description="gate: exit 1 if the mean regret, as a fraction of "
                                      "the reference's action spread, exceeds this")
    max_size_kb: float | None = Field(None, gt=0.0, description="gate: exit 1 if the model file is larger than this "
                                       "many kB (1 kB = 1,000 bytes)")
    max_size_kib: float | None = Field(None, gt=0.0, description="gate: the same in KiB (1 KiB = 1,024 bytes)")
    max_latency_us: float | None = Field(None, gt=0.0, description="gate: exit 1 if the p50 latency per action exceeds this "
                                          "many microseconds")


class EvalConfig(_StageConfig):
    """Greedy evaluation (see dqnc.evaluate)."""

    episodes: int = Field(100, ge=1, le=100_000, description="greedy episodes to run")
    seed: int = Field(EVAL_SEED, ge=0, lt=2**31, description="episode i is reset with seed + i; the default starts "
                      "the held-out range no stage rolls out from (dqnc.seeds)")
    latency_samples: int = Field(2000, ge=0, description="single-observation calls timed for the latency figures "
                                 "(0 = skip)")
    runtime: str = Field(
        "auto", description="what runs a .tflite policy: auto (LiteRT, else tflite-runtime), litert, tflite-runtime, "
        "tflm (TensorFlow Lite Micro's reference kernels), c (the bundle's policy.c, compiled for the host) or "
        "onnxruntime (the bundle's model.onnx, else the .tflite converted to ONNX; the onnx extra)",
        json_schema_extra=lambda schema: _runtime_enum(schema))
    gates: Gates = Field(default_factory=Gates)

    @field_validator("runtime")
    @classmethod
    def _known_runtime(cls, v: str) -> str:
        choices = runtime_choices()
        if v not in choices:
            raise ValueError(f"unknown runtime {v!r}: choose one of {', '.join(choices)}")
        return v


def runtime_choices() -> list[str]:
    """What ``EvalConfig.runtime`` accepts: auto and every registered runtime (read at call time)."""
    from dqnc.runtimes import names

    return ["auto", *names()]


def _runtime_enum(schema: dict[str, Any]) -> None:
    # The JSON Schema lists the registry's names where a Literal would have put them (before title).
    fields = dict(schema, enum=runtime_choices())
    schema.clear()
    schema.update({k: fields[k] for k in sorted(fields)})


class DistillConfig(_StageConfig):
    """A student (MLP, or conv net on images) of any shape taught the parent's policy (see dqnc.distill)."""

    hidden: list[int] | Literal["auto"] = Field(
        default_factory=lambda: [16, 16], description="student hidden widths, e.g. [16, 16]; 'auto' = the narrowest "
        "width in 'widths' (x 'depth' layers) whose validation return meets max_return_drop")
    activation: Literal["relu", "tanh", "elu"] = Field("relu", description="hidden activation of the student")
    conv: list[list[int]] | None = Field(None, max_length=8, description="a conv student: layers [filters, kernel, "
                                         "stride] before the hidden widths (image envs); none: a Dense MLP on the "
                                         "flattened image")
    states: int = Field(20_000, ge=64, description="teacher rollout states to distill on")
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="exploration of the teacher rollouts")
    steps: int = Field(3000, ge=1, description="minibatch steps on the teacher's states")
    dagger_rounds: int = Field(4, ge=0, le=10, description="extra rounds on states the student visits, labelled by the teacher")
    dagger_steps: int = Field(1500, ge=1, description="minibatch steps per DAgger round")
    batch_size: int = Field(256, ge=1, description="minibatch size")
    lr: float = Field(3e-3, gt=0.0, le=1.0, description="learning rate (Adam)")
    # The loss, as in PruneConfig (see there): policy distillation at a low temperature plus a
    # light regression on advantages.
    distill_loss: Literal["policy", "hinge"] = Field(
        "policy", description="policy (softmax cross-entropy) or hinge (the teacher's action must lead by 'margin')")
    margin: float = Field(1.5, ge=0.0, description="hinge margin, in advantage-spread units (distill_loss: hinge)")
    temperature: float = Field(0.01, gt=0.0, description="teacher softmax temperature, in advantage-spread units")
    score_gain: float = Field(20.0, ge=1.0, description="how much steeper the student's scores are than the "
                              "teacher's near ties")
    advantage_weight: float = Field(0.1, ge=0.0, description="weight of the advantage regression in the loss")
    value_weight: float = Field(0.0, ge=0.0, description="weight of the raw Q error in the loss")
    seed: int = Field(0, ge=0, le=999, description="random seed (weights, minibatches, rollout episodes)")
    check_states: int = Field(2000, ge=16, description="held-out states the student is checked on")
    # Width search (hidden: auto).
    widths: list[int] = Field(default_factory=lambda: [4, 6, 8, 12, 16, 24, 32, 48, 64], min_length=1,
                              description="hidden: auto: the widths to try, narrowest first")
    depth: int = Field(2, ge=1, le=8, description="hidden layers of the searched students")
    max_return_drop: float = Field(0.01, ge=0.0, description="hidden: auto gate, a fraction of the parent's mean "
                                   "return on the validation episodes (as eval's --max-return-drop)")
    validation_episodes: int = Field(20, ge=1, le=10_000, description="hidden: auto: validation episodes per "
                                     "candidate width")

    @model_validator(mode="after")
    def _check_widths(self) -> DistillConfig:
        for w in (self.hidden if isinstance(self.hidden, list) else []) + self.widths:
            if not 1 <= w <= 65536:
                raise ValueError(f"hidden layer widths must be between 1 and 65536, got {w}")
        if isinstance(self.hidden, list) and not 1 <= len(self.hidden) <= 8:
            raise ValueError("give 1 to 8 hidden layers")
        check_conv_layers(self.conv)
        return self


class ImportConfig(_StageConfig):
    """Bringing a Q-network made elsewhere into a dqnc artifact (see dqnc.importers)."""

    env: str = Field(min_length=1, description="gymnasium id the network acts in, or 'module:Env-v0'")
    env_kwargs: dict[str, Any] = Field(default_factory=dict, description="env constructor kwargs (on the command line: JSON)")
    format: Literal["auto", "keras", "onnx", "sb3", "cleanrl", "torch"] = Field(
        "auto", description="source format; auto sniffs it from the file")
    obs_norm: str | None = Field(None, description="SB3 VecNormalize .pkl whose observation statistics are folded in")
    activation: Literal["relu", "tanh", "elu", "sigmoid"] | None = Field(
        None, description="hidden activation of a bare state_dict (CleanRL saves none); SB3 zips and Keras/ONNX "
        "files record their own")
    input_scale: float | None = Field(None, gt=0.0, description="factor the source multiplied observations by before "
                                      "its network, when the file does not record it (CleanRL's dqn_atari: 1/255, "
                                      "the default for uint8 0-255 images); folded into the first layer")
    check_states: int = Field(2000, ge=16, description="rollout states the imported Q-values are checked on")
    check_episodes: int = Field(20, ge=1, le=1000, description="greedy episodes whose returns are reported for the "
                                "source and the import")
    seed: int = Field(0, ge=0, le=999, description="selects the check rollouts' episode seeds")
    max_rel_error: float = Field(1e-5, ge=0.0, le=1e-2, description="max |dQ| / Q range allowed against the source")
