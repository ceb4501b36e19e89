from __future__ import annotations

import numpy as np
import pytest

from dqnc.nets import NetSpec, NumpyMLP, build_plain_mlp, build_q_network, dense_weights


@pytest.mark.parametrize("activation", ["relu", "tanh", "elu"])
def test_numpy_forward_matches_keras(activation):
    spec = NetSpec(obs_dim=5, n_actions=3, hidden=(8, 7), activation=activation)
    model = build_q_network(spec)
    x = np.random.default_rng(0).normal(size=(11, 5)).astype(np.float32)
    np.testing.assert_allclose(NumpyMLP(dense_weights(model), activation)(x), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_dueling_head_folds_exactly_into_one_dense_layer():
    spec = NetSpec(obs_dim=4, n_actions=3, hidden=(16,), dueling=True)
    model = build_q_network(spec)
    # make the streams non-trivial so the fold is really tested
    model.get_layer("value").set_weights([w + 0.3 for w in model.get_layer("value").get_weights()])
    x = np.random.default_rng(1).normal(size=(9, 4)).astype(np.float32)
    folded = dense_weights(model)
    plain = build_plain_mlp(spec, folded)
    np.testing.assert_allclose(plain(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    assert [type(l).__name__ for l in plain.layers] == ["Dense", "Dense"]
