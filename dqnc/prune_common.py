"""What the magnitude-pruning paths share (Dense MLPs in :mod:`dqnc.prune`, conv nets in
:mod:`dqnc.prune_conv`): per-layer sparsity targets, the TFMOT wrapping on the stage's schedule,
and stripping the wrappers with the masks applied."""

from __future__ import annotations

from typing import Any

import numpy as np

from dqnc.config import PruneConfig
from dqnc.errors import UsageError
from dqnc.qnet.weights import clone_with_weights, effective_weights, weights_for_wrapped

__all__ = ["M_BY_N", "clone_with_weights", "effective_weights", "follows_m_by_n", "layer_targets", "strip_and_mask",
           "wrap"]

# TFMOT's m_by_n pattern: M zeros in every N consecutive input weights of a unit (2:4 sparsity).
M_BY_N = (2, 4)


def follows_m_by_n(kernel: np.ndarray, m_by_n: tuple[int, int] = M_BY_N) -> bool:
    """Whether a Dense kernel ``[in, out]`` has at least M zeros in every N consecutive inputs of each unit."""
    m, n = m_by_n
    groups = kernel.T.reshape(kernel.shape[1], -1, n)
    return bool(((groups == 0).sum(axis=-1) >= m).all())


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


def wrap(model: Any, targets: dict[str, float], cfg: PruneConfig, steps: int,
         prunable: tuple[str, ...] = ("Dense",)) -> Any:
    """A clone of ``model`` whose ``prunable`` layers with a target are wrapped by TFMOT's
    ``prune_low_magnitude`` on the stage's schedule."""
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

    def wrap_layer(layer: Any) -> Any:
        new = layer.__class__.from_config(layer.get_config())
        target = targets.get(layer.name, 0.0)
        if type(layer).__name__ in prunable and target > 0:
            # With m_by_n, TFMOT takes only the update timing from the schedule, not its sparsity.
            m_by_n = M_BY_N if cfg.structure == "2by4" else None
            return sparsity_api.prune_low_magnitude(new, pruning_schedule=schedule(target), sparsity_m_by_n=m_by_n)
        return new

    try:
        wrapped = k.models.clone_model(clone, clone_function=wrap_layer)
    except ValueError as e:
        raise UsageError(f"TFMOT cannot wrap this model for pruning: {str(e).splitlines()[0][:200]}") from None
    wrapped.set_weights(weights_for_wrapped(wrapped, clone))
    return wrapped


def strip_and_mask(wrapped: Any) -> Any:
    """The plain model under TFMOT's wrappers, with the final masks applied to its kernels."""
    from dqnc.keras import tfmot

    for layer in wrapped.layers:
        if hasattr(layer, "pruning_obj"):
            layer.pruning_obj.weight_mask_op()
    return tfmot().sparsity.keras.strip_pruning(wrapped)
