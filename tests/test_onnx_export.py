"""ONNX out: int8 and fp32 policies written as ONNX (QDQ for int8) reproduce LiteRT's actions in
ONNX Runtime and in onnx's reference evaluator; export --onnx checks and ships model.onnx, and
eval --runtime onnxruntime runs a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dqnc.cli import app

runner = CliRunner()
N_STATES = 2000


def _mlp(keras, rng):
    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(2)])
    model.set_weights([rng.normal(scale=0.7, size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def _conv(keras, rng):
    # SAME padding with stride 2 (TFLite pads the odd pixel at the end), then VALID, then flatten in HWC order.
    model = keras.Sequential([keras.layers.Input((9, 9, 3)),
                              keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu"),
                              keras.layers.Conv2D(5, 2, strides=1, padding="valid", activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(12, activation="relu"), keras.layers.Dense(3)])
    model.set_weights([rng.normal(scale=0.5, size=w.shape).astype(np.float32) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (.tflite bytes, float states): int8 MLP, int8 conv net (per-channel), fp32 MLP."""
    from dqnc.keras import keras
    from dqnc.quantize import convert

    rng = np.random.default_rng(0)
    mlp, conv = _mlp(keras(), rng), _conv(keras(), rng)
    vec = rng.normal(size=(N_STATES, 4)).astype(np.float32)
    img = rng.random((N_STATES, 9, 9, 3)).astype(np.float32)
    return {"mlp-int8": (convert(mlp, "int8", vec[:300]), vec), "conv-int8": (convert(conv, "int8", img[:300]), img),
            "mlp-fp32": (convert(mlp, "fp32"), vec)}


def _lite_outputs(content: bytes, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from dqnc.runtime import Policy

    lite = Policy(model_content=content)
    xq = lite.quantize_input(states).reshape((len(states), *lite.input_shape[1:]))
    raw = np.stack([np.array(lite.invoke_quantized(x[None]), copy=True).reshape(-1) for x in xq])
    return xq, raw


def _flips_within_one_step(raw_lite: np.ndarray, raw_onnx: np.ndarray) -> int:
    """Actions that differ from LiteRT's, each required to be a tie within one int8 step in both."""
    a_l, a_o = raw_lite.argmax(1), raw_onnx.argmax(1)
    rows = np.flatnonzero(a_l != a_o)
    lite, onnx_ = raw_lite.astype(np.int64)[rows], raw_onnx.astype(np.int64)[rows]
    at = np.arange(len(rows))
    assert (lite[at, a_l[rows]] - lite[at, a_o[rows]] <= 1).all(), "a flip LiteRT ranks more than one step apart"
    assert (onnx_[at, a_o[rows]] - onnx_[at, a_l[rows]] <= 1).all(), "a flip ONNX ranks more than one step apart"
    return len(rows)


@pytest.mark.parametrize("name", ["mlp-int8", "conv-int8"])
def test_int8_policy_as_qdq_onnx_acts_as_litert_in_onnxruntime_and_the_reference_evaluator(models, name):
    import onnx
    from onnx.reference import ReferenceEvaluator

    from dqnc.onnx_export import to_onnx

    ort = pytest.importorskip("onnxruntime")
    content, states = models[name]
    model = onnx.load_from_string(to_onnx(content))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and ("Conv" in ops) == name.startswith("conv")
    # The .tflite's per-channel kernel scales are in the graph as they are (axis 0 after OHWI -> OIHW).
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and len(onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == n.input[1]))
                           .shape) == 1]
    assert per_channel
    xq, raw_lite = _lite_outputs(content, states)
    assert len(xq) >= 1000
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    raw_ort = session.run(None, {"observation": xq})[0]
    raw_ref = ReferenceEvaluator(model).run(None, {"observation": xq})[0]
    for raw in (raw_ort, raw_ref):
        assert raw.dtype == np.int8 and raw.shape == raw_lite.shape
        assert np.abs(raw.astype(int) - raw_lite.astype(int)).max() <= 1  # float requantization vs TFLite's fixed point
        flips = _flips_within_one_step(raw_lite, raw)
        assert flips <= 0.005 * len(xq), f"{flips} near-tie flips of {len(xq)}"
        assert (raw == raw_lite).all(axis=1).mean() > 0.98


def test_fp32_policy_as_onnx_matches_litert_in_float(models):
    import onnx
    from onnx.reference import ReferenceEvaluator

    from dqnc.onnx_export import form, to_onnx

    content, states = models["mlp-fp32"]
    assert form(content) == "fp32"
    model = onnx.load_from_string(to_onnx(content))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in model.graph.node}
    _, raw_lite = _lite_outputs(content, states)
    raw_ref = ReferenceEvaluator(model).run(None, {"observation": states})[0]
    np.testing.assert_allclose(raw_ref, raw_lite, rtol=1e-5, atol=1e-5)
    assert (raw_ref.argmax(1) == raw_lite.argmax(1)).all()


def test_a_model_without_an_onnx_form_is_refused_in_one_line(models):
    from dqnc.errors import UsageError
    from dqnc.onnx_export import refusal, to_onnx
    from dqnc.tflite_model import Model, schema

    m = Model(models["mlp-int8"][0])
    fc = m.raw.operatorCodes[m.subgraph.operators[0].opcodeIndex]
    fc.builtinCode = fc.deprecatedBuiltinCode = schema().BuiltinOperator.ADD
    content = m.to_bytes()
    assert "op ADD has no ONNX form" in refusal(content)
    with pytest.raises(UsageError, match="cannot write this model as ONNX: op ADD"):
        to_onnx(content)


@pytest.fixture(scope="module")
def onnx_bundle(models, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    work = tmp_path_factory.mktemp("onnx")
    (work / "policy.tflite").write_bytes(models["mlp-int8"][0])
    r = runner.invoke(app, ["export", str(work / "policy.tflite"), "--env", "CartPole-v1", "-o", str(work / "bundle"),
                            "--onnx", "--target", "linux", "--check-states", "1000", "--json"])
    assert r.exit_code == 0, r.output
    return work / "bundle"


def test_export_onnx_ships_a_checked_model_onnx_and_eval_runs_it_in_onnxruntime(onnx_bundle, monkeypatch):
    from dqnc import onnx_export

    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    entry = manifest["metrics"]["onnx"]
    assert entry["form"] == "qdq-int8" and entry["bytes"] == (onnx_bundle / "model.onnx").stat().st_size
    assert "model.onnx" in manifest["files"] and "model.onnx" in (onnx_bundle / "SHA256SUMS").read_text()
    check = entry["check"]
    assert check["states"] == 1000 and check["action_mismatch_share"] <= 0.01
    assert check["actions_equal"] + check.get("int8_near_ties", 0) == 1000
    assert check["agreement_vs_litert"] >= 0.99 and check["regret_vs_litert"] <= check["max_regret_vs_litert"] == 0.01
    # The bundle's own model.onnx in ONNX Runtime (nothing converted), its model.tflite in LiteRT as the reference.
    monkeypatch.setattr(onnx_export, "to_onnx", lambda content: pytest.fail("converted instead of running model.onnx"))
    r = runner.invoke(app, ["eval", str(onnx_bundle), "--runtime", "onnxruntime", "--reference", str(onnx_bundle),
                            "-n", "5", "--latency-samples", "50", "--json"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["runtime"] == "onnxruntime" and result["latency_p50_us"] > 0
    assert result["states"] >= 20 and result["agreement"] >= 0.99
    assert result["regret"] <= 0.01


def test_export_refuses_an_onnx_model_that_acts_unlike_litert(models, tmp_path, monkeypatch):
    # The check can fail: an ONNX model of a policy with its output layer negated picks other actions.
    from dqnc import onnx_export
    from dqnc.tflite_model import Model

    pytest.importorskip("onnxruntime")
    content = models["mlp-int8"][0]
    m = Model(content)
    last = m.ops()[-1].inputs[1]
    data = m.raw.buffers[m.subgraph.tensors[last].buffer].data
    data[:] = (-np.asarray(data, np.uint8).view(np.int8).clip(-127, 127)).view(np.uint8)
    flipped = onnx_export.to_onnx(m.to_bytes())
    monkeypatch.setattr(onnx_export, "to_onnx", lambda c: flipped)
    (tmp_path / "policy.tflite").write_bytes(content)
    r = runner.invoke(app, ["export", str(tmp_path / "policy.tflite"), "--env", "CartPole-v1", "-o",
                            str(tmp_path / "bundle"), "--onnx", "--target", "linux", "--check-states", "500"])
    assert r.exit_code == 1 and "model.onnx would act unlike model.tflite" in r.output
    assert not (tmp_path / "bundle").exists()
