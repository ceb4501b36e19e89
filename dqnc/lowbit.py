"""4-bit and 2-bit weights: weight clustering, TFLite Micro look-up-table compression, packed C.

A layer whose kernel takes at most 2^bits distinct values can be stored as bits-wide indices into
a table of those values. dqnc gets there in three steps:

1. **Clustering** (``dqnc quantize --weight-bits 4|2``): every Dense kernel is wrapped with TFMOT's
   ``cluster_weights`` (16 or 4 clusters per layer, k-means++ initialization) and fine-tuned by
   the distillation loop of :mod:`dqnc.distillation` against the source policy, then stripped.
   Training runs in the coordinates the int8 model is built in (inputs standardized, as
   :func:`dqnc.quantize.prepare_for_integer` folds them; outputs scaled by one scalar), so nothing
   folded in afterwards multiplies a kernel by a per-row or per-column factor and splits a cluster.
   TFMOT clusters Dense kernels per layer only (its ``cluster_per_channel`` applies to Conv2D),
   and the students are dense, so ``preserve_sparsity`` has nothing to keep.
2. **int8 with one scale per layer**: the converter quantizes Dense kernels per output channel by
   default, which maps one cluster centroid to a different int8 value in every channel (measured
   on CartPole's 16x16 student clustered to 16 values: 33, 59 and 16 distinct int8 values in its
   three kernels; to 4 values: 7, 6, 4). With one scale per kernel a centroid maps to exactly one
   int8 value, so the int8 kernel has at most 2^bits values (16/16/16 and 4/4/4), and the
   per-channel scale and zero-point arrays leave the file too (2,832 -> 2,096 bytes).
   :func:`snap` checks the count and, should a kernel ever exceed it, snaps it.
3. **Forms**: the plain int8 file (every runtime runs it; same size as int8), the LUT-compressed
   file (``tflite_micro.compression``: packed indices plus one value table per layer, decoded by
   TFLM's DECODE operator into the arena at start-up), and the C policy with packed indices and
   a per-layer int8 table (:mod:`dqnc.cpolicy`).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from dqnc.errors import DqncError, UsageError
# Moved: the reader tells whether a model is LUT-compressed; the LiteRT runtime refuses one.
from dqnc.runtimes.litert import decode_refusal  # noqa: F401
from dqnc.tflite_model import uses_decode  # noqa: F401

# DAgger rounds of the fine-tuning. It runs at the distillation's own step size: at 0.3x of it,
# CartPole's 2-bit student kept a validation return of 64 (of 500); at 1x, 500 (20 episodes).
DAGGER_ROUNDS = 2


class LowBitError(DqncError):
    """A weight tensor holds more values than its index width can address: a dqnc bug (exit 3)."""

    exit_code = 3


# --- 1. clustering ---------------------------------------------------------------------------


def _distill_settings(source: Any, seed: int, steps: int) -> Any:
    """The distillation settings that made ``source`` where it is a distilled student (its loss
    matters: LunarLander's recipe uses the hinge loss), else the distill stage's defaults."""
    from dqnc.config import DistillConfig

    made_by = source.manifest.get("config") or {}
    fields = DistillConfig.model_fields
    known = {k: v for k, v in made_by.items() if k in fields and k not in ("hidden", "widths", "depth")} \
        if source.stage in ("distill", "prune") else {}
    return DistillConfig(**{**known, "seed": seed, "steps": steps})


def _effective(model: Any) -> list[np.ndarray]:
    """The weights a (possibly cluster-wrapped) Dense chain computes with: centroids[indices]."""
    from dqnc.qnet.weights import effective_weights

    return [np.asarray(a, np.float32) for a in effective_weights(model)]


@dataclass
class Clustered:
    model: Any  # a plain tf_keras MLP in the int8 model's coordinates (standardized inputs)
    weights: list[np.ndarray]
    preprocess: dict[str, Any]
    info: dict[str, Any]


def cluster(source: Any, model: Any, calibration: np.ndarray, bits: int, steps: int, seed: int,
            teacher_q: Any) -> Clustered:
    """Cluster every Dense kernel of ``model`` (a plain MLP) to at most 2^bits values, fine-tuned
    by distillation against ``teacher_q``; ``calibration`` (raw observations) sets the input
    standardization, as :func:`dqnc.quantize.prepare_for_integer` does."""
    from dqnc.distillation import Normalizer, Trainer, dagger, teacher_states
    from dqnc.keras import keras, tf, tfmot
    from dqnc.nets import NetSpec, build_plain_mlp
    from dqnc.qnet.fold import center_q
    from dqnc.qnet.weights import plain_mlp_weights as mlp_weights

    mlp = mlp_weights(model)
    if mlp is None:
        raise UsageError("--weight-bits 4|2 clusters plain Dense MLPs; this model has other layers "
                         "(quantize it with --weight-bits 8)")
    raw, acts = mlp
    if len(set(acts)) > 1:
        raise UsageError("--weight-bits 4|2 needs one hidden activation throughout")
    k = 2 ** bits
    s = _distill_settings(source, seed, steps)
    keras().utils.set_random_seed(seed)
    tf().config.experimental.enable_op_determinism()
    env = source.env
    states, q_t = teacher_states(teacher_q, env, s.states, s)
    fitted = Normalizer.fit(states, q_t, advantages=s.value_weight == 0)
    mean = calibration.mean(axis=0).astype(np.float64)
    std = calibration.std(axis=0).astype(np.float64)
    std = np.where(std > 1e-6, std, 1.0)
    norm = Normalizer(mean, std, fitted.q_mean, fitted.q_std)
    w = norm.to_normalized(raw)
    # Remove the offset all actions share (as prepare_for_integer does): the greedy action is the same.
    w[-2], w[-1] = center_q(w[-2], w[-1])
    spec = NetSpec(int(raw[0].shape[0]), int(raw[-2].shape[1]), tuple(int(a.shape[1]) for a in raw[0:-2:2]), acts[0] if acts else "relu")
    plain = build_plain_mlp(spec, w)
    cl = tfmot().clustering.keras
    clustered_layers: list[str] = []

    def wrap(layer: Any) -> Any:
        if type(layer).__name__ == "Dense" and layer.kernel.shape.num_elements() > k:
            clustered_layers.append(layer.name)
            return cl.cluster_weights(layer, number_of_clusters=k,
                                      cluster_centroids_init=cl.CentroidInitialization.KMEANS_PLUS_PLUS)
        return layer  # a kernel of <= k weights holds <= k values already

    wrapped = keras().models.clone_model(plain, clone_function=wrap)
    before = _effective(wrapped)
    trainer = Trainer(wrapped, s, env.n_actions, jit=True)
    res = dagger(trainer, lambda: _effective(wrapped), list(acts), teacher_q, norm, states, q_t, env, s,
                 first_steps=steps, rounds=DAGGER_ROUNDS, round_steps=max(1, steps // 2),
                 extra_states=max(64, s.states // 4))
    stripped = cl.strip_clustering(wrapped)
    out = mlp_weights(stripped)[0]  # type: ignore[index]
    after = _effective(wrapped)
    for a, b in zip(out, after):
        if not np.array_equal(a, b):
            raise LowBitError("strip_clustering changed the clustered weights: a dqnc bug, please report it")
    # Back to the int8 model's coordinates: only the last layer carries the scalar output scale,
    # which multiplies every centroid alike (the clusters stay clusters).
    out[-2], out[-1] = out[-2] * norm.q_std, out[-1] * norm.q_std
    out[-1] = out[-1] - out[-1].mean()
    counts = [int(len(np.unique(a))) for a in out[0::2]]
    if max(counts) > k:
        raise LowBitError(f"clustered kernels hold {counts} distinct values, more than {k}: a dqnc bug")
    info = {"weight_bits": bits, "clusters": k, "clustered_layers": clustered_layers,
            "distinct_float_weights": counts, "finetune_steps": res.steps, "finetune_states": res.states,
            "distill_loss": s.distill_loss, "loss_history": [round(v, 5) for v in res.history[-3:]],
            "initial_distinct": [int(len(np.unique(a))) for a in before[0::2]]}
    pre = {"obs_mean": mean.tolist(), "obs_std": std.tolist(), "outputs": "action_scores"}
    out = [a.astype(np.float32) for a in out]
    return Clustered(build_plain_mlp(spec, out), out, pre, info)


# --- 2. int8 kernels with at most 2^bits values ------------------------------------------------


def _fc_weight_tensors(model: Any) -> list[int]:
    """The kernel tensor of each FULLY_CONNECTED op of a schema ``ModelT``, in execution order."""
    from dqnc.tflite_model import op_names

    sg = model.subgraphs[0]
    return [int(op.inputs[1]) for op, name in zip(sg.operators, op_names(model)) if name == "FULLY_CONNECTED"]


def _tensor_array(model: Any, index: int) -> np.ndarray:
    t = model.subgraphs[0].tensors[index]
    data = model.buffers[t.buffer].data
    return np.frombuffer(bytes(np.asarray(data, np.uint8)), np.int8).reshape([int(d) for d in t.shape])


def fc_weight_tensors(content: bytes) -> list[int]:
    """The kernel tensor index of each FULLY_CONNECTED op, in execution order."""
    from dqnc.tflite_model import read_model

    return _fc_weight_tensors(read_model(content))


def fc_kernels(content: bytes) -> list[np.ndarray]:
    """The int8 kernel of each FULLY_CONNECTED op, in execution order."""
    from dqnc.tflite_model import read_model

    model = read_model(content)
    return [_tensor_array(model, i) for i in _fc_weight_tensors(model)]


def distinct_weights(content: bytes) -> list[int]:
    """Distinct int8 values of each FULLY_CONNECTED kernel, in execution order."""
    return [int(len(np.unique(w))) for w in fc_kernels(content)]


def _snap_values(w: np.ndarray, k: int) -> np.ndarray:
    """1-D k-means (Lloyd, quantile start) on the int8 values of ``w``, centroids rounded to int8."""
    values = w.astype(np.float64).ravel()
    centroids = np.unique(np.quantile(values, (np.arange(k) + 0.5) / k))
    for _ in range(50):
        assign = np.abs(values[:, None] - centroids[None]).argmin(axis=1)
        new = np.array([values[assign == j].mean() if (assign == j).any() else centroids[j] for j in range(len(centroids))])
        if np.allclose(new, centroids):
            break
        centroids = new
    table = np.clip(np.rint(centroids), -127, 127)
    return table[np.abs(values[:, None] - table[None]).argmin(axis=1)].astype(np.int8).reshape(w.shape)


def snap(content: bytes, bits: int) -> tuple[bytes, list[int]]:
    """Make every FULLY_CONNECTED kernel hold at most 2^bits int8 values (a no-op for per-layer
    scales on clustered weights); returns the model and the kernels snapped (their op indices)."""
    from dqnc.tflite_model import read_model

    model = read_model(content)
    k = 2 ** bits
    snapped = []
    for n, i in enumerate(_fc_weight_tensors(model)):
        w = _tensor_array(model, i)
        if len(np.unique(w)) > k:
            model.buffers[model.subgraphs[0].tensors[i].buffer].data = np.frombuffer(_snap_values(w, k).tobytes(), np.uint8)
            snapped.append(n)
    return (content if not snapped else _build(model)), snapped


def _build(model: Any) -> bytes:
    from dqnc.tflite_model import write_model

    return write_model(model)


# --- 3. TFLite Micro look-up-table compression ----------------------------------------------------

LUT_SUFFIX = "_lut"


def lut_compress(content: bytes, bits: int) -> bytes:
    """The model with every FULLY_CONNECTED kernel stored as ``bits``-wide indices plus one int8
    value table per layer (``tflite_micro.compression``; TFLM's DECODE op expands them)."""
    try:
        from tflite_micro import compression
        from tflite_micro.tensorflow.lite.micro.compression import spec

        spec.PerTensor  # noqa: B018 - the per-tensor/per-channel spec API of late 2025 releases
    except (ImportError, AttributeError) as e:
        raise UsageError(f"LUT compression needs a newer tflite-micro ({e}): pip install -U tflite-micro") from None

    from dqnc.tflite_model import read_model

    model = read_model(content)
    builder = compression.SpecBuilder()
    k = 2 ** bits
    for i in _fc_weight_tensors(model):
        if len(np.unique(_tensor_array(model, i))) > k:
            raise UsageError(f"tensor {i} holds more than {k} int8 values: LUT compression at {bits} bits needs a model "
                             f"quantized with --weight-bits {bits}")
        builder.add_tensor(subgraph=0, tensor=i).with_lut(index_bitwidth=bits, mode=spec.PerTensor())
    # The compressor prints a warning when fewer bits would do and warns when a tensor grows.
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bytes(compression.compress(content, builder.build()))


def decode_lut(compressed: bytes) -> dict[int, np.ndarray]:
    """Read a LUT-compressed model back without TFLM: each DECODE op's output tensor index ->
    the int8 array its packed indices and value table stand for (per-tensor or per-channel)."""
    from dqnc.tflite_model import read_model

    model = read_model(compressed)
    sg = model.subgraphs[0]
    out: dict[int, np.ndarray] = {}
    for op in sg.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if getattr(code, "customCode", None) not in (b"TFLM_DECODE", "TFLM_DECODE"):
            continue
        ins, outs = list(op.inputs), list(op.outputs)
        for enc_i, anc_i, out_i in zip(ins[0::2], ins[1::2], outs):
            enc = bytes(np.asarray(model.buffers[sg.tensors[enc_i].buffer].data, np.uint8))
            anc = bytes(np.asarray(model.buffers[sg.tensors[anc_i].buffer].data, np.uint8))
            # DCM: byte 0 decode type (0 = LUT), byte 4 LUT version, byte 5 axis<<4 | bitwidth,
            # byte 6 value-table stride; the tables follow the 16-byte header.
            if anc[0] != 0 or anc[4] != 1:
                raise LowBitError(f"DECODE tensor {out_i}: not a version-1 LUT (type {anc[0]}, version {anc[4]})")
            bitwidth, axis, stride = anc[5] & 0x07, anc[5] >> 4, anc[6]
            shape = [int(d) for d in sg.tensors[out_i].shape]
            n = int(np.prod(shape))
            bits_ = np.unpackbits(np.frombuffer(enc, np.uint8))[: n * bitwidth].reshape(n, bitwidth)
            idx = (bits_ * (1 << np.arange(bitwidth - 1, -1, -1))).sum(axis=1)  # big-endian bit order
            tables = np.frombuffer(anc[16:], np.int8).reshape(-1, stride)
            if axis == 0xF:
                values = tables[0][idx]
            else:
                per = np.moveaxis(np.arange(n).reshape(shape), axis, 0).reshape(shape[axis], -1)
                values = np.empty(n, np.int8)
                for c in range(shape[axis]):
                    values[per[c]] = tables[c][idx[per[c]]]
            out[out_i] = values.reshape(shape)
    return out


# --- which runtimes run a form (measured) --------------------------------------------------------

def runtime_check(content: bytes, xq: np.ndarray, expected: np.ndarray) -> dict[str, str]:
    """Load ``content`` in each registered runtime that loads .tflite files and run the int8 inputs
    ``xq``: "ran" when every int8 output equals ``expected`` (TFLM, or any runtime in exact
    agreement), "ran (N outputs differ)" when it runs with other rounding, else the first line of
    why it could not (import or load error)."""
    from dqnc.runtimes import RUNTIMES

    found: dict[str, str] = {}
    for name, rt in list(RUNTIMES.items()):
        if not rt.loads_tflite:
            continue
        try:
            if rt.available():
                raise ImportError(name)
            pol = rt.open(content, None)
            raw = np.stack([np.array(pol.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])
        except ImportError:
            found[name] = "not installed"
            continue
        except Exception as e:  # noqa: BLE001 - every failure means the same here: it did not run
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            found[name] = f"no: {text[:160]}"
            continue
        diff = int((raw != expected).sum())
        found[name] = "ran" if diff == 0 else f"ran ({diff} int8 outputs differ from TFLM)"
    return found
