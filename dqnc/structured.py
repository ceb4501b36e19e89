"""Structured pruning: remove whole hidden units and physically shrink the Dense layers.

Called by the prune stage for ``structure: units``. The output is a dense, narrower MLP (no
zeros, no masks): every runtime runs it at full speed, TFLite Micro included, and its int8
file shrinks with the parameter count, where magnitude pruning keeps the shape and the bytes.

Each of ``unit_rounds`` rounds ranks the units of every hidden layer, removes the least
important so the widths shrink geometrically to ``(1 - sparsity)`` of the original (at least
one unit each; ``layer_sparsity`` overrides per layer), then fine-tunes the narrower network by
distillation from the unpruned teacher (the shared compiled loop); DAgger rounds follow the last
removal. Importance of unit ``j`` over the distillation states (standardized coordinates):

- ``taylor`` (default): the first-order Taylor estimate of the loss change when the unit's
  activation ``z_j`` is zeroed, ``mean_states |z_j * dL/dz_j|`` (Molchanov et al. 2017, ICLR,
  "Pruning Convolutional Neural Networks for Resource Efficient Inference", criterion Θ_TE, with
  one activation per unit instead of a feature map);
- ``magnitude``: ``||W_in[:, j]|| * ||W_out[j, :]||``, the product of the L2 norms of the unit's
  incoming and outgoing weights.

A removed unit's mean activation times its outgoing weights is folded into the next layer's
bias, so the network loses only the unit's variation, not its average contribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc.fidelity import actions_of, fidelity
from dqnc.config import PruneConfig
from dqnc.distillation import Normalizer, Trainer, check_states, dagger, make_loss, teacher_states
from dqnc.envs import EnvSpec, QFunction
from dqnc.errors import UsageError
from dqnc.qnet import QNetSpec
from dqnc.qnet.forward import act
from dqnc.qnet.weights import plain_mlp_weights


def hidden_activations(weights: list[np.ndarray], acts: list[str], x: np.ndarray) -> list[np.ndarray]:
    """Post-activation outputs of every hidden layer for inputs ``x``."""
    out, h = [], np.asarray(x, np.float32)
    for i in range(len(weights) // 2 - 1):
        h = act(h @ weights[2 * i] + weights[2 * i + 1], acts[i])
        out.append(h)
    return out


def unit_importance(weights: list[np.ndarray], acts: list[str], x: np.ndarray, y: np.ndarray, cfg: PruneConfig,
                    n_actions: int) -> list[np.ndarray]:
    """One importance score per unit of every hidden layer (see the module docstring)."""
    n_hidden = len(weights) // 2 - 1
    if cfg.importance == "magnitude":
        return [np.linalg.norm(weights[2 * i], axis=0) * np.linalg.norm(weights[2 * i + 2], axis=1)
                for i in range(n_hidden)]
    from dqnc.keras import tf

    t = tf()
    loss_fn = make_loss(cfg, n_actions)
    activation = {"relu": t.nn.relu, "tanh": t.tanh, "elu": t.nn.elu}
    w = [t.constant(a) for a in weights]
    with t.GradientTape() as tape:
        h, hs = t.constant(x), []
        for i in range(n_hidden):
            h = activation[acts[i]](t.matmul(h, w[2 * i]) + w[2 * i + 1])
            tape.watch(h)
            hs.append(h)
        loss = t.reduce_sum(loss_fn(t.constant(y), t.matmul(h, w[-2]) + w[-1]))
    grads = tape.gradient(loss, hs)
    return [np.abs((z * g).numpy()).mean(axis=0) for z, g in zip(hs, grads)]


def remove_units(weights: list[np.ndarray], acts: list[str], x: np.ndarray, keep: list[np.ndarray]) -> list[np.ndarray]:
    """Keep only the units ``keep[i]`` of hidden layer ``i``; fold the removed units' mean
    activation into the next layer's bias."""
    means = [h.mean(axis=0) for h in hidden_activations(weights, acts, x)]
    w = [np.array(a, np.float64) for a in weights]
    for i, idx in enumerate(keep):
        drop = np.setdiff1d(np.arange(w[2 * i].shape[1]), idx)
        w[2 * i + 3] = w[2 * i + 3] + means[i][drop] @ w[2 * i + 2][drop]
        w[2 * i], w[2 * i + 1] = w[2 * i][:, idx], w[2 * i + 1][idx]
        w[2 * i + 2] = w[2 * i + 2][idx]
        # Later layers' means were measured with all of this layer's units: re-measure them.
        means = [h.mean(axis=0) for h in hidden_activations([a.astype(np.float32) for a in w], acts, x)]
    return [a.astype(np.float32) for a in w]


def target_widths(widths: list[int], names: list[str], cfg: PruneConfig) -> list[int]:
    unknown = sorted(set(cfg.layer_sparsity) - set(names))
    if unknown:
        raise UsageError(f"no hidden Dense layer named {unknown[0]!r}: hidden layers are {', '.join(names)}")
    return [max(1, int(round(w * (1 - cfg.layer_sparsity.get(n, cfg.sparsity))))) for w, n in zip(widths, names)]


@dataclass
class _Shrunk:
    weights: list[np.ndarray]  # standardized coordinates
    history: list[float]
    widths_by_round: list[list[int]]


def _shrink(cfg: PruneConfig, teacher_w: list[np.ndarray], acts: list[str], final: list[int], teacher_q: QFunction,
            env: EnvSpec, norm: Normalizer, states: np.ndarray, q_t: np.ndarray) -> _Shrunk:
    """``unit_rounds`` rounds of removing units, each followed by distillation when fine-tuning."""
    start = [int(teacher_w[2 * i].shape[1]) for i in range(len(final))]
    x, y = norm.x(states), norm.q(q_t)
    weights = norm.to_normalized(teacher_w)
    rounds = cfg.unit_rounds if cfg.finetune == "distill" else 1
    round_steps = max(1, cfg.epochs * int(np.ceil(len(states) / cfg.batch_size)) // rounds)
    out = _Shrunk(weights, [], [])
    for r in range(rounds):
        widths = [max(f, int(round(s * (f / s) ** ((r + 1) / rounds)))) for s, f in zip(start, final)]
        scores = unit_importance(out.weights, acts, x, y, cfg, env.n_actions)
        # Highest scores kept; ties broken by unit index so the result is deterministic.
        keep = [np.sort(np.argsort(-s, kind="stable")[:w]) for s, w in zip(scores, widths)]
        out.weights = remove_units(out.weights, acts, x, keep)
        out.widths_by_round.append(widths)
        if cfg.finetune != "distill":
            continue
        model = QNetSpec.mlp(env.obs_dim, env.n_actions, tuple(widths), tuple(acts)).build_plain(out.weights)
        trainer = Trainer(model, cfg, env.n_actions, jit=True)
        last = r == rounds - 1
        res = dagger(trainer, model.get_weights, acts, teacher_q, norm, states, q_t, env, cfg,
                     first_steps=round_steps, rounds=cfg.dagger_rounds if last else 0,
                     round_steps=lambda n: max(1, cfg.epochs // 2) * int(np.ceil(n / cfg.batch_size)),
                     extra_states=max(64, cfg.states // 2))
        out.history += res.history
        out.weights = model.get_weights()
    return out


def run(cfg: PruneConfig, source: art.Artifact, teacher: Any, teacher_q: QFunction, out: Path, *,
        force: bool = False, command: list[str] | None = None) -> art.Artifact:
    """Prune whole units of ``teacher`` (a plain Dense MLP) and write the narrower artifact at ``out``."""
    if cfg.finetune == "rl":
        raise UsageError("--structure units fine-tunes by distillation: use --finetune distill (or none)")
    teacher_w, acts = plain_mlp_weights(teacher)  # type: ignore[misc]
    env: EnvSpec = source.env
    dense = [l for l in teacher.layers if type(l).__name__ == "Dense"]
    names = [l.name for l in dense[:-1]]
    if not names:
        raise UsageError("the model has no hidden layer: there are no units to remove")
    start = [int(teacher_w[2 * i].shape[1]) for i in range(len(names))]
    final = target_widths(start, names, cfg)
    states, q_t = teacher_states(teacher_q, env, cfg.states, cfg)
    norm = Normalizer.fit(states, q_t, advantages=cfg.value_weight == 0)
    shrunk = _shrink(cfg, teacher_w, acts, final, teacher_q, env, norm, states, q_t)
    raw = norm.to_raw(shrunk.weights)
    widths = [int(raw[2 * i].shape[1]) for i in range(len(names))]
    spec = QNetSpec.mlp(env.obs_dim, env.n_actions, tuple(widths), tuple(acts))
    plain = spec.build_plain(raw)
    check = check_states(teacher_q, env, cfg.check_states, cfg.seed, cfg.epsilon)
    stats = fidelity(teacher_q(check), actions_of(spec.numpy(raw)(check)))
    params_before = int(sum(a.size for a in teacher_w))
    params_after = int(sum(a.size for a in raw))
    layers = [{"name": l.name, "shape": list(l.get_weights()[0].shape), "target": 0.0, "sparsity": 0.0, "zeros": 0,
               "params": int(l.get_weights()[0].size)} for l in plain.layers if l.get_weights()]
    metrics = {
        "structure": "units",
        "importance": cfg.importance,
        "sparsity": 0.0,
        "prunable_sparsity": 0.0,
        "widths_before": start,
        "widths_after": widths,
        "widths_by_round": shrunk.widths_by_round,
        "params_before": params_before,
        "params": params_after,
        "params_removed_frac": 1 - params_after / params_before,
        "layers": layers,
        "check": stats,
        "loss_history": shrunk.history[-5:],
    }
    network = {**source.network, **spec.to_dict(), "saved_as": "sequential_mlp", "outputs": "action_scores"}
    with art.atomic_output(out, force) as tmp:
        plain.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        spec.save_sidecar(tmp, raw)
        art.write_manifest(tmp, stage="prune", env=env, network=network, config=cfg.model_dump(mode="json"),
                           metrics=metrics, parent=source, command=command)
    return art.load(out)
