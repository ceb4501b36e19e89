"""The model family is one value: QNetSpec round-trips, one numpy forward equals Keras for every
family, the capability table refuses with its one wording, and no other family predicate exists."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from dqnc.envs import EnvSpec
from dqnc.errors import UsageError
from dqnc.qnet import FEATURES, QNetSpec

ROOT = Path(__file__).resolve().parents[1] / "dqnc"
# The files whose MLP-vs-conv decisions go through spec.family / spec.supports (issue 22).
FAMILY_FILES = ["nets.py", "nets_conv.py", "train.py", "prune.py", "prune_conv.py", "prune_common.py", "structured.py",
                "distill.py", "distillation.py"]

CARTPOLE = EnvSpec(id="CartPole-v1", obs_shape=(4,), n_actions=2)
IMAGES_HWC = EnvSpec(id="MinAtar/Breakout-v1", obs_shape=(10, 9, 4), n_actions=3, obs_layout="HWC")
IMAGES_CHW = EnvSpec(id="ALE/Breakout-v5", obs_shape=(4, 12, 11), n_actions=4, obs_layout="CHW")


def _perturbed(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(np.float32) for w in model.get_weights()])


@pytest.mark.parametrize("env, conv, dueling", [
    (CARTPOLE, None, False), (CARTPOLE, None, True),
    (IMAGES_HWC, [[5, 3, 1], [4, 2, 2]], False), (IMAGES_CHW, [[6, 3, 2]], True),
])
def test_network_entry_round_trips_through_the_spec(env, conv, dueling):
    spec = QNetSpec.for_env(env, conv, [7, 5], "relu", dueling)
    assert spec.family == ("conv" if conv else "mlp")
    assert QNetSpec.from_network(env, spec.to_network()) == spec
    keys = set(spec.to_dict())
    assert keys == ({"obs_shape", "obs_dim", "layout", "n_actions", "conv", "hidden", "activation", "dueling"} if conv
                    else {"obs_dim", "n_actions", "hidden", "activation", "dueling"})


def test_conv_layers_on_vector_observations_are_refused_in_one_line():
    with pytest.raises(UsageError, match="'conv' needs"):
        QNetSpec.for_env(CARTPOLE, [[4, 3, 1]], [8], "relu", False)
    with pytest.raises(ValueError):
        QNetSpec((4,), 2, "HWC", (), (8,), ("relu",))  # an image layout without conv layers


@pytest.mark.parametrize("env, conv, dueling", [
    (CARTPOLE, None, False), (CARTPOLE, None, True), (IMAGES_HWC, [[5, 3, 1], [4, 2, 2]], False),
    (IMAGES_CHW, [[6, 3, 2]], False), (IMAGES_HWC, [[3, 2, 1]], True),
])
def test_one_numpy_forward_equals_keras_for_every_family(env, conv, dueling, tmp_path):
    from dqnc.keras import keras
    from dqnc.qnet.sidecar import load
    from dqnc.qnet.weights import effective_weights

    keras().utils.set_random_seed(0)
    spec = QNetSpec.for_env(env, conv, [9, 6], "tanh" if conv is None and not dueling else "relu", dueling)
    model = spec.build_trainable()
    _perturbed(model, 1)
    assert QNetSpec.from_model(model) == spec
    x = (np.random.default_rng(2).random((13, *env.obs_shape)) * 2 - 0.5).astype(np.float32)
    want = model(x.reshape(len(x), *spec.obs_shape)).numpy()
    weights = effective_weights(model)
    np.testing.assert_allclose(spec.numpy(weights)(x), want, rtol=1e-5, atol=1e-5)
    plain = spec.build_plain(weights)
    assert QNetSpec.from_model(plain) == spec.plain()
    np.testing.assert_allclose(plain(x.reshape(len(x), *spec.obs_shape)).numpy(), want, rtol=1e-5, atol=1e-5)
    # The sidecar file holds the same network, and reads back as the same spec.
    spec.save_sidecar(tmp_path, weights)
    path = tmp_path / spec.sidecar_file
    assert QNetSpec.from_sidecar(path) == spec.plain()
    np.testing.assert_array_equal(load(path)(x), spec.numpy(weights)(x))


def test_historical_names_build_the_same_specs_and_forwards():
    from dqnc.nets import NetSpec, NumpyMLP
    from dqnc.nets_conv import ConvSpec, NumpyConvNet

    assert NetSpec(4, 2, (8,), "tanh") == QNetSpec.mlp(4, 2, (8,), "tanh")
    assert ConvSpec((4, 10, 10), 3, layout="CHW").family == "conv"
    w = [np.ones((4, 3), np.float32), np.zeros(3, np.float32), np.ones((3, 2), np.float32), np.zeros(2, np.float32)]
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(NumpyMLP(w, "relu")(x), QNetSpec.from_weights(w, ["relu"]).numpy(w)(x))
    with pytest.raises(ValueError, match="layout"):
        NumpyConvNet(w, [], (4,), ["relu"], layout="flat")


def test_capability_table_refuses_conv_features_with_one_wording_each():
    mlp = QNetSpec.mlp(4, 2, (8, 8))
    conv = QNetSpec.for_env(IMAGES_HWC, [[4, 3, 1]], [8], "relu", False)
    assert all(mlp.supports(f) and mlp.refusal(f) == "" for f in FEATURES)
    assert conv.supports("prune.weights") and conv.supports("runtime.c") and conv.supports("tflm.recompute")
    assert conv.prunable_kinds == ("Conv2D", "Dense") and mlp.prunable_kinds == ("Dense",)
    for feature in ("prune.structure.2by4", "prune.finetune.rl", "prune.distribution.erk",
                    "quantize.weight_bits"):
        with pytest.raises(UsageError) as e:
            conv.require(feature)
        assert str(e.value) == FEATURES[feature][1]
    with pytest.raises(KeyError):
        conv.supports("no.such.feature")


def _family_predicates(path: Path) -> list[str]:
    """Places deciding MLP vs conv other than through a spec: Conv2D type tests, sidecar-file
    existence checks, policy_factory None tests, and 'conv' keys read off a network dict."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and node.value == "Conv2D":
            found.append(f"{where} 'Conv2D'")
        elif isinstance(node, ast.Attribute) and node.attr == "Conv2D":
            found.append(f"{where} .Conv2D")
        elif isinstance(node, ast.Name) and node.id in ("CONV_FILE", "MLP_FILE", "policy_factory"):
            found.append(f"{where} {node.id}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "conv":
            found.append(f"{where} .get('conv')")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "conv":
            found.append(f"{where} ['conv']")
    return found


def test_the_only_family_predicate_in_the_family_files_is_spec_family():
    found = [p for name in FAMILY_FILES for p in _family_predicates(ROOT / name)]
    # The shims re-export the sidecar names (nets.MLP_FILE, nets_conv.CONV_FILE) and decide nothing.
    found = [p for p in found if not (p.startswith(("nets.py", "nets_conv.py")) and ("MLP_FILE" in p or "CONV_FILE" in p))]
    assert found == []


def test_the_predicate_scan_finds_a_conv_test():
    sample = ROOT.parent / "tests" / "_family_probe.py"
    try:
        sample.write_text("def f(model, net):\n    return any(type(l).__name__ == 'Conv2D' for l in model.layers) "
                          "or net.get('conv')\n", encoding="utf-8")
        assert len(_family_predicates(sample)) == 2
    finally:
        sample.unlink()
