from __future__ import annotations

import json
from pathlib import Path

import pytest

from dqnc import artifact as art
from dqnc.envs import EnvSpec
from dqnc.errors import ArtifactError, OutputExistsError, UsageError

SPEC = EnvSpec(id="CartPole-v1", obs_shape=(4,), n_actions=2, reward_threshold=475.0)


def _write(out: Path, force: bool = False, payload: bytes = b"weights") -> dict:
    with art.atomic_output(out, force) as tmp:
        (tmp / art.MODEL_DIR).mkdir()
        (tmp / art.MODEL_DIR / "saved_model.pb").write_bytes(payload)
        return art.write_manifest(tmp, stage="train", env=SPEC, network={"hidden": [4]}, config={"seed": 1},
                                  metrics={"x": 1}, command=["dqnc", "train"])


def test_manifest_round_trip(tmp_path):
    written = _write(tmp_path / "a")
    loaded = art.load(tmp_path / "a")
    assert loaded.manifest == written
    assert loaded.env == SPEC
    assert loaded.kind == "savedmodel"
    assert loaded.manifest["files"] == {"model/saved_model.pb": art.sha256_file(tmp_path / "a/model/saved_model.pb")}
    for key in ("format_version", "dqnc_version", "stage", "created_utc", "parent", "env", "network", "config",
                "metrics", "versions", "command", "files"):
        assert key in written
    assert written["command"] == "dqnc train"


def test_model_dir_path_loads_its_artifact(tmp_path):
    _write(tmp_path / "a")
    assert art.load(tmp_path / "a" / "model").path == tmp_path / "a"


def test_checksum_mismatch_is_detected(tmp_path):
    _write(tmp_path / "a")
    (tmp_path / "a/model/saved_model.pb").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch for 'model/saved_model.pb'"):
        art.load(tmp_path / "a")


def test_missing_file_is_detected(tmp_path):
    _write(tmp_path / "a")
    (tmp_path / "a/model/saved_model.pb").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        art.load(tmp_path / "a")


def test_corrupt_manifest_and_newer_format_are_rejected(tmp_path):
    _write(tmp_path / "a")
    (tmp_path / "a/manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        art.load(tmp_path / "a")
    _write(tmp_path / "b")
    m = json.loads((tmp_path / "b/manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "b/manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="upgrade dqnc"):
        art.load(tmp_path / "b")


def test_existing_output_needs_force_and_is_kept_without_it(tmp_path):
    _write(tmp_path / "a", payload=b"first")
    with pytest.raises(OutputExistsError, match="--force"):
        _write(tmp_path / "a", payload=b"second")
    assert (tmp_path / "a/model/saved_model.pb").read_bytes() == b"first"
    _write(tmp_path / "a", force=True, payload=b"second")
    assert (tmp_path / "a/model/saved_model.pb").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary leftovers


def test_force_never_replaces_a_foreign_directory_or_a_file(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="not a dqnc artifact"):
        _write(tmp_path / "mine", force=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        _write(tmp_path / "f", force=True)
    assert (tmp_path / "mine/notes.txt").read_text() == "precious"


def test_a_failure_mid_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    _write(tmp_path / "a", payload=b"first")
    with pytest.raises(RuntimeError):
        with art.atomic_output(tmp_path / "a", force=True) as tmp:
            (tmp / "partial").write_text("half")
            raise RuntimeError("crash")
    assert (tmp_path / "a/model/saved_model.pb").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with pytest.raises(KeyboardInterrupt):
        with art.atomic_output(tmp_path / "new") as tmp:
            (tmp / "partial").write_text("half")
            raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()


def test_unknown_paths_give_clear_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        art.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="neither a dqnc artifact"):
        art.load(tmp_path / "empty")
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm/saved_model.pb").write_bytes(b"")
    with pytest.raises(UsageError, match="--env"):
        art.load(tmp_path / "sm")
    assert art.load(tmp_path / "sm", env=SPEC).stage == "external"
