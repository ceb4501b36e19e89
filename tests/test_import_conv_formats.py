"""Conv Q-networks from ONNX and Keras files: imported exactly (checked here against ONNX's own
``ReferenceEvaluator`` and Keras's own predictions, not only dqnc's reading), refused with one line
naming what is not supported, and fuzzed .onnx files never crash the reader."""

from __future__ import annotations

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

import tests.pixels_env  # noqa: F401  (registers Pixels-v0)
from dqnc.cli import app
from dqnc.config import ImportConfig
from dqnc.envs import env_spec, trust
from dqnc.errors import DqncError
from dqnc.importers import load_source

runner = CliRunner()
PIXELS = "tests.pixels_env:Pixels-v0"  # uint8 (4, 20, 20) CHW
trust(PIXELS)  # named here, as --env names it on the command line
MINATAR = "MinAtar/Breakout-v1"  # (10, 10, 4) HWC


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQNC_CACHE", str(tmp_path / "cache"))


def _import(src: Path, out: Path, env: str, *extra: str) -> dict:
    r = runner.invoke(app, ["import", str(src), "--env", env, "-o", str(out), "--check-states", "300",
                            "--check-episodes", "2", "--json", *extra])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _fails(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return " ".join(r.stderr.split())


def _artifact_q(path: str, states: np.ndarray) -> np.ndarray:
    from dqnc import artifact as art
    from dqnc.policy import q_function

    return q_function(art.load(path))(states)


_STATES: dict[str, np.ndarray] = {}


def _states(env_id: str, n: int = 2000) -> np.ndarray:
    """``n`` rollout states of a random-Q policy (the same uint8/bool tensors the env gives)."""
    if env_id not in _STATES:
        from dqnc.envs import collect_states

        spec = env_spec(env_id)
        rng = np.random.default_rng(0)
        _STATES[env_id] = collect_states(lambda o: rng.normal(size=(len(o), spec.n_actions)), spec, n, 91)
    return _STATES[env_id][:n]


def _exact(got: np.ndarray, want: np.ndarray) -> None:
    """The issue's bar: max |dQ| <= 1e-5 of the Q range and the same greedy action on every state."""
    assert len(want) >= 2000
    q_range = float(want.max() - want.min())
    assert q_range > 0
    assert float(np.max(np.abs(got - want))) <= 1e-5 * q_range
    assert np.array_equal(got.argmax(1), want.argmax(1))


# --- ONNX -----------------------------------------------------------------------------------------

def _layers(rng: np.random.Generator, shapes: list[tuple[int, ...]]) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for shape in shapes:
        fan_in = int(np.prod(shape[1:]))
        out.append(((rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32),
                    (rng.normal(size=shape[0]) * 0.1).astype(np.float32)))
    return out


def conv_onnx(convs, linears, strides, image: tuple[int, int, int], *, nhwc: bool = False, batch: int | str = "N",
              uint8: bool = False, pre: str = "div255", head: str = "gemm", flatten: str = "Flatten",
              conv_attrs: dict | None = None, extra: str | None = None, opset: int = 17) -> bytes:
    """A conv Q-network as torch.onnx writes one: [Cast] -> /255 (or per-channel Sub+Mul) -> [Transpose]
    -> Conv/Relu... -> Flatten (or Reshape) -> Gemm (transB) or MatMul+Add layers. ``image`` is
    the graph input's per-sample shape (CHW, or HWC with ``nhwc``)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "obs"

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=f"/{out}/{op}", **attrs))
        return out

    if uint8:
        x = node("Cast", [x], "cast", to=TensorProto.FLOAT)
    c = image[2] if nhwc else image[0]
    if pre == "div255":
        nodes.append(helper.make_node("Constant", [], ["k255"], value=numpy_helper.from_array(np.float32(255.0))))
        x = node("Div", [x, "k255"], "scaled")
    elif pre == "per_channel":  # (x - mean_c) * inv_std_c, channels broadcast as torch writes them
        shape = (1, 1, 1, c) if nhwc else (1, c, 1, 1)
        x = node("Sub", [x, const("mean", np.linspace(10, 90, c).reshape(shape).astype(np.float32))], "centered")
        x = node("Mul", [x, const("inv_std", np.linspace(0.01, 0.03, c).reshape(shape).astype(np.float32))], "normed")
    if nhwc:
        x = node("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
    for i, ((w, b), s) in enumerate(zip(convs, strides)):
        attrs = {"kernel_shape": list(w.shape[2:]), "strides": [s, s], "pads": [0, 0, 0, 0], "dilations": [1, 1],
                 "group": 1, **((conv_attrs or {}) if i == 0 else {})}
        x = node("Conv", [x, const(f"conv{i}.weight", w), const(f"conv{i}.bias", b)], f"conv{i}", **attrs)
        x = node("Relu", [x], f"relu{i}")
        if extra and i == 0:
            x = node(extra, [x], "extra", **({"kernel_shape": [2, 2]} if extra == "MaxPool" else {}))
    if flatten == "Flatten":
        x = node("Flatten", [x], "flat", axis=1)
    else:  # a fixed Reshape: [1, -1] for batch 1, [-1, n] otherwise
        target = [1, -1] if batch == 1 else [-1, int(linears[0][0].shape[1])]
        x = node("Reshape", [x, const("flat_shape", np.asarray(target, np.int64))], "flat")
    for i, (w, b) in enumerate(linears):
        if head == "gemm":
            x = node("Gemm", [x, const(f"fc{i}.weight", w), const(f"fc{i}.bias", b)], f"fc{i}", transB=1)
        else:
            x = node("MatMul", [x, const(f"fc{i}.weight_t", np.ascontiguousarray(w.T))], f"mm{i}")
            x = node("Add", [x, const(f"fc{i}.bias", b)], f"fc{i}")
        if i < len(linears) - 1:
            x = node("Relu", [x], f"fc_relu{i}")
    nodes.append(helper.make_node("Identity", [x], ["q_values"]))
    in_type = TensorProto.UINT8 if uint8 else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("obs", in_type, [batch, *image])],
                              [helper.make_tensor_value_info("q_values", TensorProto.FLOAT,
                                                             [batch, int(linears[-1][0].shape[0])])], inits)
    model = helper.make_model(graph, producer_name="pytorch", opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def _reference_q(data: bytes, states: np.ndarray, nhwc_from: str | None = None) -> np.ndarray:
    """ONNX's own ReferenceEvaluator on ``states`` (fed one at a time, as a batch-1 graph needs);
    ``nhwc_from="CHW"`` transposes CHW env states for an NHWC graph."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load_model_from_string(data)
    ev = ReferenceEvaluator(model)
    inp = model.graph.input[0]
    dtype = np.uint8 if inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8 else np.float32
    x = (states.transpose(0, 2, 3, 1) if nhwc_from == "CHW" else states).astype(dtype)
    if inp.type.tensor_type.shape.dim[0].dim_value != 1:  # a dynamic batch: all states at once
        return ev.run(None, {inp.name: x})[0]
    return np.concatenate([ev.run(None, {inp.name: x[i:i + 1]})[0] for i in range(len(x))])


PIXEL_NET = ([(8, 4, 4, 4), (16, 8, 3, 3)], [(32, 16 * 7 * 7), (3, 32)], [2, 1])  # 20x20 -> 9x9 -> 7x7


@pytest.mark.parametrize("case", [
    {"uint8": True, "pre": "div255", "head": "gemm", "batch": "N", "flatten": "Flatten"},
    {"nhwc": True, "pre": "per_channel", "head": "matmul", "batch": 1, "flatten": "Reshape", "opset": 18},
], ids=["nchw-uint8-cast-div255-dynamic-batch-flatten-gemm", "nhwc-transpose-per-channel-batch1-reshape-matmul-add"])
def test_onnx_conv_graph_imports_exactly_against_the_reference_evaluator(tmp_path: Path, case: dict):
    """Pixels-v0 gives CHW images: the NCHW graph reads them as they are, the NHWC one (its own
    Transpose in front of the first Conv) through dqnc's layout adaptation."""
    rng = np.random.default_rng(11)
    convs, linears = _layers(rng, PIXEL_NET[0]), _layers(rng, PIXEL_NET[1])
    nhwc = case.get("nhwc", False)
    data = conv_onnx(convs, linears, PIXEL_NET[2], (20, 20, 4) if nhwc else (4, 20, 20), **case)
    src = tmp_path / "q.onnx"
    src.write_bytes(data)
    res = _import(src, tmp_path / "imp", PIXELS)
    assert res["network"]["conv"] == [[8, 4, 2], [16, 3, 1]] and res["network"]["hidden"] == [32]
    assert res["network"]["layout"] == "CHW"  # the env's layout, whatever the graph's
    assert res["origin"]["conv_input"].startswith("HWC" if nhwc else "CHW")
    assert res["origin"]["batch"] == ("fixed 1" if case["batch"] == 1 else "dynamic")
    assert res["origin"]["reference"] == "onnx.reference.ReferenceEvaluator"
    kinds = [p["kind"] for p in res["origin"]["preprocessing"]]
    assert kinds == (["layout"] if nhwc else [])  # the /255 is in the graph: no input_scale assumed
    c = res["metrics"]["check"]
    assert c["rel_error"] <= 1e-5 and c["action_mismatches"] == 0
    states = _states(PIXELS)
    _exact(_artifact_q(res["path"], states), _reference_q(data, states, "CHW" if nhwc else None))


@pytest.mark.parametrize("attrs,named", [
    ({"pads": [1, 1, 1, 1]}, "pads [1, 1, 1, 1]"),
    ({"dilations": [2, 2]}, "dilations [2, 2]"),
    ({"auto_pad": "SAME_UPPER", "pads": None}, "auto_pad SAME_UPPER"),
])
def test_onnx_conv_padding_and_dilation_are_refused_by_name(tmp_path: Path, attrs: dict, named: str):
    rng = np.random.default_rng(13)
    convs, linears = _layers(rng, PIXEL_NET[0]), _layers(rng, PIXEL_NET[1])
    attrs = {k: v for k, v in attrs.items() if v is not None}
    data = conv_onnx(convs, linears, PIXEL_NET[2], (4, 20, 20), conv_attrs=attrs)
    if "auto_pad" in attrs:  # a graph with auto_pad carries no pads attribute
        import onnx

        m = onnx.load_model_from_string(data)
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        keep = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(keep)
        data = m.SerializeToString()
    src = tmp_path / "bad.onnx"
    src.write_bytes(data)
    msg = _fails(["import", str(src), "--env", PIXELS, "-o", str(tmp_path / "o")])
    assert named in msg and "supported: Conv with a square kernel" in msg and "no padding" in msg


@pytest.mark.parametrize("extra,named", [("MaxPool", "pooling layers are not in dqnc's conv family"),
                                         ("Softmax", "'Softmax'")])
def test_onnx_maxpool_and_unknown_ops_are_refused_by_name(tmp_path: Path, extra: str, named: str):
    rng = np.random.default_rng(14)
    convs, linears = _layers(rng, PIXEL_NET[0]), _layers(rng, [(32, 16 * 6 * 6), (3, 32)])
    src = tmp_path / "pool.onnx"
    src.write_bytes(conv_onnx(convs, linears, PIXEL_NET[2], (4, 20, 20), extra=extra))
    msg = _fails(["import", str(src), "--env", PIXELS, "-o", str(tmp_path / "o")])
    assert named in msg and "supported: Gemm, MatMul" in msg and "Conv" in msg


def test_onnx_conv_graph_for_another_image_size_is_refused(tmp_path: Path):
    rng = np.random.default_rng(15)
    convs, linears = _layers(rng, [(8, 4, 4, 4)]), _layers(rng, [(3, 8 * 4 * 4)])
    src = tmp_path / "small.onnx"
    src.write_bytes(conv_onnx(convs, linears, [2], (4, 10, 10)))
    msg = _fails(["import", str(src), "--env", PIXELS, "-o", str(tmp_path / "o")])
    assert "10x10" in msg and "20x20" in msg


_FUZZ_BASE: dict[str, bytes] = {}


def _survives(data: bytes, tmp: Path) -> None:
    p = tmp / "fuzz.onnx"
    p.write_bytes(data)
    spec = env_spec(PIXELS)
    try:
        load_source(p, ImportConfig(env=PIXELS), spec).forward(_states(PIXELS, 2000)[:3])
    except DqncError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_byte_flips_of_a_conv_onnx_never_crash_the_reader(tmp_path: Path, data: st.DataObject):
    if "onnx" not in _FUZZ_BASE:
        rng = np.random.default_rng(16)
        _FUZZ_BASE["onnx"] = conv_onnx(_layers(rng, [(4, 4, 4, 4)]), _layers(rng, [(3, 4 * 9 * 9)]), [2], (4, 20, 20),
                                       uint8=True)
    blob = bytearray(_FUZZ_BASE["onnx"])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] ^= data.draw(st.integers(1, 255))
    _survives(bytes(blob), tmp_path)


# --- Keras ----------------------------------------------------------------------------------------

def _tf_keras_conv(k, *, conv_kwargs: dict | None = None, pool: bool = False):
    """tf_keras: Rescaling(1/255) + Conv2D(relu) + Conv2D + ReLU + Flatten + Dense, for (20, 20, 4) HWC pixels."""
    conv = {"strides": 2, "activation": "relu"} | (conv_kwargs or {})
    layers = [k.Input((20, 20, 4)), k.layers.Rescaling(1 / 255), k.layers.Conv2D(8, 4, **conv)]
    if pool:
        layers.append(k.layers.MaxPooling2D(2))
    layers += [k.layers.Conv2D(16, 3), k.layers.ReLU(), k.layers.Flatten(), k.layers.Dense(32, activation="relu"),
               k.layers.Dense(3)]
    model = k.Sequential(layers)
    rng = np.random.default_rng(21)
    model.set_weights([(rng.normal(size=w.shape) * (0.5 if w.ndim > 1 else 0.1)).astype(np.float32)
                       for w in model.get_weights()])
    return model


def test_tf_keras_conv_h5_and_savedmodel_import_and_match_keras(tmp_path: Path):
    """tf_keras computes on HWC images; Pixels-v0 gives CHW ones: the import reads them as they come."""
    from dqnc.keras import keras

    model = _tf_keras_conv(keras())
    states = _states(PIXELS)
    want = model.predict(states.transpose(0, 2, 3, 1).astype(np.float32), verbose=0, batch_size=500)
    model.save(str(tmp_path / "m.h5"))
    model.save(str(tmp_path / "sm"), save_format="tf")
    for name in ("m.h5", "sm"):
        res = _import(tmp_path / name, tmp_path / f"imp-{name}", PIXELS)
        assert res["network"]["conv"] == [[8, 4, 2], [16, 3, 1]] and res["network"]["hidden"] == [32], name
        assert [p["kind"] for p in res["origin"]["preprocessing"]] == ["Rescaling", "layout"], name
        _exact(_artifact_q(res["path"], states), want)


@pytest.mark.parametrize("kwargs,pool,named", [
    ({"padding": "same"}, False, "padding 'same'"),
    ({"dilation_rate": 2, "strides": 1}, False, "dilation_rate [2, 2]"),
    ({}, True, "MaxPooling2D, which is not supported (pooling layers are not in dqnc's conv family)"),
])
def test_keras_conv_options_and_pooling_are_refused_by_name(tmp_path: Path, kwargs: dict, pool: bool, named: str):
    from dqnc.keras import keras

    _tf_keras_conv(keras(), conv_kwargs=kwargs, pool=pool).save(str(tmp_path / "bad.h5"))
    msg = _fails(["import", str(tmp_path / "bad.h5"), "--env", PIXELS, "-o", str(tmp_path / "o")])
    assert named in msg and "Conv2D (padding 'valid', a square kernel" in msg


KERAS3_CONV = textwrap.dedent("""
    import sys, numpy as np, keras
    out, n_actions = sys.argv[1], int(sys.argv[2])
    x = np.load(out + "/minatar.npy")
    model = keras.Sequential([
        keras.Input((10, 10, 4)), keras.layers.Rescaling(2.0, offset=-1.0),
        keras.layers.Conv2D(16, 3, activation="relu", name="features"),
        keras.layers.Conv2D(8, 3, strides=2, name="more_features"), keras.layers.Activation("relu"),
        keras.layers.Flatten(), keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(n_actions, name="q")])
    rng = np.random.default_rng(22)
    model.set_weights([rng.normal(size=w.shape).astype("float32") * (0.4 if w.ndim > 1 else 0.1)
                       for w in model.get_weights()])
    model.save(out + "/conv.keras")
    model.save(out + "/conv.h5")
    np.save(out + "/conv.npy", model.predict(x, verbose=0, batch_size=500))
    pixels = np.load(out + "/pixels.npy")
    for flatten in ("channels_last", "channels_first"):  # CHW and HWC flatten order of CHW feature maps
        cf = keras.Sequential([
            keras.Input((4, 20, 20)), keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(8, 4, strides=2, data_format="channels_first", activation="relu"),
            keras.layers.Conv2D(16, 3, data_format="channels_first", activation="relu"),
            keras.layers.Flatten(data_format=flatten), keras.layers.Dense(3)])
        cf.set_weights([rng.normal(size=w.shape).astype("float32") * (0.4 if w.ndim > 1 else 0.1)
                        for w in cf.get_weights()])
        cf.save(out + f"/cf_{flatten}.keras")
        np.save(out + f"/cf_{flatten}.npy", cf.predict(pixels, verbose=0, batch_size=500))
""")


def _keras3() -> bool:
    import importlib.metadata

    try:
        return int(importlib.metadata.version("keras").split(".")[0]) >= 3
    except importlib.metadata.PackageNotFoundError:
        return False


def _strip_layer_names(src: Path, dst: Path) -> None:
    """The .keras file as Keras versions that record no layer name in model.weights.h5 write it:
    the weights only under class-derived keys (conv2d, conv2d_1, dense, dense_1)."""
    import h5py

    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    buf = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buf, "r+") as h5:
        h5.visititems(lambda name, obj: obj.attrs.__delitem__("name") if "name" in obj.attrs else None)
        assert sorted(h5["layers"]) == ["activation", "conv2d", "conv2d_1", "dense", "dense_1", "flatten", "rescaling"]
    members["model.weights.h5"] = buf.getvalue()
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.mark.skipif(not _keras3(), reason="Keras 3 is not installed: its files are then read by dqnc alone")
def test_keras3_conv_files_import_and_match_keras3(tmp_path: Path):
    """Keras 3 .keras (weights under class-derived names) and .h5 on MinAtar's (10, 10, 4) HWC images;
    channels_first conv nets on Pixels-v0's (4, 20, 20) CHW images, flattened either way."""
    states, pixels = _states(MINATAR), _states(PIXELS)
    np.save(tmp_path / "minatar.npy", states.astype(np.float32))
    np.save(tmp_path / "pixels.npy", pixels.astype(np.float32))
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", KERAS3_CONV, str(tmp_path), str(env_spec(MINATAR).n_actions)], check=True,
                   env=env, capture_output=True)
    want = np.load(tmp_path / "conv.npy")
    res = _import(tmp_path / "conv.keras", tmp_path / "imp", MINATAR)
    assert res["network"]["conv"] == [[16, 3, 1], [8, 3, 2]] and res["network"]["layout"] == "HWC"
    _exact(_artifact_q(res["path"], states), want)
    _strip_layer_names(tmp_path / "conv.keras", tmp_path / "unnamed.keras")
    spec = env_spec(MINATAR)
    for name in ("unnamed.keras", "conv.h5"):  # the same reading, checked at the source: the fold is the one above
        src = load_source(tmp_path / name, ImportConfig(env=MINATAR), spec)
        assert src.is_conv and src.obs_shape == (10, 10, 4) and src.layout == "HWC", name
        _exact(src.forward(states), want)
    res = _import(tmp_path / "cf_channels_last.keras", tmp_path / "imp-cf", PIXELS)
    assert res["network"]["conv"] == [[8, 4, 2], [16, 3, 1]] and res["origin"]["conv_input"].startswith("CHW")
    _exact(_artifact_q(res["path"], pixels), np.load(tmp_path / "cf_channels_last.npy"))
    src = load_source(tmp_path / "cf_channels_first.keras", ImportConfig(env=PIXELS), env_spec(PIXELS))
    assert [type(op).__name__ for op in src.ops].count("Flatten") == 1 and src.ops[-2].order == "HWC"
    _exact(src.forward(pixels), np.load(tmp_path / "cf_channels_first.npy"))


def test_a_batch1_flatten_graph_is_evaluated_in_batches_with_the_same_values():
    """torch.onnx's default export pins batch 1; with a Flatten (not a Reshape to [1, n]) the graph's
    reference runs whole batches, giving what ONNX gives state by state."""
    rng = np.random.default_rng(17)
    data = conv_onnx(_layers(rng, PIXEL_NET[0]), _layers(rng, PIXEL_NET[1]), PIXEL_NET[2], (4, 20, 20), uint8=True,
                     batch=1)
    path = Path(os.environ["DQNC_CACHE"]).parent / "b1.onnx"
    path.write_bytes(data)
    src = load_source(path, ImportConfig(env=PIXELS), env_spec(PIXELS))
    states = _states(PIXELS)[:400]
    got, want = src.forward(states), _reference_q(data, states)
    assert got.shape == want.shape and np.array_equal(got.argmax(1), want.argmax(1))
    assert float(np.max(np.abs(got - want))) <= 1e-6 * float(want.max() - want.min())
