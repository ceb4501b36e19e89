"""The prune stage: SavedModel artifact -> sparse SavedModel artifact (TFMOT magnitude pruning).

Layers are wrapped one by one with ``prune_low_magnitude`` (TFMOT refuses whole models holding
layers it does not know), masks tighten on a PolynomialDecay or ConstantSparsity schedule while
the student is fine-tuned, then the wrappers are stripped. Fine-tuning:

- ``distill`` (default): teach the student the unpruned teacher's actions over states from
  epsilon-noisy rollouts of the teacher (so the data covers states near the policy's path), then
  over the states the student itself visits (DAgger). The loss is policy distillation (softmax
  cross-entropy at a low temperature) plus a light regression on advantages (Q minus its mean over
  actions): advantages alone decide actions, and they are small next to the Q offset every action
  shares.
- ``rl``: continue Double-DQN training in the env (the train stage's compiled update).
- ``none``: one-shot magnitude pruning.

Small layers lose most when pruned uniformly, so the output layer stays dense by default and
``distribution='erk'`` gives each layer a sparsity that falls with its size (Erdős–Rényi-Kernel,
as in Graesser et al. 2022), scaled to the requested overall sparsity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dqnc import artifact as art
from dqnc.fidelity import actions_of, fidelity
from dqnc.config import PruneConfig
from dqnc.distillation import Normalizer, Trainer, check_states, dagger, teacher_states
from dqnc.errors import UsageError
from dqnc.nets import MLP_FILE, NumpyMLP, save_mlp


# TFMOT's m_by_n pattern: M zeros in every N consecutive input weights of a unit (2:4 sparsity).
M_BY_N = (2, 4)


def follows_m_by_n(kernel: np.ndarray, m_by_n: tuple[int, int] = M_BY_N) -> bool:
    """Whether a Dense kernel ``[in, out]`` has at least M zeros in every N consecutive inputs of each unit."""
    m, n = m_by_n
    groups = kernel.T.reshape(kernel.shape[1], -1, n)
    return bool(((groups == 0).sum(axis=-1) >= m).all())


def _dense_layers(model: Any) -> list[Any]:
    return [l for l in model.layers if type(l).__name__ == "Dense"]


def layer_targets(model: Any, cfg: PruneConfig, kinds: tuple[str, ...] = ("Dense",)) -> dict[str, float]:
    """The sparsity each kernel of a ``kinds`` layer must reach (0 for layers kept dense)."""
    dense = [l for l in model.layers if type(l).__name__ in kinds]
    names = [l.name for l in dense]
    what = "/".join(kinds)
    unknown = sorted(set(cfg.layer_sparsity) - set(names))
    if unknown:
        raise UsageError(f"no {what} layer named {unknown[0]!r} in the model: layers are {', '.join(names)}")
    # 'first' and 'last' name the input and output layers of any model. Both stay dense by
    # default: they are small, the output layer decides the action, and TFLite's sparse int8
    # kernels mis-compute a sparse layer with few (e.g. 4) inputs (measured; see quantize).
    aliases = {"first": names[0], "last": names[-1]}
    typo = [n for n in cfg.keep_dense if aliases.get(n, n) not in names]
    if typo:
        raise UsageError(f"keep_dense: no {what} layer named {typo[0]!r} in the model: use first, last or one of "
                         f"{', '.join(names)}")
    kept = [aliases[n] if n in aliases else n for n in cfg.keep_dense]
    targets = {n: 0.0 for n in kept}
    if cfg.structure == "2by4":  # the pattern fixes every pruned layer at 50%
        for layer in dense:
            if layer.name not in kept and layer.kernel.shape[0] % M_BY_N[1]:
                raise UsageError(f"--structure 2by4 needs each pruned layer's inputs in groups of {M_BY_N[1]}: "
                                 f"{layer.name} has {layer.kernel.shape[0]}; keep it dense (--keep-dense {layer.name})")
        return {l.name: 0.0 if l.name in kept else 0.5 for l in dense}
    free = [l for l in dense if l.name not in kept and l.name not in cfg.layer_sparsity]
    targets.update(cfg.layer_sparsity)
    if cfg.distribution == "uniform" or not free:
        targets.update({l.name: cfg.sparsity for l in free})
        return {n: targets[n] for n in names}
    # ERK: density_l proportional to (n_in + n_out) / (n_in * n_out), scaled so that the free
    # layers together hold the requested share of zeros; layers that would exceed density 1 stay dense.
    sizes = {l.name: int(np.prod(l.kernel.shape)) for l in free}
    raw = {l.name: sum(l.kernel.shape) / np.prod(l.kernel.shape) for l in free}
    dense_set: set[str] = set()
    while True:
        budget = (1 - cfg.sparsity) * sum(sizes.values()) - sum(sizes[n] for n in dense_set)
        scale = budget / sum(raw[n] * sizes[n] for n in sizes if n not in dense_set)
        over = [n for n in sizes if n not in dense_set and raw[n] * scale > 1]
        if not over:
            break
        dense_set.update(over)
    for n in sizes:
        targets[n] = 0.0 if n in dense_set else float(1 - raw[n] * scale)
    return {n: targets[n] for n in names}


def _wrap(model: Any, targets: dict[str, float], cfg: PruneConfig, steps: int,
          prunable: tuple[str, ...] = ("Dense",)) -> Any:
    """A clone of ``model`` whose ``prunable`` layers with a target are wrapped by TFMOT's
    ``prune_low_magnitude`` on the stage's schedule (prune and prune_conv share it)."""
    from dqnc.keras import keras, tfmot

    k, sparsity_api = keras(), tfmot().sparsity.keras
    clone = k.models.clone_model(model)
    clone.set_weights(model.get_weights())
    # Masks tighten over the first 60% of the steps, in up to 40 updates; the last update must land
    # exactly on end_step (a multiple of the frequency) for the final sparsity to be the target.
    ramp = max(1, int(steps * 0.6))
    freq = max(1, ramp // 40)
    end = freq * max(1, ramp // freq)

    def schedule(target: float) -> Any:
        if cfg.schedule == "constant" or cfg.finetune == "none":
            return sparsity_api.ConstantSparsity(target, begin_step=0, frequency=1)
        return sparsity_api.PolynomialDecay(0.0, target, begin_step=0, end_step=end, frequency=freq)

    def wrap(layer: Any) -> Any:
        new = layer.__class__.from_config(layer.get_config())
        target = targets.get(layer.name, 0.0)
        if type(layer).__name__ in prunable and target > 0:
            # With m_by_n, TFMOT takes only the update timing from the schedule, not its sparsity.
            m_by_n = M_BY_N if cfg.structure == "2by4" else None
            return sparsity_api.prune_low_magnitude(new, pruning_schedule=schedule(target), sparsity_m_by_n=m_by_n)
        return new

    try:
        wrapped = k.models.clone_model(clone, clone_function=wrap)
    except ValueError as e:
        raise UsageError(f"TFMOT cannot wrap this model for pruning: {str(e).splitlines()[0][:200]}") from None
    wrapped.set_weights(_weights_for(wrapped, clone))
    return wrapped


def _weights_for(wrapped: Any, plain: Any) -> list[np.ndarray]:
    """Map a plain model's weights onto its wrapped clone (wrappers add mask/threshold/step)."""
    out = []
    by_layer = {l.name: l.get_weights() for l in plain.layers}
    for layer in wrapped.layers:
        inner = getattr(layer, "layer", None)
        if inner is None:
            out += by_layer.get(layer.name, [])
            continue
        kernel, bias = by_layer[inner.name]
        for w in layer.weights:
            n = w.name
            if "mask" in n:
                out.append(np.ones(w.shape, np.float32))
            elif "threshold" in n:
                out.append(np.zeros(w.shape, np.float32))
            elif "pruning_step" in n:
                out.append(np.array(-1, np.int64))
            elif "kernel" in n:
                out.append(kernel)
            elif "bias" in n:
                out.append(bias)
            else:
                out.append(w.numpy())
    return out


def _clone_with_weights(model: Any, weights: list[np.ndarray]) -> Any:
    from dqnc.keras import keras

    clone = keras().models.clone_model(model)
    clone.set_weights(weights)
    return clone


def _wrapped_weights(wrapped: Any) -> list[np.ndarray]:
    """Effective (masked) weights of a model whose Dense (and Conv2D) layers may be pruning-wrapped."""
    out: list[np.ndarray] = []
    for layer in wrapped.layers:
        inner = getattr(layer, "layer", layer)
        if type(inner).__name__ not in ("Dense", "Conv2D"):
            continue
        kernel = inner.kernel.numpy()
        if hasattr(layer, "pruning_vars"):
            for _, mask, _ in layer.pruning_vars:
                kernel = kernel * mask.numpy()
        out += [kernel, inner.bias.numpy()]
    return out


def _rl_config(source: art.Artifact, cfg: PruneConfig) -> Any:
    """The DQN settings for RL fine-tuning: the parent's own training config where known."""
    from dqnc.config import build_train_config

    base = dict(source.manifest.get("config") or {}) if source.stage == "train" else {}
    base = {k: v for k, v in base.items() if k not in ("env", "env_kwargs")}
    # The policy is already good: act with little exploration and run the whole schedule.
    over = {"total_steps": cfg.rl_steps, "seed": cfg.seed, "env_kwargs": source.env.kwargs, "early_stop": False,
            "learning_starts": min(1000, cfg.rl_steps // 4)}
    train_cfg = build_train_config(source.env.id, base, over)
    return train_cfg.model_copy(update={"eps_start": train_cfg.eps_end})


def _rl_gradient_steps(train_cfg: Any) -> int:
    return max(1, (train_cfg.total_steps - train_cfg.learning_starts) // train_cfg.train_freq * train_cfg.gradient_steps)


def _rl(student: Any, train_cfg: Any, acts: list[str]) -> list[float]:
    """Continue DQN training of the wrapped student in its env (masks tighten as it learns)."""
    from dqnc.train import rl_finetune

    for layer in student.layers:
        if hasattr(layer, "pruning_step"):
            layer.pruning_step.assign(0)
    return rl_finetune(student, train_cfg, lambda: _wrapped_weights(student), acts)


def _strip_and_mask(wrapped: Any) -> Any:
    from dqnc.keras import tfmot

    for layer in wrapped.layers:
        if hasattr(layer, "pruning_obj"):
            layer.pruning_obj.weight_mask_op()
    return tfmot().sparsity.keras.strip_pruning(wrapped)


def run(cfg: PruneConfig, source: art.Artifact, out: Path, *, force: bool = False,
        command: list[str] | None = None, log: Any = None) -> art.Artifact:
    """Prune ``source`` (a SavedModel artifact) and write the sparse SavedModel artifact at ``out``."""
    from dqnc.keras import keras
    from dqnc.policy import load_keras_model, mlp_weights, q_function

    out = Path(out)
    art.check_output(out, force)
    if source.kind != "savedmodel":
        raise UsageError(f"{str(source.path)!r} is a .tflite model: prune its SavedModel parent, then quantize")
    from dqnc.keras import tf

    keras().utils.set_random_seed(cfg.seed)
    tf().config.experimental.enable_op_determinism()  # the same seed gives the same pruned model
    teacher = load_keras_model(source.model_path)
    if any(type(l).__name__ == "Conv2D" for l in teacher.layers):
        from dqnc import prune_conv

        return prune_conv.run(cfg, source, teacher, q_function(source, model=None), out, force=force, command=command)
    if mlp_weights(teacher) is None:
        kinds = sorted({type(l).__name__ for l in teacher.layers if type(l).__name__ not in ("Dense", "InputLayer")})
        raise UsageError(
            f"{str(source.path)!r}: dqnc prunes Q-networks made of Dense layers (relu/tanh/elu), but this model also has "
            f"{', '.join(kinds) or 'Dense layers it cannot map'}: fold them into the Dense layers (e.g. normalization into "
            "the first kernel and bias) or train the policy with `dqnc train`"
        )
    teacher_q = q_function(source, model=teacher)
    if cfg.structure == "units":
        from dqnc import structured

        return structured.run(cfg, source, teacher, teacher_q, out, force=force, command=command)
    targets = layer_targets(teacher, cfg)
    if not any(v > 0 for v in targets.values()):
        raise UsageError("nothing to prune: every Dense layer is kept dense (check --keep-dense / --layer-sparsity)")
    history: list[float] = []
    if cfg.finetune == "distill":
        states, q_t = teacher_states(teacher_q, source.env, cfg.states, cfg)
        steps = cfg.epochs * int(np.ceil(len(states) / cfg.batch_size))
        norm = Normalizer.fit(states, q_t, advantages=cfg.value_weight == 0)
        teacher_w, teacher_acts = mlp_weights(teacher)  # type: ignore[misc]
        student = _wrap(_clone_with_weights(teacher, norm.to_normalized(teacher_w)), targets, cfg, steps)
        # XLA compiles TFMOT's mask updates too (its step assertion becomes a no-op): measured 17%
        # less CPU than a plain tf.function for CartPole 80%, the same masks and agreement.
        trainer = Trainer(student, cfg, source.env.n_actions, jit=True)
        history = dagger(trainer, lambda: _wrapped_weights(student), teacher_acts, teacher_q, norm, states, q_t,
                         source.env, cfg, first_steps=steps, rounds=cfg.dagger_rounds,
                         round_steps=lambda n: max(1, cfg.epochs // 2) * int(np.ceil(n / cfg.batch_size)),
                         extra_states=max(64, cfg.states // 2)).history
    elif cfg.finetune == "rl":
        train_cfg = _rl_config(source, cfg)
        student = _wrap(teacher, targets, cfg, _rl_gradient_steps(train_cfg))
        acts = (mlp_weights(teacher) or ([], ["relu"] * (len(_dense_layers(teacher)) - 1)))[1]
        history = _rl(student, train_cfg, acts)
    else:
        student = _wrap(teacher, targets, cfg, 1)
        from dqnc.keras import tfmot

        student.compile(optimizer="sgd", loss="mse")
        # One zero-learning-rate step runs the mask update at step 1 (ConstantSparsity).
        student.optimizer.learning_rate.assign(0.0)
        x = np.zeros((1, source.env.obs_dim), np.float32)
        student.fit(x, teacher.predict(x, verbose=0), epochs=1, verbose=0,
                    callbacks=[tfmot().sparsity.keras.UpdatePruningStep()])
    plain = _strip_and_mask(student)

    mlp = mlp_weights(plain)
    if mlp is None:
        raise UsageError("the pruned model is not a plain Dense MLP; dqnc prunes Dense Q-networks")
    weights, acts = mlp
    if cfg.finetune == "distill":
        weights = norm.to_raw(weights)
        plain.set_weights(weights)
    layers = []
    for layer in _dense_layers(plain):
        kern = layer.get_weights()[0]
        zeros = int(kern.size - np.count_nonzero(kern))
        layers.append({"name": layer.name, "shape": list(kern.shape), "target": targets[layer.name],
                       "sparsity": zeros / kern.size, "zeros": zeros, "params": int(kern.size)})
    prunable = [l for l in layers if l["target"] > 0]
    total_zero = sum(l["zeros"] for l in layers)
    total = sum(l["params"] for l in layers)
    check = check_states(teacher_q, source.env, cfg.check_states, cfg.seed, cfg.epsilon)
    student_q = NumpyMLP(weights, acts)
    stats = fidelity(teacher_q(check), actions_of(student_q(check)))
    if cfg.structure == "2by4":
        broken = [l.name for l in _dense_layers(plain) if targets[l.name] > 0 and not follows_m_by_n(l.get_weights()[0])]
        if broken:  # TFMOT's masks hold by construction; a failure here is a bug, not bad input
            raise RuntimeError(f"the 2:4 pattern does not hold in {', '.join(broken)} after pruning")
    metrics = {
        "pattern": "2:4" if cfg.structure == "2by4" else None,
        "sparsity": total_zero / total,
        "prunable_sparsity": sum(l["zeros"] for l in prunable) / max(1, sum(l["params"] for l in prunable)),
        "layers": layers,
        "check": stats,
        "loss_history": history[-5:] if history else [],
    }
    with art.atomic_output(out, force) as tmp:
        plain.save(str(tmp / art.MODEL_DIR), include_optimizer=False, save_format="tf")
        save_mlp(tmp / MLP_FILE, weights, acts)
        # A distilled student's outputs keep the teacher's action ranking, not its Q-values.
        outputs = "action_scores" if cfg.finetune == "distill" else source.outputs
        art.write_manifest(tmp, stage="prune", env=source.env, network={**source.network, "outputs": outputs},
                           config=cfg.model_dump(mode="json"), metrics=metrics,
                           parent=source, command=command)
    return art.load(out)
