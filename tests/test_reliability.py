"""Bad input never crashes or damages anything: one line, exit 2 (130 for interrupts), no traceback,
and not one changed byte under existing outputs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dqnc import recipe
from dqnc.cli import app
from dqnc.errors import DqncError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_exit_2(r) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) <= 3, r.output  # one message (soft-wrapped at most)


# --- models ---------------------------------------------------------------------------------------

def test_bad_models_leave_existing_artifacts_byte_identical(tmp_path, trained, int8):
    keep = tmp_path / "keep"
    shutil.copytree(trained, keep / "train")
    shutil.copytree(int8, keep / "int8")
    before = tree_digest(keep)
    (tmp_path / "notsm").mkdir()
    (tmp_path / "notsm" / "weights.bin").write_bytes(b"\0" * 10)
    tampered = tmp_path / "tampered"
    shutil.copytree(trained, tampered)
    (tampered / "mlp.npz").write_bytes(b"garbage")
    cases = [
        ["eval", str(tmp_path / "missing")],
        ["eval", str(tmp_path / "notsm")],
        ["eval", str(tampered)],
        ["inspect", str(tampered)],
        ["prune", str(tampered), "-o", str(tmp_path / "x")],
        ["eval", str(keep / "train"), "--env", "Acrobot-v1"],
        ["quantize", str(keep / "int8"), "-o", str(tmp_path / "y")],
        ["prune", str(keep / "train"), "-o", str(keep / "int8")],  # existing output without --force
        ["train", "--env", "CartPole-v1", "-o", str(keep / "train")],
        ["export", str(keep / "int8"), "-o", str(keep / "train" / "manifest.json")],
    ]
    for args in cases:
        r = runner.invoke(app, args)
        _one_line_exit_2(r)
    assert tree_digest(keep) == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_keras_model_with_layers_dqnc_cannot_prune_gets_a_clear_message(tmp_path):
    from dqnc.keras import keras

    k = keras()
    norm = k.layers.Normalization(name="norm", mean=[0.0] * 4, variance=[1.0] * 4)
    model = k.Sequential([k.Input((4,)), norm, k.layers.Dense(8, activation="relu"), k.layers.Dense(2)])
    model.save(str(tmp_path / "sm"), save_format="tf")
    before = tree_digest(tmp_path / "sm")
    r = runner.invoke(app, ["prune", str(tmp_path / "sm"), "--env", "CartPole-v1", "-o", str(tmp_path / "p")])
    _one_line_exit_2(r)
    assert "Normalization" in r.output and "fold" in r.output
    assert tree_digest(tmp_path / "sm") == before and not (tmp_path / "p").exists()


def test_disk_full_during_a_write_exits_2_and_leaves_nothing(tmp_path, int8, monkeypatch):
    import dqnc.export as export

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "b" / "model_data.cc"))

    monkeypatch.setattr(export, "c_array", full)
    r = runner.invoke(app, ["export", str(int8), "-o", str(tmp_path / "b")])
    _one_line_exit_2(r)
    assert "No space left on device" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary sibling


@pytest.mark.parametrize("seed", range(12))
def test_corrupted_flatbuffers_never_crash_the_process(int8, tmp_path, seed):
    data = bytearray((Path(int8) / "model.tflite").read_bytes())
    rng = np.random.default_rng(seed)
    for i in rng.integers(0, len(data), int(rng.integers(1, 20))):
        data[i] = int(rng.integers(0, 256))
    f = tmp_path / "m.tflite"
    f.write_bytes(bytes(data))
    out = subprocess.run([sys.executable, "-m", "dqnc", "eval", str(f), "--env", "CartPole-v1", "-n", "2",
                          "--latency-samples", "0", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 2), out.stderr[-1500:]
    assert "Traceback" not in out.stderr
    if out.returncode == 0:  # the flips left a loadable model: its result is a well-formed report
        assert json.loads(out.stdout)["episodes"] == 2
    # inside an artifact the same damage is caught by the checksum before any load
    art_copy = tmp_path / "art"
    shutil.copytree(int8, art_copy)
    (art_copy / "model.tflite").write_bytes(bytes(data))
    r = runner.invoke(app, ["eval", str(art_copy), "-n", "2"])
    if bytes(data) != (Path(int8) / "model.tflite").read_bytes():
        _one_line_exit_2(r)
        assert "checksum mismatch" in r.output


# --- recipe fuzzing --------------------------------------------------------------------------------

KEYS = ["source", "stages", "eval", "gates", "out_dir", "name", "version", "artifact", "train", "env", "stage",
        "sparsity", "mode", "episodes", "input", "min_return", "seed", "total_steps", "prune", "quantize",
        "export", "hidden", "c_name", "savedmodel", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.sampled_from(["CartPole-v1", "prune", "quantize", "export", "eval", "int8", "x", "", "../x",
                                     "Nope-v0", "mod:Env-v0"]))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                         max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents)
def test_any_generated_recipe_is_valid_or_a_clean_error(tmp_path, doc):
    p = tmp_path / "fuzz.yaml"
    p.write_text(yaml.safe_dump(doc))
    try:
        recipe.load(p)
    except DqncError as e:
        assert e.exit_code == 2 and str(e) and "\n" not in str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list("abc:{}[]-&*!|>'\"#\n 0.12")), max_size=80))
def test_any_yaml_text_is_valid_or_a_clean_error(tmp_path, text):
    p = tmp_path / "fuzz.yaml"
    p.write_text(text)
    try:
        recipe.load(p)
    except DqncError as e:
        assert e.exit_code == 2 and str(e)


# --- interruptions ---------------------------------------------------------------------------------

def _default_sigint() -> None:
    """In the child: SIGINT back to its default. A test run started in the background of a
    non-interactive shell (`cmd &`, nohup) inherits SIGINT ignored, and Python then never raises
    KeyboardInterrupt: the tests are about what dqnc does with Ctrl-C, not about the runner's shell."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dqnc", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _wait_until(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll ``cond()`` (no fixed sleeps: a slow machine just waits longer, a fast one goes on)."""
    t0 = time.monotonic()
    while not cond():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() - t0 < timeout, f"{what} never happened"
        time.sleep(0.05)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    _wait_until(path.exists, proc, f"{path} appearing", timeout)


def _working(proc: subprocess.Popen, cpu_seconds: float) -> Callable[[], bool]:
    """True once the child has TensorFlow loaded and has spent ``cpu_seconds`` of CPU beyond that
    import's cost: it is inside the stage's own work."""
    clock = os.sysconf("SC_CLK_TCK")
    loaded_at: list[float] = []

    def cond() -> bool:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / clock
            loaded = "tensorflow" in Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            return False
        if loaded and not loaded_at:
            loaded_at.append(cpu)
        return bool(loaded_at) and cpu - loaded_at[0] >= cpu_seconds

    return cond


def _events_grew(logdir: Path) -> Callable[[], bool]:
    """True once a TensorBoard events file holds a scalar (the first training call has run)."""
    def cond() -> bool:
        files = list(logdir.glob("events.out.tfevents.*"))
        return bool(files) and files[0].stat().st_size > 200
    return cond


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_training_exits_130_keeps_a_checkpoint_and_resumes(tmp_path, sig):
    args = ["train", "--env", "CartPole-v1", "-o", "out", "--total-steps", "400000", "--no-early-stop", "-q",
            "--hidden", "32,32", "--logdir", "tb", "--eval-freq", "2000"]
    proc = _start(args, tmp_path)
    _wait_until(_events_grew(tmp_path / "tb"), proc, "a first training scalar")  # inside the loop
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    state = json.loads((tmp_path / "out.ckpt" / "state.json").read_text())
    done = state["state"]["step"]
    assert done > 0
    total = done + 2000
    r = subprocess.run([sys.executable, "-m", "dqnc", "train", "--env", "CartPole-v1", "-o", "out", "--total-steps",
                        str(total), "--no-early-stop", "-q", "--hidden", "32,32", "--eval-freq", "2000", "--resume",
                        "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["metrics"]["env_steps"] >= total
    assert not (tmp_path / "out.ckpt").exists()


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_interrupted_prune_and_quantize_leave_no_output(tmp_path, trained, pruned, command):
    src = pruned if command == "quantize" else trained
    extra = ["--calibration-states", "5000000"] if command == "quantize" else ["--states", "50000", "--epochs", "200"]
    proc = _start([command, str(src), "-o", "out", *extra], tmp_path)
    _wait_until(_working(proc, 6.0), proc, "the stage's work starting")  # past the TF import (~4 s of CPU), into the work
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_interrupted_run_exits_130_and_a_rerun_resumes(tmp_path):
    data = {"out_dir": "out", "source": {"train": {"env": "CartPole-v1", "total_steps": 400000, "early_stop": False,
                                                   "hidden": [32, 32], "eval_freq": 2000}},
            "stages": [{"name": "fp32", "stage": "export"}], "eval": {"episodes": 2, "latency_samples": 0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    log = tmp_path / "stderr.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "dqnc", "run", "r.yaml"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=sink, text=True, preexec_fn=_default_sigint)
        started = _working(proc, 6.0)  # TensorFlow is imported after the message: its import costs ~4 s of CPU
        # The recipe has said it is training, and the child has done real work since.
        _wait_until(lambda: "[train] training" in log.read_text() and started(), proc, "training starting")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    err = log.read_text()
    assert proc.returncode == 130, err
    assert not (tmp_path / "out" / "train").exists()
    ckpt = tmp_path / "out" / "train.ckpt"
    assert (ckpt / "state.json").is_file()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["passed"] is False
    # the lock was released: a new run is not refused, and it resumes from the checkpoint
    step = json.loads((ckpt / "state.json").read_text())["state"]["step"]
    r = subprocess.run([sys.executable, "-m", "dqnc", "run", "r.yaml", "--set", f"source.train.total_steps={step + 1000}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    # total_steps changed, which a resume allows; everything else matches the checkpoint
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())["metrics"]
    assert m["env_steps"] == step + 1000


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path, trained, monkeypatch):
    # CI runs as root, which ignores file modes; the permission check itself is what is exercised.
    import dqnc.artifact as artifact

    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(artifact.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    r = runner.invoke(app, ["prune", str(trained), "-o", str(locked / "out")])
    _one_line_exit_2(r)
    assert "not writable" in r.output
    assert list(locked.iterdir()) == []
