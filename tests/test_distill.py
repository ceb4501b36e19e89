"""The distill stage and the shared compiled distillation loop, on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc import artifact as art
from dqnc.cli import app
from dqnc.config import DistillConfig

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "cartpole"
TINY = dict(states=3000, steps=400, dagger_rounds=1, dagger_steps=200, check_states=500)


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16x16 student of the shipped (fully trained) CartPole policy."""
    from dqnc import distill

    out = tmp_path_factory.mktemp("student") / "s16"
    distill.run(DistillConfig(hidden=[16, 16], **TINY), art.load(SAMPLE), out)
    return out


def test_student_acts_like_its_trained_parent(student):
    from dqnc.envs import rollout
    from dqnc.policy import q_function
    from dqnc.seeds import episode_seed

    a = art.load(student)
    check = a.manifest["metrics"]["check"]
    # An untrained 16x16 net agrees on ~50% of the states; 600 steps of distillation reach ~85%
    # overall and all decisive states (measured), so these thresholds catch a broken loss or loop.
    assert check["decisive_agreement"] >= 0.97, check
    assert check["agreement"] >= 0.75, check
    returns = rollout(q_function(a), a.env, 5, episode_seed("validation", 99)).returns
    assert returns.mean() >= 450, returns


def test_student_is_a_dense_narrow_artifact_that_quantize_takes(student, tmp_path):
    from dqnc import quantize
    from dqnc.policy import load_keras_model

    a = art.load(student)
    assert a.stage == "distill" and a.manifest["parent"]["sha256"]
    model = load_keras_model(a.model_path)
    shapes = [tuple(l.get_weights()[0].shape) for l in model.layers if l.get_weights()]
    assert shapes == [(4, 16), (16, 16), (16, 2)]
    assert a.manifest["metrics"]["params"] == 4 * 16 + 16 + 16 * 16 + 16 + 16 * 2 + 2
    q = quantize.run(quantize.QuantizeConfig(calibration_states=300, check_states=300), a, tmp_path / "q")
    assert q.manifest["metrics"]["size_bytes"] <= 3000  # names stripped: 16x16 int8 fits in 3 KB


def test_compiled_loop_is_reproducible_with_a_seed():
    from dqnc.distillation import Trainer
    from dqnc.keras import keras
    from dqnc.nets import NetSpec, build_plain_mlp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    y = np.stack([x[:, 0] - x[:, 1], x[:, 1] - x[:, 0]], axis=1).astype(np.float32)

    def fit(seed: int) -> list[np.ndarray]:
        keras().utils.set_random_seed(seed)
        model = build_plain_mlp(NetSpec(4, 2, (8,)))
        Trainer(model, DistillConfig(seed=seed), 2).fit(x, y, 600)
        return model.get_weights()

    first, again, other = fit(1), fit(1), fit(2)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    # And it learns: the student ranks the two actions as the targets do on most samples.
    keras().utils.set_random_seed(1)
    model = build_plain_mlp(NetSpec(4, 2, (8,)), first)
    assert (model(x).numpy().argmax(1) == y.argmax(1)).mean() > 0.9


def test_width_search_keeps_the_narrowest_passing_width(tmp_path):
    from dqnc import distill

    cfg = DistillConfig(hidden="auto", widths=[1, 16], max_return_drop=0.02, validation_episodes=5, **TINY)
    a = distill.run(cfg, art.load(SAMPLE), tmp_path / "auto")
    search = a.manifest["metrics"]["width_search"]
    tried = search["tried"]
    assert tried[-1]["passed"] and not any(t["passed"] for t in tried[:-1])
    assert a.manifest["metrics"]["hidden"] == tried[-1]["hidden"]
    for t in tried:
        assert t["passed"] == (t["return_drop_frac"] <= 0.02)


def test_distill_cli_rejects_bad_widths_and_prints_json(student, tmp_path):
    r = runner.invoke(app, ["distill", str(SAMPLE), "--hidden", "16,a", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "widths" in r.output
    r = runner.invoke(app, ["distill", str(SAMPLE), "--hidden", "0,4", "-o", str(tmp_path / "z")])
    assert r.exit_code == 2 and "between 1 and 65536" in r.output
    r = runner.invoke(app, ["distill", str(student), "-o", str(student)])  # exists, no --force
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["distill", str(SAMPLE), "--hidden", "8", "--states", "500", "--steps", "100",
                            "--dagger-rounds", "0", "-o", str(tmp_path / "s8"), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert m["hidden"] == [8] and m["gradient_steps"] == 100


def test_unit_pruning_physically_narrows_the_layers(tmp_path):
    from dqnc import prune
    from dqnc.policy import load_keras_model

    cfg = prune.PruneConfig(structure="units", sparsity=0.875, layer_sparsity={"dense_1": 0.75}, unit_rounds=2,
                            states=2000, epochs=2, dagger_rounds=1, check_states=500)
    a = prune.run(cfg, art.load(SAMPLE), tmp_path / "units")
    m = a.manifest["metrics"]
    model = load_keras_model(a.model_path)
    shapes = [tuple(l.get_weights()[0].shape) for l in model.layers if l.get_weights()]
    assert shapes == [(4, 16), (16, 32), (32, 2)]  # 128 * (1 - 0.875), 128 * (1 - 0.75): dense, no zeros
    assert m["widths_by_round"] == [[45, 64], [16, 32]]  # geometric steps
    assert a.manifest["network"]["hidden"] == [16, 32]
    assert all(np.count_nonzero(w) == w.size for w in model.get_weights()[::2])
    # Fine-tuned by distillation, the narrow network still decides like its parent.
    assert m["check"]["decisive_agreement"] >= 0.95, m["check"]


def test_unit_removal_folds_mean_activation_and_ranks_by_taylor():
    from dqnc import prune
    from dqnc.structured import remove_units, unit_importance

    rng = np.random.default_rng(0)
    w = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32),
         rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)]
    w[2][1] = 0.0  # unit 1 feeds nothing: its Taylor importance is exactly zero
    x = rng.normal(size=(200, 3)).astype(np.float32)
    cfg = prune.PruneConfig()
    scores = unit_importance(w, ["relu"], x, rng.normal(size=(200, 2)).astype(np.float32), cfg, 2)[0]
    assert scores[1] == 0 and (np.delete(scores, 1) > 0).all()
    # Removing a unit whose activation is constant changes no output: its mean is folded into the bias.
    w[0][:, 2], w[1][2] = 0.0, 0.7
    narrow = remove_units(w, ["relu"], x, [np.array([0, 1, 3])])
    full = np.maximum(x @ w[0] + w[1], 0) @ w[2] + w[3]
    small = np.maximum(x @ narrow[0] + narrow[1], 0) @ narrow[2] + narrow[3]
    assert narrow[0].shape == (3, 3) and np.allclose(full, small, atol=1e-5)


def test_distill_cli_defaults_are_the_config_defaults():
    import typer.main

    # The flags are generated from the config: an unset flag passes nothing (the config's default
    # applies) and the help shows that default.
    click_cmd = typer.main.get_command(app).commands["distill"]
    params = {p.name: p for p in click_cmd.params}
    cfg = DistillConfig()
    for name in ("states", "steps", "dagger_rounds", "dagger_steps", "seed", "depth", "max_return_drop"):
        assert params[name].default is None and params[name].help.endswith(f"[default: {getattr(cfg, name)}]"), name
    assert params["hidden"].help.endswith(f"[default: {','.join(map(str, cfg.hidden))}]")
    assert params["widths"].help.endswith(f"[default: {','.join(map(str, cfg.widths))}]")


def test_2by4_pruning_keeps_two_of_every_four_inputs_and_the_policy(tmp_path):
    from dqnc.cli import app
    from dqnc.policy import load_keras_model
    from dqnc.prune import follows_m_by_n

    r = CliRunner().invoke(app, ["prune", str(SAMPLE), "--structure", "2by4", "--states", "2000", "--epochs", "4",
                                 "--dagger-rounds", "1", "--check-states", "500", "-o", str(tmp_path / "p"), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert m["pattern"] == "2:4"
    kernels = [l.get_weights()[0] for l in load_keras_model(tmp_path / "p" / "model").layers if l.get_weights()]
    # first and last stay dense (the defaults); the hidden 128x128 layer follows 2:4 exactly, not just 50%
    assert [follows_m_by_n(k) for k in kernels] == [False, True, False]
    assert abs(np.mean(kernels[1] == 0) - 0.5) < 1e-9
    rng = np.random.default_rng(0)
    assert not follows_m_by_n(rng.normal(size=(128, 8)) * (rng.random((128, 8)) > 0.5))  # 50% at random is not 2:4
    assert m["check"]["decisive_agreement"] >= 0.95, m["check"]
    # At 50% the sparse encoding's indices outweigh the zeros: linux's auto encoding keeps the smaller dense file.
    # (This 4-epoch student's int8 fidelity is not the point here, hence the loose regret limit.)
    sizes = {}
    for target in ("linux", "mcu"):
        r = CliRunner().invoke(app, ["quantize", str(tmp_path / "p"), "--target", target, "--calibration-states", "300",
                                     "--check-states", "300", "--max-regret", "0.2", "-o", str(tmp_path / target), "--json"])
        assert r.exit_code == 0, r.output
        sizes[target] = json.loads(r.stdout)["metrics"]
    assert sizes["linux"]["sparsity_encoding"].startswith("dense (the sparse encoding was not smaller")
    assert sizes["linux"]["size_bytes"] == sizes["mcu"]["size_bytes"]
    # A layer whose inputs do not come in fours (Acrobot's 6 observations) is refused with the fix named.
    from dqnc.errors import UsageError
    from dqnc.nets import NetSpec, build_plain_mlp
    from dqnc.prune import PruneConfig, layer_targets

    acrobot = build_plain_mlp(NetSpec(obs_dim=6, n_actions=3, hidden=(8, 8)))
    cfg = PruneConfig(structure="2by4", keep_dense=("last",))
    with pytest.raises(UsageError, match="has 6; keep it dense"):
        layer_targets(acrobot, cfg)
    assert set(layer_targets(acrobot, PruneConfig(structure="2by4")).values()) == {0.0, 0.5}
