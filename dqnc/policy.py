"""Turn a SavedModel artifact into a Q-function ``obs[N, d] -> q[N, n]`` for rollouts.

Plain Dense MLPs (every model dqnc writes) run as a numpy forward pass; any other Keras model
runs as one compiled call per batch. Shapes are checked against the env before any episode runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dqnc.artifact import Artifact
from dqnc.envs import EnvSpec, QFunction
from dqnc.errors import ArtifactError
from dqnc.nets import NumpyMLP


def load_keras_model(path: Path) -> Any:
    """Load a Keras SavedModel with tf_keras, or fail with a message saying what is wrong."""
    from dqnc.keras import keras, tf

    k = keras()
    try:
        return k.models.load_model(str(path), compile=False)
    except (OSError, ValueError, IOError, tf().errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"cannot load the SavedModel at {str(path)!r}: {first[:300]}; re-export it as a Keras SavedModel") from None


def check_io(model: Any, env: EnvSpec, where: str) -> None:
    in_shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    out_shape = tuple(model.output_shape[1:]) if not isinstance(model.output_shape, list) else None
    if in_shape is None or out_shape is None:
        raise ArtifactError(f"{where}: the model has several inputs or outputs; a Q-network has one of each")
    if int(np.prod([d for d in in_shape if d is not None])) != env.obs_dim:
        raise ArtifactError(
            f"{where}: model input shape {in_shape} does not fit env {env.id!r} observations {tuple(env.obs_shape)}: "
            "use the env the model was trained on"
        )
    if out_shape != (env.n_actions,):
        raise ArtifactError(
            f"{where}: model output shape {out_shape} does not fit env {env.id!r} with {env.n_actions} actions: "
            "use the env the model was trained on"
        )


def mlp_weights(model: Any) -> tuple[list[np.ndarray], list[str]] | None:
    """Weights and activations if ``model`` is a chain of Dense layers, else None."""
    layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
    if not layers or any(type(l).__name__ != "Dense" for l in layers):
        return None
    acts = [l.get_config().get("activation", "linear") for l in layers]
    if any(a not in ("relu", "tanh", "elu", "linear") for a in acts) or acts[-1] != "linear":
        return None
    if any(not l.use_bias for l in layers):
        return None
    return [w for l in layers for w in l.get_weights()], acts[:-1]


def q_function(artifact: Artifact, model: Any | None = None) -> QFunction:
    """A batched Q-function for a SavedModel artifact."""
    if artifact.kind != "savedmodel":
        raise ArtifactError(f"{artifact.path}: expected a SavedModel artifact, got {artifact.kind}")
    model = model if model is not None else load_keras_model(artifact.model_path)
    check_io(model, artifact.env, str(artifact.path))
    mlp = mlp_weights(model)
    if mlp is not None:
        weights, acts = mlp
        return NumpyMLP(weights, acts)
    from dqnc.keras import tf

    t = tf()
    call = t.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda obs: call(t.convert_to_tensor(np.asarray(obs, np.float32).reshape(len(obs), -1))).numpy()
