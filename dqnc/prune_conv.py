"""Magnitude pruning of conv Q-networks (TFMOT on Conv2D and Dense kernels).

Fine-tuning is the MLP path's policy distillation with DAgger (:mod:`dqnc.distillation`: the same
loss, options and compiled loop), on image-shaped states. Unlike the MLP path, inputs are not
standardized: a convolution cannot absorb a per-pixel scaling, and 0/1 or 0..255 pixels need
none; only the targets are scaled, folded into the dense output layer (kept dense). On small
images the conv layers train as im2col matmuls under XLA (as in training). ``finetune: none`` is
one-shot pruning. ``structure: units`` removes whole filters and units (:mod:`dqnc.structured_conv`).
``rl`` fine-tuning, ERK and 2:4 cover MLPs only and are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc.config import PruneConfig
from dqnc.distillation import OutputNormalizer, Trainer, check_states, dagger, teacher_states
from dqnc.errors import UsageError
from dqnc.fidelity import actions_of, fidelity
from dqnc.prune_common import clone_with_weights, effective_weights, layer_targets, strip_and_mask, wrap
from dqnc.qnet import QNetSpec
from dqnc.qnet.forward import NumpyQNet
from dqnc.qnet.keras_build import im2col_pays, use_im2col


def _refuse_unsupported(cfg: PruneConfig, spec: QNetSpec) -> None:
    if cfg.structure != "weights":
        spec.require(f"prune.structure.{cfg.structure}")
    if cfg.finetune == "rl":
        spec.require("prune.finetune.rl")
    if cfg.distribution != "uniform":
        spec.require("prune.distribution.erk")


def run(cfg: PruneConfig, source: art.Artifact, teacher: Any, teacher_q: Any, out: Path, *, force: bool = False,
        command: list[str] | None = None) -> art.Artifact:
    """Prune the conv net ``teacher`` (loaded from ``source``) and write the sparse artifact at ``out``."""
    _refuse_unsupported(cfg, QNetSpec.from_model(teacher))
    if not isinstance(teacher_q, NumpyQNet):
        raise UsageError(f"{str(source.path)!r}: conv pruning needs a dqnc conv artifact (convnet.npz); "
                         "re-create it with dqnc train")
    net = source.network or {}
    spec = QNetSpec.from_network(source.env, net)
    if cfg.structure == "units":
        return _units(cfg, source, spec, teacher_q, out, force, command)
    targets = layer_targets(teacher, cfg, kinds=spec.prunable_kinds)
    if not any(v > 0 for v in targets.values()):
        raise UsageError("nothing to prune: every layer is kept dense (check --keep-dense / --layer-sparsity)")
    if cfg.finetune == "distill":
        plain, history, norm = _distill(cfg, source, spec, teacher, teacher_q, targets)
    else:
        plain, history, norm = _one_shot(cfg, source, spec, teacher, targets), [], None
    weights = effective_weights(plain)
    if norm is not None:
        weights = norm.to_raw(weights)
        plain.set_weights(weights)
    metrics = _metrics(cfg, spec, plain, targets, spec.numpy(weights), teacher_q, source, history)
    with art.atomic_output(out, force) as tmp:
        plain.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        spec.save_sidecar(tmp, weights)
        # Policy distillation fits the teacher's action ranking, not its Q-values (as for MLPs).
        outputs = "action_scores" if cfg.finetune == "distill" else source.outputs
        art.write_manifest(tmp, stage="prune", env=source.env, network={**net, "outputs": outputs}, config=cfg.model_dump(mode="json"),
                           metrics=metrics, parent=source, command=command)
    return art.load(out)


def _units(cfg: PruneConfig, source: art.Artifact, spec: QNetSpec, teacher_q: NumpyQNet, out: Path, force: bool,
           command: list[str] | None) -> art.Artifact:
    """Filter and unit pruning (:mod:`dqnc.structured_conv`): a narrower dense conv net."""
    from dqnc import structured_conv

    teacher_w = [a for layer in teacher_q.layers for a in layer]
    small, raw, metrics = structured_conv.run_conv(cfg, spec, teacher_w, teacher_q, source.env)
    plain = small.build_plain(raw)
    check = check_states(teacher_q, source.env, cfg.check_states, cfg.seed, cfg.epsilon)
    metrics |= {"sparsity": 0.0, "prunable_sparsity": 0.0, "check": fidelity(teacher_q(check), actions_of(small.numpy(raw)(check))),
                "layers": [{"name": l.name, "shape": list(l.get_weights()[0].shape), "target": 0.0, "sparsity": 0.0,
                            "zeros": 0, "params": int(l.get_weights()[0].size)} for l in plain.layers if l.get_weights()]}
    network = {**(source.network or {}), **small.to_network(), "outputs": "action_scores"}
    with art.atomic_output(out, force) as tmp:
        plain.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        small.save_sidecar(tmp, raw)
        art.write_manifest(tmp, stage="prune", env=source.env, network=network, config=cfg.model_dump(mode="json"),
                           metrics=metrics, parent=source, command=command)
    return art.load(out)


def _distill(cfg: PruneConfig, source: art.Artifact, spec: QNetSpec, teacher: Any, teacher_q: Any,
             targets: dict[str, float]) -> tuple[Any, list[float], OutputNormalizer]:
    """Prune while distilling into the wrapped clone; only the targets are scaled (see the module docstring)."""
    states, q_t = teacher_states(teacher_q, source.env, cfg.states, cfg)
    states = states.reshape(len(states), *spec.obs_shape)  # the student reads images
    steps = cfg.epochs * int(np.ceil(len(states) / cfg.batch_size))
    norm = OutputNormalizer.fit(states.reshape(len(states), -1), q_t, advantages=cfg.value_weight == 0)
    if targets.get(teacher.layers[-1].name, 0.0) > 0:
        raise UsageError("keep the output layer dense for conv pruning (keep_dense: [last])")
    student = wrap(clone_with_weights(teacher, norm.to_normalized(teacher.get_weights())), targets, cfg, steps,
                   prunable=spec.prunable_kinds)
    fast = im2col_pays(spec)  # small images: im2col under XLA; large ones: TF's conv kernels
    if fast:
        use_im2col(student)
    trainer = Trainer(student, cfg, source.env.n_actions, jit=fast)
    history = dagger(trainer, lambda: effective_weights(student), [], teacher_q, norm, states, q_t, source.env, cfg,
                     first_steps=steps, rounds=cfg.dagger_rounds,
                     round_steps=lambda n: max(1, cfg.epochs // 2) * int(np.ceil(n / cfg.batch_size)),
                     extra_states=max(64, cfg.states // 2), student_policy=spec.numpy).history
    return strip_and_mask(student), history, norm


def _one_shot(cfg: PruneConfig, source: art.Artifact, spec: QNetSpec, teacher: Any, targets: dict[str, float]) -> Any:
    from dqnc.keras import tfmot

    student = wrap(teacher, targets, cfg, 1, prunable=spec.prunable_kinds)
    student.compile(optimizer="sgd", loss="mse")
    student.optimizer.learning_rate.assign(0.0)  # one zero-step fit applies the masks
    x = np.zeros((1, *source.env.obs_shape), np.float32)
    student.fit(x, teacher.predict(x, verbose=0), epochs=1, verbose=0,
                callbacks=[tfmot().sparsity.keras.UpdatePruningStep()])
    return strip_and_mask(student)


def _metrics(cfg: PruneConfig, spec: QNetSpec, plain: Any, targets: dict[str, float], student_q: Any, teacher_q: Any,
             source: art.Artifact, history: list[float]) -> dict[str, Any]:
    check = check_states(teacher_q, source.env, cfg.check_states, cfg.seed, cfg.epsilon)
    stats = fidelity(teacher_q(check), actions_of(student_q(check)))
    layers = []
    for layer in plain.layers:
        if type(layer).__name__ not in spec.prunable_kinds:
            continue
        kern = layer.get_weights()[0]
        zeros = int(kern.size - np.count_nonzero(kern))
        layers.append({"name": layer.name, "shape": list(kern.shape), "target": targets[layer.name],
                       "sparsity": zeros / kern.size, "zeros": zeros, "params": int(kern.size)})
    prunable = [l for l in layers if l["target"] > 0]
    return {
        "sparsity": sum(l["zeros"] for l in layers) / sum(l["params"] for l in layers),
        "prunable_sparsity": sum(l["zeros"] for l in prunable) / max(1, sum(l["params"] for l in prunable)),
        "layers": layers,
        "check": stats,
        "loss_history": history[-5:],
    }
