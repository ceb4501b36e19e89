"""Hostile Keras files: no code stored in a model ever runs, and no declared size is allocated unchecked.

Every test builds its own malicious file and fails on the code before dqnc.savedmodel existed
(the comment on each says what happened then, measured on git baa1149 with this file).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc.cli import app

runner = CliRunner()
ENV = "CartPole-v1"
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_models" / "cartpole"
CHILD_AS_LIMIT = 4 << 30  # address space of a child run: the old code hit MemoryError there instead of swapping
MAX_CHILD_RSS = 1 << 30  # peak RSS allowed for a refused file (a child without TensorFlow uses ~0.2 GB)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQNC_CACHE", str(tmp_path / "cache"))


def _refused(args: list[str], *words: str) -> str:
    """The command exits 2 with one line (no traceback) that contains ``words``."""
    r = runner.invoke(app, args)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output and len(lines) == 1 and lines[0].startswith("error:"), r.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# --- fixtures: code-carrying SavedModels -------------------------------------------------------

@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tf_keras SavedModels whose Lambda writes a marker file when revived, and a tf.Module
    SavedModel (export() shape: no keras_metadata.pb) whose restore runs an initializer writing one."""
    from dqnc.keras import keras, tf

    k, t = keras(), tf()
    d = tmp_path_factory.mktemp("evil")
    marker = d / "code-ran"
    lam = k.layers.Lambda(lambda x, m=str(marker): (open(m, "w").close(), x)[1], name="evil")
    top = k.Sequential([k.Input((4,), name="obs"), k.layers.Dense(8, activation="relu", name="dense_0"), lam,
                        k.layers.Dense(2, name="q_values")], name="q_network")
    top.save(str(d / "lambda"), save_format="tf", include_optimizer=False)
    # The same Lambda one model down, where a check of the top-level layers does not look.
    inner = k.Sequential([k.layers.Dense(8, activation="relu"),
                          k.layers.Lambda(lambda x, m=str(marker): (open(m, "w").close(), x)[1], name="hidden")],
                         name="inner")
    inp = k.Input((4,), name="obs")
    nested = k.Model(inp, k.layers.Dense(2, name="q")(inner(inp)), name="outer")
    nested.save(str(d / "nested"), save_format="tf", include_optimizer=False)

    class Initializer(t.saved_model.experimental.TrackableResource):
        def _create_resource(self):
            return t.raw_ops.VarHandleOp(dtype=t.float32, shape=[], shared_name="")

        def _initialize(self):  # traced into the restore graph; tf.saved_model.load runs it
            t.io.write_file(str(marker), "restore ran code")

    class Net(t.Module):
        def __init__(self) -> None:
            r = np.random.default_rng(0)
            self.w1 = t.Variable(r.normal(size=(4, 8)).astype(np.float32))
            self.b1 = t.Variable(np.full(8, 0.1, np.float32))
            self.w2 = t.Variable(r.normal(size=(8, 2)).astype(np.float32))
            self.b2 = t.Variable(np.zeros(2, np.float32))
            self.hook = Initializer()

        @t.function(input_signature=[t.TensorSpec([None, 4], t.float32)])
        def serve(self, x):
            h = t.nn.relu(t.nn.bias_add(t.matmul(x, self.w1), self.b1))
            return t.matmul(h, self.w2) + self.b2

    net = Net()
    t.saved_model.save(net, str(d / "exported"), signatures={"serving_default": net.serve})
    marker.unlink(missing_ok=True)  # building and saving the Lambda models called it
    return {"marker": marker, "lambda": d / "lambda", "nested": d / "nested", "exported": d / "exported"}


# (a) Before: quantize and eval exited 0 and wrote the marker (tf_keras.models.load_model revived
# the Lambda's bytecode); prune wrote it, then exited 2 ("this model also has Lambda"); import
# refused the top-level Lambda without saying why; quantize of the nested one wrote it, then exit 3.
@pytest.mark.parametrize("command", ["quantize", "eval", "prune", "import"])
def test_lambda_savedmodel_is_refused_by_every_stage_and_never_runs(evil: dict[str, Path], tmp_path: Path, command: str):
    extra = {"eval": ["--episodes", "1", "--latency-samples", "0"], "import": ["--check-states", "100"]}.get(command, [])
    out = [] if command == "eval" else ["-o", str(tmp_path / "out")]
    for model, layer in (("lambda", "'evil'"), ("nested", "'hidden'")):
        if model == "nested" and command not in ("import", "quantize"):
            continue
        _refused([command, str(evil[model]), "--env", ENV, *out, *extra], "Lambda", layer,
                 "it would run code stored in the file")
        assert not evil["marker"].exists(), f"{command} {model}: the Lambda ran"
        assert not (tmp_path / "out").exists()


# (b) Before: quantize exited 0 and eval ran the Lambda (the recomputed checksums verified fine).
def test_dqnc_artifact_with_a_swapped_model_and_recomputed_checksums_is_refused(evil: dict[str, Path], tmp_path: Path):
    from dqnc import artifact as art

    root = tmp_path / "cartpole"
    shutil.copytree(SAMPLE, root)
    shutil.rmtree(root / "model")
    shutil.copytree(evil["lambda"], root / "model")
    (root / "mlp.npz").unlink()  # so eval reads model/ too, as it does for an artifact without one
    manifest = json.loads((root / art.MANIFEST).read_text())
    manifest["files"] = art.file_checksums(root)
    (root / art.MANIFEST).write_text(json.dumps(manifest))
    art.load(root)  # the checksums verify: they prove nothing against an attacker
    _refused(["quantize", str(root), "-o", str(tmp_path / "q")], "Lambda", "'evil'")
    _refused(["eval", str(root), "--episodes", "1", "--latency-samples", "0"], "Lambda", "'evil'")
    assert not evil["marker"].exists()


# (c) Before: import called tf.saved_model.load, which ran the initializer (marker written), then
# exited 3 (AttributeError: '_UserObject' object has no attribute 'variables').
def test_exported_savedmodel_is_read_as_data_and_its_restore_code_never_runs(evil: dict[str, Path], tmp_path: Path):
    r = runner.invoke(app, ["import", str(evil["exported"]), "--env", ENV, "--check-states", "100", "-o",
                            str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    assert not evil["marker"].exists(), "the SavedModel's restore initializer ran"
    from dqnc import artifact as art
    from dqnc.policy import q_function

    x = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    rr = np.random.default_rng(0)
    w1, w2 = rr.normal(size=(4, 8)).astype(np.float32), rr.normal(size=(8, 2)).astype(np.float32)
    want = np.maximum(x @ w1 + np.float32(0.1), 0) @ w2
    np.testing.assert_allclose(q_function(art.load(tmp_path / "out"))(x), want, rtol=1e-5, atol=1e-5)


# Before: nothing checked these (dqnc.savedmodel did not exist: ImportError); load_model handed them
# to tf_keras, whose deserializer imports a layer's "module" key.
def test_config_objects_other_than_builtins_are_refused():
    from dqnc.errors import ArtifactError
    from dqnc.savedmodel import check_model_config

    def seq(layer: dict) -> dict:
        return {"class_name": "Sequential", "config": {"name": "s", "layers": [layer]}}

    dense = {"name": "d", "units": 2}
    for layer, words in [
        ({"class_name": "Dense", "config": {**dense, "activation": {"class_name": "Lambda", "config": {}}}}, "activation"),
        ({"class_name": "Dense", "config": {**dense, "activation": "os.system"}}, "activation"),
        ({"class_name": "Dense", "config": {**dense, "kernel_initializer": {"class_name": "Custom>Init"}}}, "kernel_initializer"),
        ({"class_name": "Custom>Layer", "config": dense}, "Custom>Layer"),
        ({"class_name": "TFOpLambda", "config": {"name": "d", "function": "io.write_file"}}, "would run code"),
    ]:
        with pytest.raises(ArtifactError, match=words):
            check_model_config(seq(layer), "m")
    clean = check_model_config(seq({"module": "os", "class_name": "Dense", "registered_name": "system",
                                    "config": {**dense, "activation": "relu"}}), "m")
    assert clean["config"]["layers"][0] == {"class_name": "Dense", "config": {**dense, "activation": "relu"}}


# --- declared sizes ------------------------------------------------------------------------------

def _deep(levels: int = 5000) -> str:
    return "[" * levels + "]" * levels


def _keras_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> None:
    """A zip written by hand: (name, stored bytes, method, uncompressed size, crc) per member."""
    body, central = bytearray(), bytearray()
    for name, data, method, size, crc in members:
        n = name.encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(data), size,
                               len(n), 0, 0, 0, 0, 0, len(body)) + n
        body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(data), size, len(n), 0) + n + data
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(body), 0)
    path.write_bytes(bytes(body + central + eocd))


def _stored(name: str, data: bytes) -> tuple[str, bytes, int, int, int]:
    return (name, data, 0, len(data), zlib.crc32(data))


_CONFIG = json.dumps({"class_name": "Sequential", "config": {"name": "s", "layers": [
    {"class_name": "InputLayer", "config": {"batch_shape": [None, 4], "name": "in"}},
    {"class_name": "Dense", "config": {"name": "dense", "units": 2, "activation": "linear"}}]}}).encode()


def _child(args: list[str], tmp: Path) -> tuple[int, str, int]:
    """``dqnc ARGS`` in a child (address space capped): exit code, stderr, its peak RSS in bytes."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_AS_LIMIT, CHILD_AS_LIMIT))
        resource.setrlimit(resource.RLIMIT_CPU, (120, 120))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(tmp / "stderr.txt", "wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "dqnc", *args], stdout=subprocess.DEVNULL, stderr=err, env=env,
                             preexec_fn=cap)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own peak, not the largest of all children
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, (tmp / "stderr.txt").read_text(errors="replace"), usage.ru_maxrss * 1024


def _child_refused(args: list[str], tmp: Path, *words: str) -> str:
    code, err, rss = _child(args, tmp)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-2000:])
    for w in words:
        assert w in lines[0], lines[0]
    assert rss < MAX_CHILD_RSS, f"peak RSS {rss / 2**30:.2f} GB"
    return lines[0]


# Before: the 3.1 MB file inflated its 3 GiB weights member in memory (6.2 GB RSS for the lead's
# 6 GB one); under this test's 4 GiB address-space cap that is a MemoryError, exit 3.
def test_keras_zip_bomb_is_refused_before_inflating(tmp_path: Path):
    size, chunk = 3 << 30, bytes(1 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    same = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)  # after a full flush every MiB compresses alike
    stream = head + same * (size // len(chunk) - 1) + comp.flush()
    crc, block = 0, bytes(64 << 20)
    for _ in range(size // len(block)):
        crc = zlib.crc32(block, crc)
    bomb = tmp_path / "bomb.keras"
    _keras_zip(bomb, [_stored("config.json", _CONFIG), _stored("metadata.json", b"{}"),
                      ("model.weights.h5", stream, zipfile.ZIP_DEFLATED, size, crc)])
    assert bomb.stat().st_size < 4 << 20
    _child_refused(["import", str(bomb), "--env", ENV, "-o", str(tmp_path / "out")], tmp_path,
                   "model.weights.h5", "3,221,225,472 bytes", "dqnc.limits")


# Before: the member was read whole; its zeros then failed as "not a readable HDF5 file", naming no limit.
def test_keras_zip_member_over_the_limit_names_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The limit is read when the file is, so a lowered one applies (here: 1 MiB against 4 MiB)."""
    import dqnc.limits

    monkeypatch.setattr(dqnc.limits, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    data = bytes(4 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = comp.compress(data) + comp.flush()
    bomb = tmp_path / "b.keras"
    _keras_zip(bomb, [_stored("config.json", _CONFIG),
                      ("model.weights.h5", stream, zipfile.ZIP_DEFLATED, len(data), zlib.crc32(data))])
    _refused(["import", str(bomb), "--env", ENV], "model.weights.h5", "dqnc.limits")


# Before: np.asarray(dataset) allocated the declared 4 GiB kernel (11.3 GB RSS for the lead's file);
# under the 4 GiB cap, a MemoryError: exit 3.
def test_h5_with_an_absurd_declared_shape_is_refused_before_reading(tmp_path: Path):
    import h5py

    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = _CONFIG.decode()
        f.attrs["keras_version"] = "2.15.0"
        g = f.create_group("model_weights/dense")
        g.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
        g.create_dataset("dense/kernel:0", shape=(4, 1 << 28), dtype="f4", chunks=(1, 1024))  # never written
        g.create_dataset("dense/bias:0", data=np.zeros(2, np.float32))
    assert path.stat().st_size < 64 << 10
    _child_refused(["import", str(path), "--env", ENV, "-o", str(tmp_path / "out")], tmp_path,
                   "kernel:0", "1,073,741,824 elements", "dqnc.limits")


# Before: json.loads recursed past Python's limit: RecursionError, exit 3 (an "internal error").
@pytest.mark.parametrize("container", [".keras", ".h5"])
def test_deeply_nested_config_json_is_one_line_exit_2(tmp_path: Path, container: str):
    import h5py

    path = tmp_path / f"deep{container}"
    if container == ".keras":
        _keras_zip(path, [_stored("config.json", _deep().encode()), _stored("model.weights.h5", b"")])
    else:
        with h5py.File(path, "w") as f:
            f.attrs["model_config"] = _deep()
    _refused(["import", str(path), "--env", ENV], "nested more than", "dqnc.limits")


# Before: quantize handed the metadata to tf_keras: "deep" was a RecursionError in its JSON decoder
# (exit 3); "huge" exited 0 (load_model revived the saved objects and ignored the config's units).
# Now the model is built from the config, so a declared size is checked before it is allocated.
@pytest.mark.parametrize("attack", ["deep", "huge"])
def test_keras_metadata_declaring_too_much_is_one_line_exit_2(evil: dict[str, Path], tmp_path: Path, attack: str):
    from dqnc.keras import keras

    keras()
    from tf_keras.protobuf import saved_metadata_pb2

    sm = tmp_path / attack
    shutil.copytree(SAMPLE / "model", sm)
    proto = saved_metadata_pb2.SavedMetadata()
    proto.ParseFromString((sm / "keras_metadata.pb").read_bytes())
    root = next(n for n in proto.nodes if n.node_path == "root")
    if attack == "deep":
        root.metadata = '{"class_name": "Sequential", "config": ' + _deep() + "}"
    else:
        meta = json.loads(root.metadata)
        meta["config"]["layers"][1]["config"]["units"] = 10**11
        root.metadata = json.dumps(meta)
    (sm / "keras_metadata.pb").write_bytes(proto.SerializeToString())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(["quantize", str(sm), "--env", ENV, "-o", str(tmp_path / "q")],
             "nested more than" if attack == "deep" else "400,000,000,000 elements", "dqnc.limits")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 256 << 20
