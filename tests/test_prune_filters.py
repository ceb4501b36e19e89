"""Filter (channel) pruning of conv nets: whole filters and units removed, the net physically narrower."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dqnc.config import PruneConfig, build_train_config
from dqnc.qnet import QNetSpec

pytest.importorskip("minatar")

ENV = "MinAtar/Breakout-v1"
TINY = dict(conv=[[8, 3, 1], [8, 3, 2]], hidden=[32], total_steps=1200, num_envs=4, learning_starts=400,
            train_freq=200, gradient_steps=20, batch_size=32, buffer_size=2000, eval_freq=1200, eval_episodes=2,
            confirm_episodes=0)


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dqnc import train

    out = tmp_path_factory.mktemp("filters") / "fp32"
    train.run(build_train_config(ENV, {}, TINY), out)
    return out


def _spec_weights(seed: int, layout: str = "HWC"):
    rng = np.random.default_rng(seed)
    shape = (10, 10, 4) if layout == "HWC" else (4, 10, 10)
    spec = QNetSpec(shape, 3, layout, ((6, 3, 1), (5, 3, 2)), (7,), ("relu",) * 3)
    weights = []
    c = 4
    for f, k, _ in spec.conv:
        weights += [rng.normal(size=(k, k, c, f)).astype(np.float32) * 0.4, rng.normal(size=f).astype(np.float32) * 0.1]
        c = f
    dims = [int(np.prod(spec.feature_shapes()[-1])), 7, 3]
    for a, b in zip(dims, dims[1:]):
        weights += [rng.normal(size=(a, b)).astype(np.float32) * 0.3, rng.normal(size=b).astype(np.float32) * 0.1]
    return spec, weights


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_removing_nothing_is_exact_and_removing_a_dead_filter_changes_nothing(layout: str):
    from dqnc.structured_conv import remove

    spec, w = _spec_weights(1, layout)
    x = np.random.default_rng(2).integers(0, 2, (300, *spec.obs_shape)).astype(np.float32)
    keep_all = [np.arange(6), np.arange(5), np.arange(7)]
    same_spec, same = remove(spec, w, x, keep_all)
    np.testing.assert_allclose(same_spec.numpy(same)(x), spec.numpy(w)(x), rtol=1e-5, atol=1e-5)
    # A filter whose output is constant (zero kernel: its ReLU'd bias everywhere) folds into the
    # next layer's bias exactly, conv -> conv (spatial mean) and conv -> Dense (per position).
    for layer, n in ((0, 6), (1, 5)):
        w2 = [a.copy() for a in w]
        w2[2 * layer][..., 2] = 0.0
        small_spec, small = remove(spec, w2, x, [np.delete(np.arange(m), 2) if i == layer else np.arange(m)
                                                   for i, m in enumerate((6, 5, 7))])
        assert [c[0] for c in small_spec.conv][layer] == n - 1
        np.testing.assert_allclose(small_spec.numpy(small)(x), spec.numpy(w2)(x), rtol=1e-4, atol=1e-4)


def test_magnitude_and_taylor_rank_a_useless_filter_last():
    from dqnc.structured_conv import importance

    spec, w = _spec_weights(3)
    w[0][..., 4] *= 1e-3  # filter 4 of conv_0 barely responds
    x = np.random.default_rng(4).integers(0, 2, (256, *spec.obs_shape)).astype(np.float32)
    y = spec.numpy(w)(x)
    for how in ("magnitude", "taylor"):
        scores = importance(spec, w, x, y, PruneConfig(importance=how))
        assert [len(s) for s in scores] == [6, 5, 7]
        assert int(np.argmin(scores[0])) == 4, (how, scores[0])


def test_structure_units_narrows_filters_and_units_and_quantizes(parent: Path, tmp_path: Path):
    from dqnc import artifact as art
    from dqnc import prune, quantize

    cfg = PruneConfig(structure="units", sparsity=0.5, states=400, epochs=2, unit_rounds=2, dagger_rounds=1,
                      check_states=200)
    out = prune.run(cfg, art.load(parent), tmp_path / "narrow")
    m = out.manifest["metrics"]
    assert m["filters_before"] == [8, 8] and m["filters_after"] == [4, 4]
    assert m["widths_before"] == [32] and m["widths_after"] == [16]
    assert m["params"] < 0.4 * m["params_before"]
    assert out.network["conv"] == [[4, 3, 1], [4, 3, 2]] and out.network["hidden"] == [16]
    assert m["check"]["regret"] <= 0.2
    q8 = quantize.run(quantize.QuantizeConfig(calibration_states=200, check_states=200, check_episodes=3), out,
                      tmp_path / "int8")
    assert q8.manifest["metrics"]["check"]["regret"] <= 0.1


def test_conv_student_is_small_by_construction_and_reads_images(parent: Path, tmp_path: Path):
    from dqnc import artifact as art
    from dqnc import distill
    from dqnc.config import DistillConfig
    from dqnc.policy import q_function

    cfg = DistillConfig(conv=[[4, 3, 2]], hidden=[16], states=600, steps=300, dagger_rounds=1, dagger_steps=100,
                        check_states=200)
    out = distill.run(cfg, art.load(parent), tmp_path / "student")
    assert out.network["conv"] == [[4, 3, 2]] and out.network["hidden"] == [16] and out.network["layout"] == "HWC"
    m = out.manifest["metrics"]
    assert m["params"] == 4 * 4 * 9 + 4 + 4 * 4 * 4 * 16 + 16 + 16 * 3 + 3  # 4x4x4 maps after a stride-2 3x3 conv
    assert m["check"]["regret"] <= 0.2
    assert q_function(out)(np.zeros((2, 10, 10, 4), np.float32)).shape == (2, 3)
    from dqnc.envs import EnvSpec
    from dqnc.errors import UsageError

    with pytest.raises(UsageError, match="image observations"):  # a conv student on a vector env: one line
        distill.student_spec(cfg, EnvSpec(id="CartPole-v1", obs_shape=(4,), n_actions=2), (8,))
