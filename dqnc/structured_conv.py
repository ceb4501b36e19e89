"""Structured pruning of conv nets: remove whole conv filters and Dense units, physically.

Called by the prune stage for ``structure: units`` on a conv net. Each conv layer loses output
filters (and the next layer the channels it read), each hidden Dense layer units, so the result is
a dense, narrower conv net: every runtime (TFLite Micro and ``policy.c`` included) runs it at full
speed and its int8 file shrinks with the parameters. Most of a MinAtar net's bytes sit in the
Dense layer after the flatten (16 filters x 8 x 8 positions x 128 units), and a removed filter
takes its 64 rows of that layer with it.

As for MLPs (:mod:`dqnc.structured`), ``unit_rounds`` rounds each remove the least important
filters/units so the widths shrink geometrically to ``(1 - sparsity)``, then fine-tune by
distillation from the unpruned teacher (only its targets scaled: :class:`OutputNormalizer`), DAgger
rounds after the last. Importance over the distillation states:

- ``taylor``: Molchanov et al. (2017, ICLR) criterion Θ_TE: per state, the mean over a feature
  map's positions of ``z * dL/dz``, in absolute value, averaged over states; for a Dense unit,
  ``mean |z * dL/dz|``;
- ``magnitude``: the L2 norm of the filter's (unit's) incoming weights times that of the outgoing
  weights that read it.

A removed filter's mean activation (per position, where the next layer is the Dense after the
flatten; its spatial mean, where it is another conv) is folded into the next layer's bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dqnc.config import PruneConfig
from dqnc.distillation import OutputNormalizer, Trainer, dagger, make_loss
from dqnc.envs import EnvSpec, QFunction
from dqnc.errors import UsageError
from dqnc.qnet import QNetSpec
from dqnc.qnet.forward import act, conv2d

BATCH = 2048  # states per importance / mean-activation batch


def _nhwc(spec: QNetSpec, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(-1, *spec.obs_shape)
    return x.transpose(0, 2, 3, 1) if spec.layout == "CHW" else x


def hidden_outputs(spec: QNetSpec, weights: list[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """Post-activation outputs of every conv (NHWC) and hidden Dense layer for images ``x``."""
    h, out = _nhwc(spec, x), []
    n_conv = len(spec.conv)
    for i in range(len(weights) // 2 - 1):
        w, b = weights[2 * i], weights[2 * i + 1]
        if i < n_conv:
            h = act(conv2d(np.ascontiguousarray(h), w, b, spec.strides[i]), spec.activations[i])
        else:
            h = act((h.reshape(len(h), -1) @ w + b).astype(np.float32), spec.activations[i])
        out.append(h)
    return out


def mean_outputs(spec: QNetSpec, weights: list[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
    """The mean of :func:`hidden_outputs` over ``x`` (per position for conv layers), in batches."""
    sums: list[np.ndarray] | None = None
    for i in range(0, len(x), BATCH):
        outs = hidden_outputs(spec, weights, x[i:i + BATCH])
        part = [o.sum(axis=0, dtype=np.float64) for o in outs]
        sums = part if sums is None else [s + p for s, p in zip(sums, part)]
    assert sums is not None
    return [s / len(x) for s in sums]


def _outgoing(weights: list[np.ndarray], spec: QNetSpec, i: int) -> np.ndarray:
    """The weights reading layer ``i``'s channels/units, as ``[channels, ...]``."""
    nxt = weights[2 * i + 2]
    if i < len(spec.conv) - 1:
        return nxt.transpose(2, 0, 1, 3).reshape(nxt.shape[2], -1)
    if i == len(spec.conv) - 1:
        h, w, c = spec.feature_shapes()[-1]
        return nxt.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c, -1)
    return nxt


def _taylor(spec: QNetSpec, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, cfg: PruneConfig) -> list[np.ndarray]:
    from dqnc.keras import tf

    t = tf()
    loss_fn = make_loss(cfg, spec.n_actions)
    fns = {"relu": t.nn.relu, "tanh": t.tanh, "elu": t.nn.elu, "linear": lambda v: v}
    w = [t.constant(a) for a in weights]
    n_conv, n_hidden = len(spec.conv), len(weights) // 2 - 1
    totals = [np.zeros(weights[2 * i + 1].shape[0]) for i in range(n_hidden)]
    for start in range(0, len(x), BATCH):
        with t.GradientTape() as tape:
            h, hs = t.constant(_nhwc(spec, x[start:start + BATCH])), []
            for i in range(n_hidden):
                if i < n_conv:
                    h = t.nn.conv2d(h, w[2 * i], spec.strides[i], "VALID") + w[2 * i + 1]
                else:
                    h = t.matmul(t.reshape(h, (t.shape(h)[0], -1)), w[2 * i]) + w[2 * i + 1]
                h = fns[spec.activations[i]](h)
                tape.watch(h)
                hs.append(h)
            q = t.matmul(t.reshape(h, (t.shape(h)[0], -1)), w[-2]) + w[-1]
            loss = t.reduce_sum(loss_fn(t.constant(y[start:start + BATCH]), q))
        for i, (z, g) in enumerate(zip(hs, tape.gradient(loss, hs))):
            zg = (z * g).numpy()
            totals[i] += (np.abs(zg.mean(axis=(1, 2))) if i < n_conv else np.abs(zg)).sum(axis=0)
    return [s / len(x) for s in totals]


def importance(spec: QNetSpec, weights: list[np.ndarray], x: np.ndarray, y: np.ndarray, cfg: PruneConfig) -> list[np.ndarray]:
    """One score per filter of every conv layer and per unit of every hidden Dense layer."""
    if cfg.importance == "taylor":
        return _taylor(spec, weights, x, y, cfg)
    n_hidden = len(weights) // 2 - 1
    incoming = [np.linalg.norm(weights[2 * i].reshape(-1, weights[2 * i].shape[-1]), axis=0) for i in range(n_hidden)]
    return [incoming[i] * np.linalg.norm(_outgoing(weights, spec, i), axis=1) for i in range(n_hidden)]


def _drop_into_bias(weights: list[np.ndarray], spec: QNetSpec, i: int, mean: np.ndarray, drop: np.ndarray) -> None:
    """Add the removed channels'/units' mean contribution to layer ``i + 1``'s bias (in place)."""
    nxt = weights[2 * i + 2]
    n_conv = len(spec.conv)
    if i < n_conv - 1:  # conv -> conv: the spatial mean of each removed map through the kernel
        weights[2 * i + 3] = weights[2 * i + 3] + np.einsum("c,hwco->o", mean.mean(axis=(0, 1))[drop], nxt[:, :, drop, :])
    elif i == n_conv - 1:  # conv -> Dense: the exact per-position mean through the rows it feeds
        h, w, c = mean.shape
        rows = nxt.reshape(h, w, c, -1)[:, :, drop, :]
        weights[2 * i + 3] = weights[2 * i + 3] + np.einsum("hwc,hwco->o", mean[:, :, drop], rows)
    else:
        weights[2 * i + 3] = weights[2 * i + 3] + mean[drop] @ nxt[drop]


def remove(spec: QNetSpec, weights: list[np.ndarray], x: np.ndarray, keep: list[np.ndarray]) -> tuple[QNetSpec, list[np.ndarray]]:
    """Keep the filters/units ``keep[i]`` of hidden layer ``i``; the narrower spec and weights."""
    w = [np.array(a, np.float64) for a in weights]
    n_conv = len(spec.conv)
    for i, idx in enumerate(keep):
        cur = _spec_of(spec, w)
        mean = mean_outputs(cur, [a.astype(np.float32) for a in w], x)[i]
        drop = np.setdiff1d(np.arange(w[2 * i + 1].shape[0]), idx)
        _drop_into_bias(w, cur, i, mean, drop)
        w[2 * i], w[2 * i + 1] = w[2 * i][..., idx], w[2 * i + 1][idx]
        nxt = w[2 * i + 2]
        if i < n_conv - 1:
            w[2 * i + 2] = nxt[:, :, idx, :]
        elif i == n_conv - 1:
            h, ww, c = cur.feature_shapes()[-1]
            w[2 * i + 2] = nxt.reshape(h, ww, c, -1)[:, :, idx, :].reshape(-1, nxt.shape[1])
        else:
            w[2 * i + 2] = nxt[idx]
    out = [a.astype(np.float32) for a in w]
    return _spec_of(spec, out), out


def _spec_of(spec: QNetSpec, weights: list[np.ndarray]) -> QNetSpec:
    """``spec`` with the filter and unit counts of ``weights``."""
    n_conv = len(spec.conv)
    conv = tuple((int(weights[2 * i].shape[3]), k, s) for i, (_, k, s) in enumerate(spec.conv))
    hidden = tuple(int(weights[2 * i].shape[1]) for i in range(n_conv, len(weights) // 2 - 1))
    return QNetSpec(spec.obs_shape, spec.n_actions, spec.layout, conv, hidden, spec.activations)


def layer_names(spec: QNetSpec) -> list[str]:
    """The names ``layer_sparsity`` uses: Keras' ``conv_i`` and ``dense_i`` of dqnc's conv nets."""
    return [f"conv_{i}" for i in range(len(spec.conv))] + [f"dense_{i}" for i in range(len(spec.hidden))]


def target_widths(spec: QNetSpec, cfg: PruneConfig) -> list[int]:
    names = layer_names(spec)
    unknown = sorted(set(cfg.layer_sparsity) - set(names))
    if unknown:
        raise UsageError(f"no conv or hidden Dense layer named {unknown[0]!r}: they are {', '.join(names)}")
    widths = [c[0] for c in spec.conv] + list(spec.hidden)
    return [max(1, int(round(w * (1 - cfg.layer_sparsity.get(n, cfg.sparsity))))) for w, n in zip(widths, names)]


@dataclass
class Shrunk:
    spec: QNetSpec
    weights: list[np.ndarray]  # target-normalized coordinates
    history: list[float]
    widths_by_round: list[list[int]]


def shrink(cfg: PruneConfig, spec: QNetSpec, teacher_w: list[np.ndarray], teacher_q: QFunction, env: EnvSpec,
           norm: OutputNormalizer, states: np.ndarray, q_t: np.ndarray) -> Shrunk:
    """``unit_rounds`` rounds of removing filters and units, each followed by distillation."""
    from dqnc.qnet.keras_build import im2col_pays, use_im2col

    final = target_widths(spec, cfg)
    start = [c[0] for c in spec.conv] + list(spec.hidden)
    y = norm.q(q_t)
    rounds = cfg.unit_rounds if cfg.finetune == "distill" else 1
    round_steps = max(1, cfg.epochs * int(np.ceil(len(states) / cfg.batch_size)) // rounds)
    out = Shrunk(spec, norm.to_normalized(teacher_w), [], [])
    for r in range(rounds):
        widths = [max(f, int(round(s * (f / s) ** ((r + 1) / rounds)))) for s, f in zip(start, final)]
        scores = importance(out.spec, out.weights, states, y, cfg)
        keep = [np.sort(np.argsort(-s, kind="stable")[:w]) for s, w in zip(scores, widths)]
        out.spec, out.weights = remove(out.spec, out.weights, states, keep)
        out.widths_by_round.append(widths)
        if cfg.finetune != "distill":
            continue
        model = out.spec.build_plain(out.weights)
        fast = im2col_pays(out.spec)
        if fast:
            use_im2col(model)
        trainer = Trainer(model, cfg, env.n_actions, jit=fast)
        last = r == rounds - 1
        res = dagger(trainer, model.get_weights, [], teacher_q, norm, states, q_t, env, cfg,
                     first_steps=round_steps, rounds=cfg.dagger_rounds if last else 0,
                     round_steps=lambda n: max(1, cfg.epochs // 2) * int(np.ceil(n / cfg.batch_size)),
                     extra_states=max(64, cfg.states // 2), student_policy=out.spec.numpy)
        out.history += res.history
        out.weights = model.get_weights()
    return out


def run_conv(cfg: PruneConfig, spec: QNetSpec, teacher_w: list[np.ndarray], teacher_q: QFunction,
             env: EnvSpec) -> tuple[QNetSpec, list[np.ndarray], dict[str, Any]]:
    """Prune ``teacher_w`` (plain conv weights of ``spec``); the narrower spec, raw weights, and metrics."""
    from dqnc.distillation import teacher_states

    if cfg.finetune == "rl":
        raise UsageError("--structure units fine-tunes by distillation: use --finetune distill (or none)")
    states, q_t = teacher_states(teacher_q, env, cfg.states, cfg)
    states = states.reshape(len(states), *spec.obs_shape)
    norm = OutputNormalizer.fit(states.reshape(len(states), -1), q_t, advantages=cfg.value_weight == 0)
    shrunk = shrink(cfg, spec, teacher_w, teacher_q, env, norm, states, q_t)
    raw = norm.to_raw(shrunk.weights)
    metrics = {"structure": "units", "importance": cfg.importance,
               "filters_before": [c[0] for c in spec.conv], "filters_after": [c[0] for c in shrunk.spec.conv],
               "widths_before": list(spec.hidden), "widths_after": list(shrunk.spec.hidden),
               "widths_by_round": shrunk.widths_by_round, "params_before": spec.params(), "params": shrunk.spec.params(),
               "params_removed_frac": 1 - shrunk.spec.params() / spec.params(), "loss_history": shrunk.history[-5:]}
    return shrunk.spec, raw, metrics
