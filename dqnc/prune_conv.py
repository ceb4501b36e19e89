"""Magnitude pruning of conv Q-networks (TFMOT on Conv2D and Dense kernels).

Fine-tuning is the MLP path's policy distillation with DAgger (:mod:`dqnc.distillation`: the same
loss, options and compiled loop), on image-shaped states. Unlike the MLP path, inputs are not
standardized: a convolution cannot absorb a per-pixel scaling, and 0/1 or 0..255 pixels need
none; only the targets are scaled, folded into the dense output layer (kept dense). On small
images the conv layers train as im2col matmuls under XLA (as in training). ``finetune: none`` is one-shot pruning. ``rl`` fine-tuning,
ERK and unit pruning cover MLPs only and are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc.config import PruneConfig
from dqnc.errors import UsageError
from dqnc.fidelity import actions_of, fidelity
from dqnc.nets_conv import CONV_FILE, NumpyConvNet, im2col_pays, save_conv, spec_from_network, use_im2col

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
    from dqnc.keras import tfmot
    from dqnc.nets import dense_weights

    _refuse_unsupported(cfg)
    if not isinstance(teacher_q, NumpyConvNet):
        raise UsageError(f"{str(source.path)!r}: conv pruning needs a dqnc conv artifact (convnet.npz); "
                         "re-create it with dqnc train")
    from dqnc.prune import layer_targets

    targets = layer_targets(teacher, cfg, kinds=_PRUNABLE)
    if not any(v > 0 for v in targets.values()):
        raise UsageError("nothing to prune: every layer is kept dense (check --keep-dense / --layer-sparsity)")

    net = source.network or {}
    spec = spec_from_network(source.env, net)
    strides = [c[2] for c in spec.conv]

    def numpy_net(weights: list[np.ndarray]) -> NumpyConvNet:
        return NumpyConvNet(weights, strides, spec.obs_shape, teacher_q.activations, spec.layout)

    from dqnc.prune import _clone_with_weights, _strip_and_mask, _wrap, _wrapped_weights

    history: list[float] = []
    norm = None
    if cfg.finetune == "distill":
        from dqnc.distillation import OutputNormalizer, Trainer, dagger, teacher_states

        states, q_t = teacher_states(teacher_q, source.env, cfg.states, cfg)
        states = states.reshape(len(states), *spec.obs_shape)  # the student reads images
        steps = cfg.epochs * int(np.ceil(len(states) / cfg.batch_size))
        norm = OutputNormalizer.fit(states.reshape(len(states), -1), q_t, advantages=cfg.value_weight == 0)
        if targets.get(teacher.layers[-1].name, 0.0) > 0:
            raise UsageError("keep the output layer dense for conv pruning (keep_dense: [last])")
        student = _wrap(_clone_with_weights(teacher, norm.to_normalized(teacher.get_weights())), targets, cfg, steps,
                        prunable=_PRUNABLE)
        fast = im2col_pays(spec)  # small images: im2col under XLA; large ones: TF's conv kernels
        if fast:
            use_im2col(student)
        trainer = Trainer(student, cfg, source.env.n_actions, jit=fast)
        history = dagger(trainer, lambda: _wrapped_weights(student), [], teacher_q, norm, states, q_t, source.env, cfg,
                         first_steps=steps, rounds=cfg.dagger_rounds,
                         round_steps=lambda n: max(1, cfg.epochs // 2) * int(np.ceil(n / cfg.batch_size)),
                         extra_states=max(64, cfg.states // 2), student_policy=numpy_net).history
    else:
        student = _wrap(teacher, targets, cfg, 1, prunable=_PRUNABLE)
        student.compile(optimizer="sgd", loss="mse")
        student.optimizer.learning_rate.assign(0.0)  # one zero-step fit applies the masks
        x = np.zeros((1, *source.env.obs_shape), np.float32)
        student.fit(x, teacher.predict(x, verbose=0), epochs=1, verbose=0,
                    callbacks=[tfmot().sparsity.keras.UpdatePruningStep()])
    plain = _strip_and_mask(student)

    weights = dense_weights(plain)
    if norm is not None:
        weights = norm.to_raw(weights)
        plain.set_weights(weights)
    student_q = numpy_net(weights)
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
        # Policy distillation fits the teacher's action ranking, not its Q-values (as for MLPs).
        outputs = "action_scores" if cfg.finetune == "distill" else source.outputs
        art.write_manifest(tmp, stage="prune", env=source.env, network={**net, "outputs": outputs}, config=cfg.model_dump(mode="json"),
                           metrics=metrics, parent=source, command=command)
    return art.load(out)
