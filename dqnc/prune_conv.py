"""Magnitude pruning of conv Q-networks (TFMOT on Conv2D and Dense kernels).

The MLP path (:mod:`dqnc.prune`) distills in standardized input coordinates folded into the
first Dense layer; a convolution cannot absorb per-pixel scaling, and MinAtar's 0/1 images need
none. Here the student regresses the teacher's Q-values (standardized by one scalar, folded back
into the dense output layer) on the teacher's epsilon-greedy states, image-shaped, while TFMOT's
masks tighten; ``finetune: none`` is one-shot pruning. ``rl`` fine-tuning, ERK and unit
pruning cover MLPs only and are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc.config import PruneConfig
from dqnc.errors import UsageError
from dqnc.fidelity import actions_of, fidelity
from dqnc.nets_conv import CONV_FILE, NumpyConvNet, save_conv, spec_from_network
from dqnc.seeds import episode_seed

_PRUNABLE = ("Conv2D", "Dense")


def _refuse_unsupported(cfg: PruneConfig) -> None:
    if cfg.structure != "weights":
        raise UsageError(f"--structure {cfg.structure} is for Dense MLPs; for a conv net use --structure weights")
    if cfg.finetune == "rl":
        raise UsageError("--finetune rl covers Dense MLPs so far; for a conv net use --finetune distill or none")
    if cfg.distribution != "uniform":
        raise UsageError("--distribution erk covers Dense MLPs so far; for a conv net use uniform (or --layer-sparsity)")


def run(cfg: PruneConfig, source: art.Artifact, teacher: Any, teacher_q: Any, out: Path, *, force: bool = False,
        command: list[str] | None = None) -> art.Artifact:
    """Prune the conv net ``teacher`` (loaded from ``source``) and write the sparse artifact at ``out``."""
    from dqnc.distillation import check_states
    from dqnc.envs import collect_states
    from dqnc.keras import keras, tfmot
    from dqnc.nets import dense_weights

    _refuse_unsupported(cfg)
    if not isinstance(teacher_q, NumpyConvNet):
        raise UsageError(f"{str(source.path)!r}: conv pruning needs a dqnc conv artifact (convnet.npz); "
                         "re-create it with dqnc train")
    k, sparsity_api = keras(), tfmot().sparsity.keras
    from dqnc.prune import layer_targets

    targets = layer_targets(teacher, cfg, kinds=_PRUNABLE)
    if not any(v > 0 for v in targets.values()):
        raise UsageError("nothing to prune: every layer is kept dense (check --keep-dense / --layer-sparsity)")

    if cfg.finetune == "distill":
        states = collect_states(teacher_q, source.env, cfg.states, episode_seed("distill", cfg.seed), cfg.epsilon)
        q_t = teacher_q(states)
        steps = cfg.epochs * int(np.ceil(len(states) / cfg.batch_size))
    else:
        states, q_t, steps = None, None, 1
    from dqnc.prune import _strip_and_mask, _wrap

    student = _wrap(teacher, targets, cfg, steps, prunable=_PRUNABLE)
    callbacks = [sparsity_api.UpdatePruningStep()]
    history: list[float] = []
    if states is not None and q_t is not None:
        # One scalar scale for the targets, folded back into the (dense) output layer afterwards.
        q_mean, q_std = float(q_t.mean()), float(max(q_t.std(), 1e-6))
        last = student.layers[-1]
        if hasattr(last, "pruning_vars"):
            raise UsageError("keep the output layer dense for conv pruning (keep_dense: [last])")
        w, b = last.get_weights()
        last.set_weights([w / q_std, (b - q_mean) / q_std])
        student.compile(optimizer=k.optimizers.Adam(cfg.lr), loss="mse")
        fit = student.fit(states, (q_t - q_mean) / q_std, batch_size=cfg.batch_size, epochs=cfg.epochs, verbose=0,
                          shuffle=True, callbacks=callbacks)
        history = [float(v) for v in fit.history["loss"]]
        w, b = last.get_weights()
        last.set_weights([w * q_std, b * q_std + q_mean])
    else:
        student.compile(optimizer="sgd", loss="mse")
        student.optimizer.learning_rate.assign(0.0)  # one zero-step fit applies the masks
        x = np.zeros((1, *source.env.obs_shape), np.float32)
        student.fit(x, teacher.predict(x, verbose=0), epochs=1, verbose=0, callbacks=callbacks)
    plain = _strip_and_mask(student)

    weights = dense_weights(plain)
    net = source.network or {}
    spec = spec_from_network(source.env, net)
    student_q = NumpyConvNet(weights, [c[2] for c in spec.conv], spec.obs_shape, teacher_q.activations, spec.layout)
    check = check_states(teacher_q, source.env, cfg.check_states, cfg.seed, cfg.epsilon)
    stats = fidelity(teacher_q(check), actions_of(student_q(check)))
    layers = []
    for layer in plain.layers:
        if type(layer).__name__ not in _PRUNABLE:
            continue
        kern = layer.get_weights()[0]
        zeros = int(kern.size - np.count_nonzero(kern))
        layers.append({"name": layer.name, "shape": list(kern.shape), "target": targets[layer.name],
                       "sparsity": zeros / kern.size, "zeros": zeros, "params": int(kern.size)})
    prunable = [l for l in layers if l["target"] > 0]
    metrics = {
        "sparsity": sum(l["zeros"] for l in layers) / sum(l["params"] for l in layers),
        "prunable_sparsity": sum(l["zeros"] for l in prunable) / max(1, sum(l["params"] for l in prunable)),
        "layers": layers,
        "check": stats,
        "loss_history": history[-5:],
    }
    with art.atomic_output(out, force) as tmp:
        plain.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        save_conv(tmp / CONV_FILE, weights, spec)
        art.write_manifest(tmp, stage="prune", env=source.env, network=dict(net), config=cfg.model_dump(mode="json"),
                           metrics=metrics, parent=source, command=command)
    return art.load(out)
