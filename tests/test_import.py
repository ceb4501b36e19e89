"""`dqnc import`: foreign Q-networks in, checked against their source; bad files out with one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dqnc.cli import app
from dqnc.config import ImportConfig
from dqnc.errors import DqncError
from dqnc.importers import load_source
from tests.torchzip_writer import malicious_call, sb3_zip, torch_zip, vecnormalize_pickle

runner = CliRunner()
ENV = "CartPole-v1"
RNG = np.random.default_rng(7)
# Observations well outside CartPole's usual range too, so clipping and every unit get exercised.
STATES = (RNG.normal(size=(400, 4)) * np.array([2.0, 3.0, 0.3, 3.0])).astype(np.float32)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQNC_CACHE", str(tmp_path / "cache"))


def _mlp(sizes: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Torch-layout (out, in) Linear weights."""
    r = np.random.default_rng(seed)
    return [((r.normal(size=(o, i)) / np.sqrt(i)).astype(np.float32), r.normal(size=o).astype(np.float32) * 0.1)
            for i, o in zip(sizes, sizes[1:])]


def _torch_forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, act=np.tanh) -> np.ndarray:
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = act(x)
    return x


def _state_dict(prefix: str, layers: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {}
    for i, (w, b) in enumerate(layers):
        out[f"{prefix}.{2 * i}.weight"] = w
        out[f"{prefix}.{2 * i}.bias"] = b
    return out


def _import(*args: str) -> dict:
    r = runner.invoke(app, ["import", *args, "--env", ENV, "--check-states", "300", "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _artifact_q(path: str, states: np.ndarray) -> np.ndarray:
    from dqnc import artifact as art
    from dqnc.policy import q_function

    return q_function(art.load(path))(states)


def _fails(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[0].startswith("error:"), r.output
    return " ".join(r.stderr.split())


# --- PyTorch formats ----------------------------------------------------------------------------

def test_cleanrl_checkpoint_imports_to_within_1e5_of_its_q_range(tmp_path: Path):
    layers = _mlp([4, 24, 16, 2], seed=1)
    src = tmp_path / "dqn.cleanrl_model"
    src.write_bytes(torch_zip(_state_dict("network", layers)))
    res = _import(str(src), "-o", str(tmp_path / "out"))
    c = res["metrics"]["check"]
    assert c["rel_error"] <= 1e-5 and c["action_mismatches"] == 0 and c["states"] == 300
    assert res["origin"]["format"] == "cleanrl"
    assert res["origin"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert [m["source"] for m in res["origin"]["mapping"]] == [f"network.{i}.weight/bias" for i in (0, 2, 4)]
    assert res["metrics"]["imported_mean_return"] == res["metrics"]["source_mean_return"]
    # Independently of dqnc's own check: the artifact reproduces torch's x @ W.T + b with ReLU.
    want = _torch_forward(layers, STATES, act=lambda v: np.maximum(v, 0))
    got = _artifact_q(res["path"], STATES)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())


def test_sb3_zip_maps_the_online_q_net_and_its_activation(tmp_path: Path):
    online, target = _mlp([4, 32, 32, 2], seed=2), _mlp([4, 32, 32, 2], seed=3)
    src = tmp_path / "dqn.zip"
    src.write_bytes(sb3_zip(_state_dict("q_net.q_net", online) | _state_dict("q_net_target.q_net", target), [32, 32], "Tanh"))
    res = _import(str(src), "-o", str(tmp_path / "out"))
    assert res["origin"]["format"] == "sb3" and res["network"]["activations"] == ["tanh", "tanh"]
    got = _artifact_q(res["path"], STATES)
    want = _torch_forward(online, STATES)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert np.max(np.abs(got - _torch_forward(target, STATES))) > 0.1  # not the target network


def test_sb3_zip_whose_net_arch_disagrees_with_its_tensors_is_refused(tmp_path: Path):
    src = tmp_path / "dqn.zip"
    src.write_bytes(sb3_zip(_state_dict("q_net.q_net", _mlp([4, 32, 32, 2], 2)), [64, 64], None))
    msg = _fails(["import", str(src), "--env", ENV])
    assert "net_arch [64, 64]" in msg and "[32, 32]" in msg


def test_vecnormalize_statistics_and_clip_are_folded_exactly(tmp_path: Path):
    layers = _mlp([4, 16, 2], seed=4)
    src, pkl = tmp_path / "dqn.zip", tmp_path / "vecnormalize.pkl"
    src.write_bytes(sb3_zip(_state_dict("q_net.q_net", layers), [16], "Tanh"))
    mean, var, clip = np.array([0.1, -0.2, 0.01, 0.3]), np.array([0.5, 2.0, 0.01, 3.0]), 1.5
    pkl.write_bytes(vecnormalize_pickle(mean, var, clip))
    res = _import(str(src), "--obs-norm", str(pkl), "-o", str(tmp_path / "out"))
    assert res["metrics"]["check"]["rel_error"] <= 1e-5
    pre = res["origin"]["preprocessing"][0]
    assert pre["kind"] == "VecNormalize" and "honoured" in pre["clip"]
    normed = np.clip((STATES - mean) / np.sqrt(var + 1e-8), -clip, clip).astype(np.float32)
    assert np.mean(np.abs(normed) == clip) > 0.2  # the clip is really exercised
    want = _torch_forward(layers, normed)
    got = _artifact_q(res["path"], STATES)  # raw observations in: the edge policy needs no preprocessing
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())


def test_a_pickle_calling_os_system_is_refused_and_never_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.cleanrl_model"
    src.write_bytes(torch_zip(_state_dict("network", _mlp([4, 8, 2], 5)), inject=malicious_call(arg=f"touch {marker}")))
    msg = _fails(["import", str(src), "--env", ENV])
    assert "os.system" in msg and "nothing from it was executed" in msg
    assert not marker.exists()
    pkl = tmp_path / "vn.pkl"
    pkl.write_bytes(b"\x80\x04" + malicious_call("builtins", "eval", "1") + b".")
    good = tmp_path / "ok.cleanrl_model"
    good.write_bytes(torch_zip(_state_dict("network", _mlp([4, 8, 2], 5))))
    assert "builtins.eval" in _fails(["import", str(good), "--env", ENV, "--obs-norm", str(pkl)])


def test_conv_layers_and_wrong_env_are_refused_naming_what_is_supported(tmp_path: Path):
    src = tmp_path / "atari.cleanrl_model"
    src.write_bytes(torch_zip({"network.0.weight": np.zeros((32, 4, 8, 8), np.float32),
                               "network.0.bias": np.zeros(32, np.float32)}))
    msg = _fails(["import", str(src), "--env", ENV])  # a conv with no Linear after it
    assert "Conv2d layers then Linear layers" in msg and "supported: nn.Conv2d" in msg
    ok = tmp_path / "lunar.cleanrl_model"
    ok.write_bytes(torch_zip(_state_dict("network", _mlp([8, 8, 4], 6))))
    assert "takes 8 inputs" in _fails(["import", str(ok), "--env", ENV])


# --- ONNX ---------------------------------------------------------------------------------------

def _onnx_model(layers, fixed_batch: bool = False, extra_node=None, norm=None, cast_to=None) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    batch = 1 if fixed_batch else "batch"
    nodes, inits, x = [], [], "observation"
    if cast_to is not None:  # SB3's q_net, exported by torch.onnx, starts with a Cast to float
        nodes.append(helper.make_node("Cast", [x], ["cast"], to=cast_to))
        x = "cast"
    if norm is not None:  # (x - mean) / std, as a preprocessing wrapper exports
        inits += [numpy_helper.from_array(norm[0].astype(np.float32), "mean"),
                  numpy_helper.from_array(norm[1].astype(np.float32), "std")]
        nodes += [helper.make_node("Sub", [x, "mean"], ["centered"]), helper.make_node("Div", ["centered", "std"], ["normed"])]
        x = "normed"
    nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    x = "flat"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        if i == 1:  # torch.onnx exports some Linear layers as MatMul + Add
            inits[-2] = numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}")
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"])]
        else:
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"y{i}"], transB=1, alpha=1.0, beta=1.0))
        x = f"y{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Tanh" if i else "Relu", [x], [f"a{i}"]))
            x = f"a{i}"
    if extra_node is not None:
        nodes.append(helper.make_node(extra_node, [x], ["extra"]))
        x = "extra"
    nodes.append(helper.make_node("Identity", [x], ["q_values"]))
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("observation", TensorProto.FLOAT, [batch, 4])],
                              [helper.make_tensor_value_info("q_values", TensorProto.FLOAT, [batch, 2])], inits)
    return helper.make_model(graph, producer_name="pytorch", opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("fixed_batch", [False, True])
def test_onnx_gemm_matmul_graph_imports_exactly(tmp_path: Path, fixed_batch: bool):
    layers = _mlp([4, 16, 16, 2], seed=8)
    mean, std = np.array([0.1, 0.0, -0.1, 0.5]), np.array([1.0, 2.0, 0.2, 3.0])
    src = tmp_path / "policy.onnx"
    src.write_bytes(_onnx_model(layers, fixed_batch, norm=(mean, std)))
    res = _import(str(src), "-o", str(tmp_path / "out"))
    assert res["origin"]["format"] == "onnx" and res["origin"]["batch"] == ("fixed 1" if fixed_batch else "dynamic")
    assert res["metrics"]["check"]["rel_error"] <= 1e-5
    acts = [lambda v: np.maximum(v, 0), np.tanh]
    x = ((STATES - mean) / std).astype(np.float32)
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        x = acts[i](x) if i < 2 else x
    got = _artifact_q(res["path"], STATES)
    assert np.max(np.abs(got - x)) <= 1e-5 * (x.max() - x.min())


def test_onnx_cast_to_float_imports_and_other_casts_are_refused(tmp_path: Path):
    """Found with a real SB3 2.9.2 / torch 2.13 export (benchmarks/import_sb3.py): a leading Cast."""
    from onnx import TensorProto

    layers = _mlp([4, 8, 2], seed=10)
    src = tmp_path / "sb3.onnx"
    src.write_bytes(_onnx_model(layers, cast_to=TensorProto.FLOAT))
    res = _import(str(src), "-o", str(tmp_path / "out"))
    assert res["metrics"]["check"]["rel_error"] <= 1e-5
    bad = tmp_path / "int.onnx"
    bad.write_bytes(_onnx_model(layers, cast_to=TensorProto.INT64))
    msg = _fails(["import", str(bad), "--env", ENV])
    assert "Cast" in msg and "only a cast to float32" in msg


def test_onnx_unsupported_op_is_named_with_the_supported_list(tmp_path: Path):
    src = tmp_path / "softmax.onnx"
    src.write_bytes(_onnx_model(_mlp([4, 8, 2], 9), extra_node="Softmax"))
    msg = _fails(["import", str(src), "--env", ENV])
    assert "'Softmax'" in msg and "supported: Gemm, MatMul" in msg


# --- Keras --------------------------------------------------------------------------------------

KERAS3_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, keras
    out = sys.argv[1]
    x = np.load(out + "/states.npy")
    norm = keras.layers.Normalization()
    norm.adapt(np.random.default_rng(0).normal(size=(256, 4)).astype("float32") * [1, 2, 0.2, 2] + [0, 1, 0, -1])
    seq = keras.Sequential([keras.Input((4,)), keras.layers.Rescaling(0.5, offset=0.1), norm,
                            keras.layers.Dense(16, activation="relu"), keras.layers.Dropout(0.1),
                            keras.layers.Dense(16), keras.layers.Activation("tanh"), keras.layers.Dense(2)])
    seq.save(out + "/seq.keras"); seq.save(out + "/seq.h5")
    np.save(out + "/seq.npy", seq.predict(x, verbose=0))
    inp = keras.Input((4,), name="obs")
    h = keras.layers.Normalization(mean=[0, 1, 0, -1], variance=[1, 4, 0.04, 4])(inp)
    h = keras.layers.Dense(12, activation="elu")(h)
    q = keras.layers.Dense(2, name="q")(h)
    func = keras.Model(inp, q)
    func.save(out + "/func.keras")
    np.save(out + "/func.npy", func.predict(x, verbose=0))
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    plain.export(out + "/exported", format="tf_saved_model", verbose=False)
    np.save(out + "/exported.npy", plain.predict(x, verbose=0))
    bad = keras.Sequential([keras.Input((4,)), keras.layers.LayerNormalization(), keras.layers.Dense(2)])
    bad.save(out + "/bad.keras")
""")


@pytest.fixture(scope="module")
def keras3_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keras3")
    np.save(out / "states.npy", STATES)
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}  # Keras 3, not tf_keras
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    subprocess.run([sys.executable, "-c", KERAS3_SCRIPT, str(out)], check=True, env=env, capture_output=True)
    return out


@pytest.mark.parametrize("name,pred", [("seq.keras", "seq"), ("seq.h5", "seq"), ("func.keras", "func"),
                                       ("exported", "exported")])
def test_keras3_files_import_and_match_keras_predictions(keras3_files: Path, tmp_path: Path, name: str, pred: str):
    res = _import(str(keras3_files / name), "-o", str(tmp_path / "out"))
    assert res["origin"]["format"] == "keras" and res["metrics"]["check"]["rel_error"] <= 1e-5
    want = np.load(keras3_files / f"{pred}.npy")
    got = _artifact_q(res["path"], STATES)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())
    if pred == "seq":
        kinds = [p["kind"] for p in res["origin"]["preprocessing"]]
        assert kinds == ["Rescaling", "Normalization"]
        assert res["network"]["hidden"] == [16, 16]  # both preprocessing layers folded away


def test_keras3_unsupported_layer_is_named(keras3_files: Path):
    msg = _fails(["import", str(keras3_files / "bad.keras"), "--env", ENV])
    assert "LayerNormalization" in msg and "supported layers: InputLayer, Dense" in msg


def test_tf_keras_h5_and_savedmodel_with_normalization_import(tmp_path: Path):
    from dqnc.keras import keras

    k = keras()
    norm = k.layers.Normalization(mean=[0.0, 1.0, 0.0, -1.0], variance=[1.0, 4.0, 0.04, 4.0])
    model = k.Sequential([k.Input((4,)), norm, k.layers.Dense(8, activation="tanh"), k.layers.Dense(2)])
    want = model.predict(STATES, verbose=0)
    model.save(str(tmp_path / "m.h5"))
    model.save(str(tmp_path / "sm"), save_format="tf")
    for src in ("m.h5", "sm"):
        res = _import(str(tmp_path / src), "-o", str(tmp_path / f"out-{src}"))
        got = _artifact_q(res["path"], STATES)
        assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min()), src


# --- stages take foreign files directly ----------------------------------------------------------

def test_eval_and_export_accept_a_foreign_file_with_env(tmp_path: Path):
    src = tmp_path / "policy.onnx"
    src.write_bytes(_onnx_model(_mlp([4, 16, 2], 10)))
    r = runner.invoke(app, ["eval", str(src), "--env", ENV, "-n", "3", "--latency-samples", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stage"] == "import"
    r = runner.invoke(app, ["export", str(src), "--env", ENV, "-o", str(tmp_path / "bundle"), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "bundle" / "model.tflite").is_file()
    assert "pass --env" in _fails(["eval", str(src)])


def test_a_fold_that_changes_the_q_values_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import dqnc.importers as imp

    real = imp.fold

    def off_by_a_bit(ops, obs_dim):
        w, a = real(ops, obs_dim)
        w[-1] = w[-1] + np.float32(1e-3)  # a bias error a careless fold could make
        return w, a

    monkeypatch.setattr(imp, "fold", off_by_a_bit)
    src = tmp_path / "dqn.cleanrl_model"
    src.write_bytes(torch_zip(_state_dict("network", _mlp([4, 8, 2], 11))))
    msg = _fails(["import", str(src), "--env", ENV, "--check-states", "100", "-o", str(tmp_path / "o")])
    assert "does not reproduce the source" in msg and "of the Q range" in msg
    assert not (tmp_path / "o").exists()


# --- damaged files ------------------------------------------------------------------------------

def test_truncated_files_fail_with_one_line(tmp_path: Path):
    files = {
        "t.cleanrl_model": torch_zip(_state_dict("network", _mlp([4, 8, 2], 12))),
        "t.zip": sb3_zip(_state_dict("q_net.q_net", _mlp([4, 8, 2], 12)), [8], None),
        "t.onnx": _onnx_model(_mlp([4, 8, 2], 12)),
    }
    for name, data in files.items():
        for cut in (len(data) // 3, len(data) - 7):
            p = tmp_path / name
            p.write_bytes(data[:cut])
            _fails(["import", str(p), "--env", ENV, "-o", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


def _survives(data: bytes, suffix: str, tmp: Path) -> None:
    p = tmp / f"fuzz{suffix}"
    p.write_bytes(data)
    try:
        load_source(p, ImportConfig(env=ENV)).forward(STATES[:4])
    except DqncError as e:
        assert "\n" not in str(e)


_TORCH = torch_zip(_state_dict("network", _mlp([4, 8, 2], 13)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_byte_flips_never_crash_the_readers(tmp_path: Path, data: st.DataObject):
    onnx_bytes = _onnx_model(_mlp([4, 8, 2], 13))
    which = data.draw(st.sampled_from(["torch", "onnx"]))
    blob = bytearray(_TORCH if which == "torch" else onnx_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    _survives(bytes(blob), ".cleanrl_model" if which == "torch" else ".onnx", tmp_path)


def test_pickle_with_in_archive_byte_flips_gives_one_line(tmp_path: Path):
    """Flip bytes inside data.pkl and re-zip (so the CRC is valid): every failure is one line."""
    base = torch_zip(_state_dict("network", _mlp([4, 8, 2], 14)))
    with zipfile.ZipFile(io.BytesIO(base)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    r = np.random.default_rng(0)
    for trial in range(120):
        pkl = bytearray(members["archive/data.pkl"])
        for _ in range(1 + trial % 3):
            pkl[r.integers(len(pkl))] ^= int(r.integers(1, 256))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for n, v in members.items():
                zf.writestr(n, bytes(pkl) if n.endswith("data.pkl") else v)
        _survives(buf.getvalue(), ".cleanrl_model", tmp_path)


def test_import_help_and_sniffing_never_import_tensorflow(tmp_path: Path):
    src = tmp_path / "x.cleanrl_model"
    src.write_bytes(torch_zip(_state_dict("network", _mlp([4, 8, 2], 15))))
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom dqnc.cli import app\nfrom dqnc.importers import sniff, load_source\n"
            "from dqnc.config import ImportConfig\nfrom pathlib import Path\n"
            "assert CliRunner().invoke(app, ['import', '--help']).exit_code == 0\n"
            f"p = Path({str(src)!r}); assert sniff(p) == 'torch'; load_source(p, ImportConfig(env='CartPole-v1'))\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
