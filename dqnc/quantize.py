"""The quantize stage: SavedModel artifact -> verified ``.tflite`` artifact.

Modes:
- ``int8``: full-integer (int8 kernels and activations, int8 input/output unless ``float_io``),
  calibrated on observations from rollouts of the input policy itself;
- ``int16x8``: int16 activations, int8 weights;
- ``float16``: float16 weights;
- ``dynamic``: int8 weights, float activations (no calibration);
- ``fp32``: a plain float conversion (what ``export`` uses for SavedModel inputs).

Sparse kernels keep their zeros (the converter's sparsity optimization). Before anything is
written, the converted model is compared with its input on held-out states; a result beyond
tolerance raises GateFailed with the numbers (exit 1) and writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc.compare import agreement
from dqnc.config import QuantizeConfig
from dqnc.envs import collect_states
from dqnc.errors import GateFailed, UsageError

HELDOUT_SEED_OFFSET = 500_000  # check states come from episodes calibration never saw


def _sparsity(model: Any) -> float:
    kernels = [l.get_weights()[0] for l in model.layers if l.get_weights()]
    total = sum(k.size for k in kernels)
    return 1.0 - sum(int(np.count_nonzero(k)) for k in kernels) / total if total else 0.0


def convert(model: Any, mode: str, calibration: np.ndarray | None = None, float_io: bool = False,
            sparse: bool = False) -> bytes:
    """Convert a tf_keras model to TFLite bytes in the given mode."""
    from dqnc.keras import tf

    t = tf()
    conv = t.lite.TFLiteConverter.from_keras_model(model)
    opts = []
    if mode != "fp32":
        opts.append(t.lite.Optimize.DEFAULT)
    if sparse:
        opts.append(t.lite.Optimize.EXPERIMENTAL_SPARSITY)
    conv.optimizations = opts
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
            return bytes(conv.convert())
    except Exception as e:  # the converter raises many types; all mean the same to a user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"TFLite conversion ({mode}) failed: {first[:300]}") from e


def tensor_types(content: bytes) -> dict[str, Any]:
    """Input/output dtypes and quantization, and how many tensors of each dtype the model holds."""
    from dqnc.runtime import Policy

    pol = Policy(model_content=content)
    counts: dict[str, int] = {}
    for d in pol.interpreter.get_tensor_details():
        name = np.dtype(d["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return {**pol.io(), "tensor_dtypes": counts}


def prepare_for_integer(model: Any, states: np.ndarray) -> tuple[Any, dict[str, Any]]:
    """Fold per-feature observation standardization into the first layer and remove the
    per-state Q offset in the last, so one per-tensor int8 scale fits both ends.

    Raw observations differ in scale by 10x or more (CartPole: pole angle std ~0.02, cart position
    ~0.3), and Q-values share a large offset (~1/(1-gamma)) above small differences between
    actions. Standardizing inputs and outputting ``Q - mean_a(Q)`` changes no greedy action.
    Returns the rewritten model and the preprocessing the runtime must apply.
    """
    from dqnc.nets import NetSpec, build_plain_mlp
    from dqnc.policy import mlp_weights

    mlp = mlp_weights(model)
    if mlp is None:
        return model, {}
    weights, acts = mlp
    if len(set(acts)) > 1:
        return model, {}
    weights = [np.asarray(w, np.float64) for w in weights]
    mean = states.mean(axis=0).astype(np.float64)
    std = states.std(axis=0).astype(np.float64)
    std = np.where(std > 1e-6, std, 1.0)
    w0, b0 = weights[0], weights[1]
    weights[0], weights[1] = w0 * std[:, None], b0 + mean @ w0
    wl, bl = weights[-2], weights[-1]
    weights[-2], weights[-1] = wl - wl.mean(axis=1, keepdims=True), bl - bl.mean()
    spec = NetSpec(int(w0.shape[0]), int(wl.shape[1]), tuple(int(w.shape[1]) for w in weights[0:-2:2]),
                   acts[0] if acts else "relu")
    rewritten = build_plain_mlp(spec, [w.astype(np.float32) for w in weights])
    return rewritten, {"obs_mean": mean.tolist(), "obs_std": std.tolist(), "outputs": "centered_q_values"}


def run(cfg: QuantizeConfig, source: art.Artifact, out: Path, *, force: bool = False,
        command: list[str] | None = None) -> art.Artifact:
    """Quantize ``source`` (a SavedModel artifact) into a checked ``.tflite`` artifact at ``out``."""
    from dqnc.policy import load_keras_model, q_function
    from dqnc.runtime import Policy

    out = Path(out)
    art.check_output(out, force)
    if source.kind != "savedmodel":
        raise UsageError(
            f"{str(source.path)!r} is already a .tflite model: quantize its parent SavedModel instead "
            "(TFLite files cannot be re-quantized)"
        )
    model = load_keras_model(source.model_path)
    parent_q = q_function(source, model=model)
    spec = source.env
    calibration = None
    if cfg.mode in ("int8", "int16x8"):
        calibration = collect_states(parent_q, spec, cfg.calibration_states, cfg.seed, cfg.calibration_epsilon)
    sparsity = _sparsity(model)
    sparse = cfg.sparse_encoding == "on" or (cfg.sparse_encoding == "auto" and sparsity >= 0.3)
    preprocess: dict[str, Any] = {}
    if calibration is not None:
        model, preprocess = prepare_for_integer(model, calibration)
        if preprocess:
            mean, std = np.asarray(preprocess["obs_mean"]), np.asarray(preprocess["obs_std"])
            calibration = ((calibration - mean) / std).astype(np.float32)
    check = collect_states(parent_q, spec, cfg.check_states, cfg.seed + HELDOUT_SEED_OFFSET, cfg.calibration_epsilon)
    q_parent = parent_q(check)
    centered = preprocess.get("outputs") == "centered_q_values"

    def verify(content: bytes) -> tuple[dict[str, Any], list[str]]:
        try:
            policy = Policy(model_content=content, obs_mean=preprocess.get("obs_mean"), obs_std=preprocess.get("obs_std"))
        except (RuntimeError, ValueError) as e:
            return {}, [f"the runtime cannot load the converted model ({str(e).splitlines()[0][:120]})"]
        stats = agreement(q_parent, policy.q_values(check), centered=centered)
        problems = []
        if stats["decisive_agreement"] < cfg.min_decisive_agreement:
            problems.append(f"greedy agreement on decisive states {100 * stats['decisive_agreement']:.2f}% < "
                            f"{100 * cfg.min_decisive_agreement:.2f}%")
        if stats["q_rel_error"] > cfg.max_q_rel_error:
            problems.append(f"p99 Q error {stats['q_p99_abs_error']:.4g} is {100 * stats['q_rel_error']:.1f}% of the Q range "
                            f"{stats['q_range']:.4g} (allowed {100 * cfg.max_q_rel_error:.1f}%)")
        return stats, problems

    content = convert(model, cfg.mode, calibration, cfg.float_io, sparse)
    stats, problems = verify(content)
    encoding_note = "sparse" if sparse else "dense"
    if problems and sparse and cfg.sparse_encoding == "auto":
        # TFLite's sparse int8 kernels mis-compute some layers (measured: a pruned first layer with
        # 4 inputs); the dense encoding of the same weights is the safe fallback.
        dense_content = convert(model, cfg.mode, calibration, cfg.float_io, False)
        dense_stats, dense_problems = verify(dense_content)
        if not dense_problems:
            encoding_note = f"dense (sparse encoding failed the check: {'; '.join(problems)})"
            content, stats, problems = dense_content, dense_stats, dense_problems
    result = {"mode": cfg.mode, "check": stats}
    if problems:
        raise GateFailed(f"{cfg.mode} model strays from its parent on {cfg.check_states:,} held-out states: "
                         + "; ".join(problems) + "; nothing written (try int16x8, or fine-tune the parent)", result)

    io = tensor_types(content)
    metrics = {
        "size_bytes": len(content),
        "parent_sparsity": sparsity,
        "sparsity_encoding": encoding_note,
        "check": stats,
        "calibration_states": 0 if calibration is None else int(len(calibration)),
    }
    with art.atomic_output(out, force) as tmp:
        (tmp / art.TFLITE).write_bytes(content)
        art.write_manifest(tmp, stage="quantize", env=spec, network=source.network, config=cfg.model_dump(mode="json"),
                           metrics=metrics, parent=source, command=command,
                           extra={"quantization": {"mode": cfg.mode, "float_io": cfg.float_io, **io},
                                  "preprocess": preprocess or None})
    return art.load(out)
