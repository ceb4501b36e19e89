"""The quantize stage: SavedModel artifact -> verified ``.tflite`` artifact.

Modes:
- ``int8``: full-integer (int8 kernels and activations, int8 input/output unless ``float_io``),
  calibrated on observations from rollouts of the input policy itself;
- ``int16x8``: int16 activations, int8 weights;
- ``float16``: float16 weights;
- ``dynamic``: int8 weights, float activations (no calibration);
- ``fp32``: a plain float conversion (what ``export`` uses for SavedModel inputs).

``weight_bits`` 4 or 2 (int8 only) first clusters every Dense kernel to 16 or 4 values,
fine-tuned by distillation against the input policy, and quantizes each kernel with one scale, so
its int8 weights take at most 2^bits values (see :mod:`dqnc.lowbit`).

Sparse kernels keep their zeros (the converter's sparsity optimization). Before anything is
written, the converted model is checked against its input (dqnc.fidelity's vocabulary): regret on
held-out states the parent visits, and the return of closed-loop episodes on the same seeds; a
result beyond tolerance raises GateFailed with the numbers (exit 1) and writes nothing. Agreement
and Q-error limits are optional: a model whose actions differ only on near-ties loses nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc import progress
from dqnc.compare import q_errors_unsaturated
from dqnc.config import QuantizeConfig
from dqnc.envs import collect_states, rollout
from dqnc.errors import GateFailed, UsageError
from dqnc.fidelity import actions_of, fidelity, return_drop
from dqnc.seeds import episode_seed

# Closed-loop check episodes start this far into the check range, past the episodes that
# collect the check states.
CHECK_EPISODE_OFFSET = 50_000


def _sparsity(model: Any) -> float:
    kernels = [l.get_weights()[0] for l in model.layers if l.get_weights()]
    total = sum(k.size for k in kernels)
    return 1.0 - sum(int(np.count_nonzero(k)) for k in kernels) / total if total else 0.0


def convert(model: Any, mode: str, calibration: np.ndarray | None = None, float_io: bool = False,
            sparse: bool = False, strip: bool = False, per_layer_weights: bool = False) -> bytes:
    """Convert a tf_keras model to TFLite bytes in the given mode (``strip``: see :func:`strip_strings`;
    ``per_layer_weights``: one int8 scale per Dense kernel instead of one per output channel)."""
    from dqnc.keras import tf

    t = tf()
    conv = t.lite.TFLiteConverter.from_keras_model(model)
    opts = []
    if mode != "fp32":
        opts.append(t.lite.Optimize.DEFAULT)
    if sparse:
        opts.append(t.lite.Optimize.EXPERIMENTAL_SPARSITY)
    conv.optimizations = opts
    if per_layer_weights:
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    if mode in ("int8", "int16x8"):
        if calibration is None or not len(calibration):
            raise UsageError(f"{mode} quantization needs calibration observations")
        cal = np.asarray(calibration, np.float32)

        def representative() -> Any:
            for row in cal:
                yield [row[None, :]]

        conv.representative_dataset = representative
        if mode == "int8":
            conv.target_spec.supported_ops = [t.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if not float_io:
                conv.inference_input_type = t.int8
                conv.inference_output_type = t.int8
        else:
            conv.target_spec.supported_ops = [t.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
            if not float_io:
                conv.inference_input_type = t.int16
                conv.inference_output_type = t.int16
    elif mode == "float16":
        conv.target_spec.supported_types = [t.float16]
    import warnings

    from dqnc.runtime import quiet_stderr

    try:
        with quiet_stderr(), warnings.catch_warnings():
            # "Statistics for quantized inputs were expected": dqnc sets I/O scales itself.
            warnings.simplefilter("ignore", UserWarning)
            content = bytes(conv.convert())
    except Exception as e:  # the converter raises many types; all mean the same to a user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"TFLite conversion ({mode}) failed: {first[:300]}") from e
    return strip_strings(content) if strip else content


def strip_strings(content: bytes) -> bytes:
    """Drop tensor and subgraph names and the signature table from a TFLite flatbuffer.

    They are for humans only (runtimes address tensors by index), yet the converter's names
    ("q_network/dense_1/MatMul;q_network/dense_1/Relu;...") are ~660 bytes of a 3.5 KB 16x16
    int8 policy (measured: 3,496 -> 2,832 bytes). TensorFlow's own flatbuffer tool does it.
    """
    from dqnc.tflite_model import read_model, write_model

    model = read_model(content)
    model.description = None  # what TensorFlow's flatbuffer_utils.strip_strings drops, and no more
    for subgraph in model.subgraphs:
        subgraph.name = None
        for tensor in subgraph.tensors:
            tensor.name = None
    model.signatureDefs = None  # without names it is useless
    return write_model(model)


def tensor_types(content: bytes) -> dict[str, Any]:
    """Input/output dtypes and quantization, and how many tensors of each dtype the model holds."""
    from dqnc.runtime import Policy
    from dqnc.tflite_model import Model

    pol = Policy(model_content=content)
    model = Model(content)
    counts: dict[str, int] = {}
    for i in range(len(model.subgraph.tensors or [])):
        name = model.tensor(i).dtype
        counts[name] = counts.get(name, 0) + 1
    return {**pol.io(), "tensor_dtypes": counts}


def prepare_for_integer(model: Any, states: np.ndarray, sweeps: int = 0,
                        outputs: str = "q_values") -> tuple[Any, dict[str, Any]]:
    """Rewrite a plain MLP, without changing a single greedy action, so int8 fits it well.

    - Fold per-feature observation standardization into the first layer: raw observations differ
      in scale by 10x or more (CartPole: pole angle std ~0.02, cart position ~0.3) and one
      per-tensor int8 input scale serves them all.
    - Output ``Q - mean_a(Q)``: Q-values share a large offset (~1/(1-gamma)) above small
      differences between actions, and the int8 output scale would spend its range on the offset.
    - Equalize ReLU layers with ``sweeps`` sweeps (:func:`equalize`; 0 = off).

    Any other model ending in a linear Dense layer (a conv net) gets the centering only
    (:func:`center_head`).

    Returns the rewritten model and the preprocessing the runtime must apply.
    """
    from dqnc.nets import NetSpec, build_plain_mlp
    from dqnc.qnet.fold import standardize_input
    from dqnc.qnet.weights import plain_mlp_weights as mlp_weights

    mlp = mlp_weights(model)
    if mlp is None:
        return center_head(model, outputs)
    weights, acts = mlp
    if len(set(acts)) > 1:
        return model, {}
    weights = [np.asarray(w, np.float64) for w in weights]
    mean = states.mean(axis=0).astype(np.float64)
    std = states.std(axis=0).astype(np.float64)
    std = np.where(std > 1e-6, std, 1.0)
    w0, b0 = weights[0], weights[1]
    weights[0], weights[1] = standardize_input(w0, b0, mean, std)
    weights[-2], weights[-1] = _centered(weights[-2], weights[-1])
    act = acts[0] if acts else "relu"
    if sweeps and act == "relu" and len(weights) > 2:
        weights = equalize(weights, (states - mean) / std, sweeps)
    spec = NetSpec(int(w0.shape[0]), int(weights[-1].shape[0]), tuple(int(w.shape[1]) for w in weights[0:-2:2]), act)
    rewritten = build_plain_mlp(spec, [w.astype(np.float32) for w in weights])
    return rewritten, {"obs_mean": mean.tolist(), "obs_std": std.tolist(), "outputs": _centered_outputs(outputs)}


def _centered(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The output layer's kernel and bias minus their mean over actions (float64)."""
    from dqnc.qnet.fold import center_q

    return center_q(np.asarray(kernel, np.float64), np.asarray(bias, np.float64))


def _centered_outputs(outputs: str) -> str:
    return "centered_q_values" if outputs in ("q_values", "centered_q_values") else "action_scores"


def center_head(model: Any, outputs: str = "q_values") -> tuple[Any, dict[str, Any]]:
    """A copy of any model ending in a linear Dense layer, outputting ``Q - mean_a(Q)``.

    The mean over actions is linear in the last layer, so subtracting the mean output column from
    its kernel and bias removes it exactly and no greedy action changes. For conv nets this is the
    whole rewrite: their observations (bool/uint8 pixels) already fit one int8 input scale, so
    they are not standardized. Measured on MinAtar SpaceInvaders (1M-step parent, Q range ~30,
    the top-two gap >= 1% of it on only ~5% of visited states): int8 without it was refused by the
    check (33.3 vs the parent's 64.8 over 20 episodes); with it (and the narrowed output range it
    enables) 76.4 vs 70.8 held out. Returns (model, {}) when the last layer is not a linear Dense.
    """
    from dqnc.keras import keras

    last = model.layers[-1] if model.layers else None
    if (type(last).__name__ != "Dense" or not last.use_bias
            or last.get_config().get("activation", "linear") != "linear"):
        return model, {}
    k = keras()
    copy = k.models.clone_model(model)
    copy.set_weights(model.get_weights())
    copy.layers[-1].set_weights([w.astype(np.float32) for w in _centered(*last.get_weights())])
    return copy, {"outputs": _centered_outputs(outputs)}


def equalize(weights: list[np.ndarray], x: np.ndarray, sweeps: int = 1) -> list[np.ndarray]:
    """Cross-layer equalization for ReLU MLPs (after Nagel et al. 2019, "Data-Free Quantization").

    relu(s * z) = s * relu(z) for s > 0, so scaling hidden unit i by s_i and its outgoing weights by
    1 / s_i computes the same function. int8 gives every hidden layer one activation scale, set by
    its largest unit, and every output channel of the next layer one weight scale, set by its
    largest weight; a unit with a small range but large outgoing weights (or the reverse) is then
    rounded coarsely where it matters. s_i = sqrt(outgoing weight range / activation range) makes
    the two ranges of each unit equal. Ranges come from the calibration states ``x`` (already in
    the model's input coordinates); dead units are left alone. Scaling a layer's units changes the
    outgoing ranges of the layer before: a second sweep rebalances them.
    """
    w = [np.asarray(a, np.float64).copy() for a in weights]
    for _ in range(sweeps):
        h = np.asarray(x, np.float64)
        for i in range(0, len(w) - 2, 2):
            h = np.maximum(h @ w[i] + w[i + 1], 0.0)
            act_range = h.max(axis=0)
            out_range = np.abs(w[i + 2]).max(axis=1)
            live = (act_range > 1e-12) & (out_range > 1e-12)
            scale = np.ones_like(act_range)
            scale[live] = np.sqrt(out_range[live] / act_range[live])
            if live.any():
                scale[live] /= np.exp(np.log(scale[live]).mean())  # keep the layer's overall size
            w[i], w[i + 1], w[i + 2] = w[i] * scale, w[i + 1] * scale, w[i + 2] / scale[:, None]
            h = h * scale
    return w


# Cross-layer equalization sweeps tried for int8 (0 = none); see :func:`equalize`.
EQUALIZE_SWEEPS = (0, 1, 2)
# How much the int8 output range may shrink, as fractions of the calibrated range (see below).
OUTPUT_RANGE_FACTORS = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64)


def _output_tensor(model: Any, schema: Any) -> Any:
    """The tensor holding the model's action scores (before a DEQUANTIZE with float I/O)."""
    sg = model.subgraphs[0]
    out = sg.outputs[0]
    for op in sg.operators:
        if out in list(op.outputs):
            code = model.operatorCodes[op.opcodeIndex]
            if max(int(code.builtinCode), int(code.deprecatedBuiltinCode)) == schema.BuiltinOperator.DEQUANTIZE:
                out = op.inputs[0]
            break
    return sg.tensors[out]


def narrow_output_range(content: bytes, score: Any) -> tuple[bytes, float, tuple[float, float] | None]:
    """Shrink the int8 output scale to the factor of :data:`OUTPUT_RANGE_FACTORS` under which the
    model's greedy actions best match its parent's (``score(content)``: higher is better).

    The converter sizes the output scale to the largest calibrated Q-value difference, but the
    actions of a DQN are decided by differences far smaller: with CartPole the int8 steps of the
    full range are wider than most visited states' top-two gap, and those states round to a tie.
    Only the action ranking is deployed, so the range is narrowed and larger scores saturate, which
    keeps the order of two actions. With more actions several may saturate into a tie; the choice
    is measured, so a narrower range is taken only where it agrees better.
    Returns the model, the factor chosen and the (dequantized) scores at which outputs saturate.
    """
    from dqnc.tflite_model import read_model, schema, write_model

    model = read_model(content)
    tensor = _output_tensor(model, schema())
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) != 1 or tensor.type != schema().TensorType.INT8:
        return content, 1.0, None
    base, zero = float(q.scale[0]), int(q.zeroPoint[0])
    best = (score(content), 1.0, content)
    for factor in OUTPUT_RANGE_FACTORS[1:]:
        q.scale = np.array([base * factor], np.float32)
        candidate = write_model(model)
        agreement_ = score(candidate)
        if agreement_ > best[0]:
            best = (agreement_, factor, candidate)
    scale = base * best[1]
    return best[2], best[1], ((-128 - zero) * scale, (127 - zero) * scale)


def choose_candidate(scores: dict[int, Any], verify: Any) -> tuple[int, dict[str, Any], list[str], list[str]]:
    """Pick the int8 candidate (keyed by equalization sweeps) with the best ``scores`` entry, then
    check it with ``verify(key) -> (stats, problems)``.

    Equalized units all reach their calibrated range, so a state beyond it saturates more of them
    (measured: CartPole decisive states whose inputs lay outside the calibration range). If the
    chosen candidate fails the check, the unequalized one (key 0, the converter's own ranges) is
    checked instead and a note says so. Returns (key, stats, problems, notes).
    """
    best = max(scores, key=lambda k: (scores[k], -k))
    stats, problems = verify(best)
    if problems and best != 0 and 0 in scores:
        plain_stats, plain_problems = verify(0)
        if not plain_problems:
            return 0, plain_stats, plain_problems, [f"equalized model ({best} sweeps) failed the check: {'; '.join(problems)}"]
    return best, stats, problems, []


def _calibration_states(cfg: QuantizeConfig, parent_q: Any, spec: Any, model: Any) -> np.ndarray | None:
    """Rollout observations of the parent to calibrate int8/int16x8 ranges on (None for other modes)."""
    if cfg.mode not in ("int8", "int16x8"):
        return None
    progress.update(phase=f"collecting {cfg.calibration_states:,} calibration states")
    calibration = collect_states(parent_q, spec, cfg.calibration_states, episode_seed("calibration", cfg.seed),
                                 cfg.calibration_epsilon)
    # Rollouts keep image observations' shape; the converter and the rewrites take the model's.
    return calibration.reshape((len(calibration), *(int(d) for d in model.input_shape[1:])))


def _rewrites(cfg: QuantizeConfig, source: art.Artifact, model: Any, calibration: np.ndarray | None,
              parent_q: Any) -> tuple[dict[int, Any], dict[str, Any], Any]:
    """The models to convert, keyed by equalization sweeps (0: none), the preprocessing the runtime
    must apply, and the low-bit clustering (None unless ``weight_bits`` < 8)."""
    from dqnc.policy import mlp_weights

    preprocess: dict[str, Any] = {}
    models = {0: model}
    clustered = None
    if calibration is not None and cfg.weight_bits < 8:
        from dqnc import lowbit

        clustered = lowbit.cluster(source, model, calibration, cfg.weight_bits, cfg.cluster_steps, cfg.seed, parent_q)
        # No equalization: it scales kernel rows by per-unit factors, which would split the clusters.
        models[0], preprocess = clustered.model, clustered.preprocess
    elif calibration is not None:
        progress.update(phase="rewriting the weights for integer inference")
        models[0], preprocess = prepare_for_integer(model, calibration, outputs=source.outputs)
        hidden_acts = set((mlp_weights(model) or ([], []))[1])
        if preprocess and cfg.mode == "int8" and cfg.output_range == "ranking" and hidden_acts == {"relu"}:
            # Equalized candidates are compared on agreement, which is what 'ranking' optimizes.
            models.update({k: prepare_for_integer(model, calibration, k, source.outputs)[0]
                           for k in EQUALIZE_SWEEPS if k})
    return models, preprocess, clustered


class _Checker:
    """Converted models held against their parent (dqnc.fidelity's vocabulary): the gate
    (:meth:`verify`, on the check states) and, when the int8 output range is narrowed, the ranking
    of candidates (:meth:`score`, on their own selection states)."""

    def __init__(self, cfg: QuantizeConfig, source: art.Artifact, parent_q: Any, preprocess: dict[str, Any],
                 clustered: bool) -> None:
        self.cfg, self.spec, self.parent_q, self.preprocess = cfg, source.env, parent_q, preprocess
        progress.update(phase=f"collecting {cfg.check_states:,} check states")
        self.check = collect_states(parent_q, self.spec, cfg.check_states, episode_seed("check", cfg.seed),
                                    cfg.calibration_epsilon)
        self.q_parent = parent_q(self.check)
        self.centered = preprocess.get("outputs") == "centered_q_values" or clustered or (
            preprocess.get("outputs") == "action_scores" and source.outputs == "action_scores")
        # centered: see prepare_for_integer
        self.narrow = cfg.mode == "int8" and cfg.output_range == "ranking" and self.centered
        self.check_episode_seed = episode_seed("check", cfg.seed) + CHECK_EPISODE_OFFSET
        if self.narrow:
            # Candidates are compared on their own states: rollouts that neither set the int8 ranges
            # (calibration) nor judge the result (check), so a range that fits calibration too
            # tightly shows up as flipped decisive states.
            self.selection = collect_states(parent_q, self.spec, cfg.calibration_states,
                                            episode_seed("selection", cfg.seed), cfg.calibration_epsilon)
            self.q_selection = parent_q(self.selection)

    def policy(self, content: bytes) -> Any:
        from dqnc.runtime import Policy

        return Policy(model_content=content, obs_mean=self.preprocess.get("obs_mean"),
                      obs_std=self.preprocess.get("obs_std"))

    def score(self, content: bytes) -> tuple[bool, float, float]:
        try:
            stats = fidelity(self.q_selection, actions_of(self.policy(content).q_values(self.selection)))
        except (RuntimeError, ValueError):  # the runtime cannot load it: rank it last
            return False, -1.0, -1.0
        ok = stats["regret"] <= self.cfg.max_regret
        # Candidates within the regret limit rank first, by agreement on all states; the others
        # by how little they lose.
        return ok, stats["agreement"] if ok else -stats["regret"], -stats["regret"]

    @functools.cached_property
    def parent_returns(self) -> np.ndarray:  # the parent's closed-loop episodes, rolled out once
        progress.update(phase=f"{self.cfg.check_episodes} closed-loop check episodes of the parent")
        return rollout(progress.counted(self.parent_q), self.spec, self.cfg.check_episodes,
                       self.check_episode_seed).returns

    def verify(self, content: bytes, bounds: tuple[float, float] | None) -> tuple[dict[str, Any], list[str]]:
        try:
            pol = self.policy(content)
        except (RuntimeError, ValueError) as e:
            return {}, [f"the runtime cannot load the converted model ({str(e).splitlines()[0][:120]})"]
        progress.update(phase="checking against the parent")
        q_new = pol.q_values(self.check)
        stats = fidelity(self.q_parent, actions_of(q_new))
        stats.update(q_errors_unsaturated(self.q_parent, q_new, self.centered, bounds))
        problems = _open_loop_problems(self.cfg, stats)
        if not problems and self.cfg.check_episodes > 0:
            problems = self._closed_loop(pol, stats)
        return stats, problems

    def _closed_loop(self, pol: Any, stats: dict[str, Any]) -> list[str]:
        # Closed loop: the same start states for both, so the paired difference is what the
        # model loses, not which episodes it happened to get.
        cfg = self.cfg
        progress.update(phase=f"{cfg.check_episodes} closed-loop check episodes")
        new_r = rollout(progress.counted(pol.q_values), self.spec, cfg.check_episodes, self.check_episode_seed).returns
        drop = return_drop(self.parent_returns, new_r)
        stats.update(drop, check_episodes=cfg.check_episodes, mean_return=float(new_r.mean()),
                     parent_mean_return=float(self.parent_returns.mean()))
        if drop["return_drop_frac"] > cfg.max_return_drop and drop["return_drop_ci95"][0] > 0:
            return [f"mean return {new_r.mean():.2f} over {cfg.check_episodes} check episodes is "
                    f"{100 * drop['return_drop_frac']:.2f}% below the parent's {self.parent_returns.mean():.2f} "
                    f"(95% CI of the drop {drop['return_drop_ci95'][0]:.2f}..{drop['return_drop_ci95'][1]:.2f}; "
                    f"allowed {100 * cfg.max_return_drop:.2f}%)"]
        return []


def _open_loop_problems(cfg: QuantizeConfig, stats: dict[str, Any]) -> list[str]:
    """The check-state limits ``stats`` break: regret, then the optional agreement and Q-error limits."""
    problems = []
    if stats["regret"] > cfg.max_regret:
        problems.append(f"regret {stats['regret']:.4f} of the parent's action spread > {cfg.max_regret:g}")
    if cfg.min_agreement is not None and stats["agreement"] < cfg.min_agreement:
        problems.append(f"agreement {100 * stats['agreement']:.2f}% < {100 * cfg.min_agreement:.2f}%")
    if cfg.min_decisive_agreement is not None and stats["decisive_agreement"] < cfg.min_decisive_agreement:
        problems.append(f"decisive agreement {100 * stats['decisive_agreement']:.2f}% of "
                        f"{stats['decisive_states']:,} decisive states < {100 * cfg.min_decisive_agreement:.2f}%")
    if cfg.max_q_rel_error is not None and stats["q_rel_error"] > cfg.max_q_rel_error:
        problems.append(f"p99 Q error {stats['q_p99_abs_error']:.4g} is {100 * stats['q_rel_error']:.1f}% of the Q "
                        f"range {stats['q_range']:.4g} (allowed {100 * cfg.max_q_rel_error:.1f}%)")
    return problems


@dataclass(frozen=True)
class _Builder:
    """Converts one candidate (sparse encoding or not, equalization sweeps) to TFLite bytes: snapped
    to 2^bits int8 values when clustered, the output range narrowed when ``score`` is given."""

    cfg: QuantizeConfig
    models: dict[int, Any]
    calibration: np.ndarray | None
    clustered: Any
    score: Any  # None: the converter's output range
    snapped: list[int] = field(default_factory=list)  # the last build's snapped layers

    def __call__(self, sparse: bool, sweeps: int) -> tuple[bytes, float, tuple[float, float] | None]:
        cfg = self.cfg
        progress.update(phase=f"converting ({'sparse' if sparse else 'dense'} encoding, {sweeps} equalization sweeps)")
        content = convert(self.models[sweeps], cfg.mode, self.calibration, cfg.float_io, sparse, cfg.strip_strings,
                          per_layer_weights=self.clustered is not None or cfg.weight_scales == "layer")
        if self.clustered is not None:
            from dqnc import lowbit

            content, self.snapped[:] = lowbit.snap(content, cfg.weight_bits)
        return narrow_output_range(content, self.score) if self.score is not None else (content, 1.0, None)


@dataclass(frozen=True)
class _Choice:
    """The converted model quantize keeps, its check, and how it was chosen."""

    content: bytes
    factor: float  # output range factor
    sweeps: int  # equalization sweeps
    stats: dict[str, Any]
    problems: list[str]
    notes: list[str]
    encoding: str  # the sparsity_encoding metric


def _choose(cfg: QuantizeConfig, checker: _Checker, build: _Builder, sparse: bool) -> _Choice:
    """The candidates in order: each equalization in the chosen encoding, then (auto encoding only)
    the dense encoding when the sparse one fails the check or is not smaller."""
    # int8 rounding decides near-tied actions almost at random, and which rewrite of the weights
    # keeps most of them is an empirical question: each equalization is converted and the one
    # that agrees best with the parent on the selection states is kept (see choose_candidate).
    built = {k: build(sparse, k) for k in (sorted(build.models) if checker.narrow else [0])}
    scores = {k: checker.score(b[0]) for k, b in built.items()} if len(built) > 1 else {0: 0.0}
    sweeps, stats, problems, notes = choose_candidate(scores, lambda k: checker.verify(built[k][0], built[k][2]))
    choice = _Choice(built[sweeps][0], built[sweeps][1], sweeps, stats, problems, notes, "sparse" if sparse else "dense")
    if choice.problems and sparse and cfg.sparse_encoding == "auto":
        choice = _dense_after_failed_sparse(choice, checker, build)
    if not choice.problems and choice.encoding == "sparse" and cfg.sparse_encoding == "auto":
        choice = _dense_if_smaller(choice, checker, build)
    return choice


def _dense_after_failed_sparse(choice: _Choice, checker: _Checker, build: _Builder) -> _Choice:
    # TFLite's sparse int8 kernels mis-compute some layers (measured: a pruned first layer with
    # 4 inputs); the dense encoding of the same weights is the safe fallback.
    dense = {k: build(False, k) for k in dict.fromkeys([choice.sweeps, 0])}
    # The chosen sweeps are checked first (ranked higher), then the unequalized model.
    sweeps, stats, problems, notes = choose_candidate(
        {k: (k == choice.sweeps) for k in dense}, lambda k: checker.verify(dense[k][0], dense[k][2]))
    if problems:
        return choice
    return _Choice(dense[sweeps][0], dense[sweeps][1], sweeps, stats, problems, choice.notes + notes,
                   f"dense (sparse encoding failed the check: {'; '.join(choice.problems)})")


def _dense_if_smaller(choice: _Choice, checker: _Checker, build: _Builder) -> _Choice:
    # The sparse encoding's index arrays cost more than the zeros they drop below ~50-60%
    # sparsity (measured: a 2:4-pruned 128x128 CartPole net, 27,976 B sparse vs 25,904 B dense);
    # auto keeps whichever file is smaller, and dense runs everywhere.
    content, factor, bounds = build(False, choice.sweeps)
    if len(content) > len(choice.content):
        return choice
    stats, problems = checker.verify(content, bounds)
    if problems:
        return choice
    encoding = f"dense (the sparse encoding was not smaller: {len(choice.content):,} vs {len(content):,} B)"
    return dataclasses.replace(choice, content=content, factor=factor, stats=stats, encoding=encoding)


def _metrics(choice: _Choice, sparsity: float, calibration: np.ndarray | None, build: _Builder) -> dict[str, Any]:
    metrics = {
        "size_bytes": len(choice.content),
        "parent_sparsity": sparsity,
        "sparsity_encoding": choice.encoding,
        "check": choice.stats,
        "calibration_states": 0 if calibration is None else int(len(calibration)),
        "output_range_factor": choice.factor,
        "equalization_sweeps": choice.sweeps,
        "notes": choice.notes,
    }
    if build.clustered is not None:
        from dqnc import lowbit

        metrics["weight_bits"] = {**build.clustered.info, "distinct_int8_weights": lowbit.distinct_weights(choice.content),
                                  "snapped_layers": build.snapped}
    return metrics


def _write(out: Path, force: bool, cfg: QuantizeConfig, source: art.Artifact, content: bytes, metrics: dict[str, Any],
           preprocess: dict[str, Any], clustered: bool, command: list[str] | None) -> None:
    io = tensor_types(content)
    with art.atomic_output(out, force) as tmp:
        (tmp / art.TFLITE).write_bytes(content)
        # Clustering fine-tunes by distillation: the outputs are then action scores, whatever the source's were.
        network = {**(source.network or {}), "outputs": "action_scores"} if clustered else source.network
        art.write_manifest(tmp, stage="quantize", env=source.env, network=network, config=cfg.model_dump(mode="json"),
                           metrics=metrics, parent=source, command=command,
                           extra={"quantization": {"mode": cfg.mode, "float_io": cfg.float_io, **io,
                                                   **({"weight_bits": cfg.weight_bits} if clustered else {})},
                                  "preprocess": preprocess or None})


def run(cfg: QuantizeConfig, source: art.Artifact, out: Path, *, force: bool = False,
        command: list[str] | None = None) -> art.Artifact:
    """Quantize ``source`` (a SavedModel artifact) into a checked ``.tflite`` artifact at ``out``."""
    from dqnc.policy import load_keras_model, q_function

    out = Path(out)
    art.check_output(out, force)
    if source.kind != "savedmodel":
        raise UsageError(
            f"{str(source.path)!r} is already a .tflite model: quantize its parent SavedModel instead "
            "(TFLite files cannot be re-quantized)"
        )
    progress.update(phase="loading the parent")
    model = load_keras_model(source.model_path)
    parent_q = q_function(source, model=model)
    calibration = _calibration_states(cfg, parent_q, source.env, model)
    sparsity = _sparsity(model)
    # TFLite Micro has no DENSIFY op and no sparse kernels (tflite-micro#491): auto is dense for mcu.
    sparse = cfg.sparse_encoding == "on" or (cfg.sparse_encoding == "auto" and cfg.target == "linux" and sparsity >= 0.3)
    models, preprocess, clustered = _rewrites(cfg, source, model, calibration, parent_q)
    if calibration is not None and preprocess.get("obs_mean") is not None:
        mean, std = np.asarray(preprocess["obs_mean"]), np.asarray(preprocess["obs_std"])
        calibration = ((calibration - mean) / std).astype(np.float32)
    checker = _Checker(cfg, source, parent_q, preprocess, clustered is not None)
    build = _Builder(cfg, models, calibration, clustered, checker.score if checker.narrow else None)
    choice = _choose(cfg, checker, build, sparse)
    if choice.problems:
        raise GateFailed(f"{cfg.mode} model strays from its parent on {cfg.check_states:,} held-out states: "
                         + "; ".join(choice.problems) + "; nothing written (try int16x8, or fine-tune the parent)",
                         {"mode": cfg.mode, "check": choice.stats})
    metrics = _metrics(choice, sparsity, calibration, build)
    _write(out, force, cfg, source, choice.content, metrics, preprocess, clustered is not None, command)
    return art.load(out)
