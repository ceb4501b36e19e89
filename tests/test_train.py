from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc import artifact as art
from dqnc import train
from dqnc.cli import app
from dqnc.errors import Interrupted, OutputExistsError

from .conftest import TINY, tiny_config


def _weights(path):
    from dqnc.policy import load_keras_model

    return [w for w in load_keras_model(path / "model").get_weights()]


def test_trained_artifact_has_manifest_and_metrics(trained):
    a = art.load(trained)
    m = a.manifest
    assert m["stage"] == "train" and m["parent"] is None
    assert m["env"]["id"] == "CartPole-v1" and m["env"]["n_actions"] == 2 and m["env"]["obs_shape"] == [4]
    assert m["env"]["action_meanings"] == ["push cart left", "push cart right"]
    assert m["config"]["seed"] == 3 and m["config"]["total_steps"] == TINY["total_steps"]
    assert m["metrics"]["env_steps"] >= 1500 and m["metrics"]["gradient_steps"] > 0
    assert m["metrics"]["evals"], "periodic evaluation must run"
    assert "tensorflow" in m["versions"] and "gymnasium" in m["versions"]
    assert any(f.startswith("model/") for f in m["files"])


def test_same_seed_gives_identical_weights(tmp_path, trained):
    train.run(tiny_config(seed=3), tmp_path / "again")
    for a, b in zip(_weights(trained), _weights(tmp_path / "again")):
        np.testing.assert_array_equal(a, b)


def test_interrupt_saves_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    ckpt = tmp_path / "run.ckpt"

    def stop_midway(p):
        if p.step >= 1500:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="--resume"):
        train.run(tiny_config(seed=1), out, checkpoint_dir=ckpt, progress=stop_midway)
    assert not out.exists(), "an interrupted run must not leave an artifact"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["state"]["step"] >= 1500
    a = train.run(tiny_config(seed=1), out, checkpoint_dir=ckpt, resume=True)
    assert a.manifest["metrics"]["env_steps"] >= TINY["total_steps"] or a.manifest["metrics"]["stopped_early"]
    assert not ckpt.exists(), "the checkpoint is removed once the artifact is written"


def test_resume_with_changed_options_is_refused(tmp_path):
    ckpt = tmp_path / "run.ckpt"

    def stop(p):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train.run(tiny_config(seed=1), tmp_path / "run", checkpoint_dir=ckpt, progress=stop)
    with pytest.raises(Exception, match="different options"):
        train.run(tiny_config(seed=1, lr=0.5), tmp_path / "run", checkpoint_dir=ckpt, resume=True)


def test_existing_output_is_refused_before_training(tmp_path, trained):
    import shutil

    out = tmp_path / "existing"
    shutil.copytree(trained, out)
    before = art.load(out).sha256
    with pytest.raises(OutputExistsError):
        train.run(tiny_config(), out)
    assert art.load(out).sha256 == before


def test_dueling_and_vectorized_envs_train(tmp_path):
    a = train.run(tiny_config(dueling=True, num_envs=4, total_steps=2000), tmp_path / "d")
    assert a.manifest["network"]["dueling"] is True
    assert a.manifest["metrics"]["env_steps"] >= 1500 or a.manifest["metrics"]["stopped_early"]


def test_cli_train_then_eval_end_to_end(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", "--env", "CartPole-v1", "-o", str(out), "--total-steps", "2000", "--learning-starts", "500",
            "--train-freq", "250", "--gradient-steps", "50", "--eval-freq", "1000", "--eval-episodes", "2",
            "--hidden", "16,16", "--json", "--logdir", str(tmp_path / "tb")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["path"] == str(out)
    assert any((tmp_path / "tb").iterdir()), "TensorBoard scalars are written"
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["eval", str(out), "-n", "5", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["episodes"] == 5


def test_a_lucky_evaluation_does_not_block_later_checkpoints(tmp_path, monkeypatch):
    """The kept weights are those of the best *confirmed* score: an evaluation below an earlier
    lucky raw mean, but above its confirmed score, is still confirmed and can be kept."""
    from dqnc.envs import Rollout

    # Evaluations at steps 1000, 2000, 3000: raw means 100 (confirmed 20: score 60), 90 (confirmed
    # 80: score 85), 10 (not a candidate). Below CartPole's threshold, so no early stop.
    scripted = iter([100.0, 20.0, 90.0, 80.0, 10.0])

    def fake_rollout(policy, spec, episodes, seed, *args, **kwargs):
        return Rollout(np.full(episodes, next(scripted)), np.ones(episodes, np.int64))

    monkeypatch.setattr(train, "rollout", fake_rollout)
    cfg = tiny_config(total_steps=3000, eval_freq=1000, confirm_episodes=3)
    m = train.run(cfg, tmp_path / "out").manifest["metrics"]
    assert m["best_eval_step"] == 2000 and m["best_score"] == pytest.approx(85.0)
    assert m["best_eval_mean_return"] == pytest.approx(100.0)  # the best raw evaluation, reported as before
