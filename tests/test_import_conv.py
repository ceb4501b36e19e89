"""Conv Q-networks from PyTorch files (CleanRL dqn_atari, SB3 CnnPolicy and QR-DQN zips): read from
the tensors alone, strides solved, /255 and layout folded, checked against an independent torch-
semantics forward written here (NCHW, OIHW kernels, CHW flatten), then through int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tests.pixels_env  # noqa: F401  (registers Pixels-v0)
from dqnc.cli import app
from tests.test_import_conv_formats import _fails, _import  # one CLI helper pair for the conv imports
from tests.torchzip_writer import malicious_call, sb3_zip, torch_zip

runner = CliRunner()
PIXELS = "tests.pixels_env:Pixels-v0"
MINATAR = "MinAtar/Breakout-v1"


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DQNC_CACHE", str(tmp_path / "cache"))


def torch_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """torch.nn.functional.conv2d (NCHW input, OIHW kernel, no padding), by explicit windows."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.empty((n, o, oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            win = x[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, :, i, j] = np.einsum("nckl,ockl->no", win, w)
    return out + b[None, :, None, None]


def torch_forward(x_nchw: np.ndarray, convs, linears, strides, scale=1.0, act_after_last_linear=False) -> np.ndarray:
    x = x_nchw.astype(np.float64) * scale
    for (w, b), s in zip(convs, strides):
        x = np.maximum(torch_conv(x, w, b, s), 0)
    x = x.reshape(len(x), -1)  # torch flattens CHW
    for i, (w, b) in enumerate(linears):
        x = x @ w.T + b
        if i < len(linears) - 1 or act_after_last_linear:
            x = np.maximum(x, 0)
    return x


def _layers(rng, shapes):
    out = []
    for shape in shapes:
        fan_in = int(np.prod(shape[1:]))
        out.append(((rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32),
                    (rng.normal(size=shape[0]) * 0.1).astype(np.float32)))
    return out




def _artifact_q(path: str, states: np.ndarray) -> np.ndarray:
    from dqnc import artifact as art
    from dqnc.policy import q_function

    return q_function(art.load(path))(states)


def _states(env_id: str, n: int, seed: int) -> np.ndarray:
    from dqnc.envs import collect_states, env_spec, trust

    trust(env_id)  # named by this test, as --env names it on the command line
    spec = env_spec(env_id)
    return collect_states(lambda o: np.random.default_rng(0).normal(size=(len(o), spec.n_actions)), spec, n, seed)


def test_cleanrl_atari_style_net_imports_with_its_255_and_matches_torch(tmp_path: Path):
    rng = np.random.default_rng(1)
    # network.{0,2,4}: convs 8x8/4? too big for 20x20; same structure, smaller: 4x4/2, 3x3/1, then 7 and 9 Linear.
    convs = _layers(rng, [(8, 4, 4, 4), (16, 8, 3, 3)])
    linears = _layers(rng, [(32, 16 * 7 * 7), (3, 32)])
    tensors = {"network.0.weight": convs[0][0], "network.0.bias": convs[0][1],
               "network.2.weight": convs[1][0], "network.2.bias": convs[1][1],
               "network.5.weight": linears[0][0], "network.5.bias": linears[0][1],
               "network.7.weight": linears[1][0], "network.7.bias": linears[1][1]}
    src = tmp_path / "dqn_atari.cleanrl_model"
    src.write_bytes(torch_zip(tensors))
    res = _import(src, tmp_path / "imp", PIXELS)
    assert res["network"]["conv"] == [[8, 4, 2], [16, 3, 1]] and res["network"]["layout"] == "CHW"
    assert any(p["kind"] == "input_scale" for p in res["origin"]["preprocessing"])
    c = res["metrics"]["check"]
    assert c["rel_error"] <= 1e-5 and c["action_mismatches"] == 0
    states = _states(PIXELS, 2000, 77)
    want = torch_forward(states, convs, linears, [2, 1], scale=1 / 255)
    got = _artifact_q(res["path"], states)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999
    # --input-scale 1 says the net read raw 0-255 pixels: other Q-values, still exact.
    res1 = _import(src, tmp_path / "imp1", PIXELS, "--input-scale", "1")
    want1 = torch_forward(states[:200], convs, linears, [2, 1])
    got1 = _artifact_q(res1["path"], states[:200])
    assert np.max(np.abs(got1 - want1)) <= 1e-5 * (want1.max() - want1.min())


def _sb3_cnn(rng, quantiles: int = 0, n_actions: int = 3):
    convs = _layers(rng, [(8, 4, 4, 4), (16, 8, 3, 3)])
    feat = _layers(rng, [(24, 16 * 7 * 7)])
    head = _layers(rng, [(n_actions * max(1, quantiles), 24)])
    net = "quantile_net" if quantiles else "q_net"
    t = {}
    for prefix in (net, net + "_target"):
        t |= {f"{prefix}.features_extractor.cnn.0.weight": convs[0][0], f"{prefix}.features_extractor.cnn.0.bias": convs[0][1],
              f"{prefix}.features_extractor.cnn.2.weight": convs[1][0], f"{prefix}.features_extractor.cnn.2.bias": convs[1][1],
              f"{prefix}.features_extractor.linear.0.weight": feat[0][0], f"{prefix}.features_extractor.linear.0.bias": feat[0][1],
              f"{prefix}.{net}.0.weight": head[0][0], f"{prefix}.{net}.0.bias": head[0][1]}
    return t, convs, feat + head


def _sb3_space(shape=(4, 20, 20), reprs: bool = False) -> dict:
    """The readable keys SB3 2.x writes for a uint8 Box: numpy's printed bounds, low_repr/high_repr
    None (gymnasium fills them lazily); ``reprs``: as a space whose reprs were filled."""
    rows = "[[[0 0 0 ... 0 0 0]\n  [0 0 0 ... 0 0 0]\n  ...\n  [0 0 0 ... 0 0 0]]]"
    return {":type:": "<class 'gymnasium.spaces.box.Box'>", ":serialized:": "x", "dtype": "uint8",
            "_shape": list(shape), "low": rows, "high": rows.replace("0", "255"),
            "low_repr": "0" if reprs else None, "high_repr": "255" if reprs else None}


@pytest.mark.parametrize("quantiles", [0, 5])
def test_sb3_cnn_policy_and_qrdqn_zip_import_with_normalize_images(tmp_path: Path, quantiles: int):
    rng = np.random.default_rng(2 + quantiles)
    tensors, convs, linears = _sb3_cnn(rng, quantiles)
    src = tmp_path / "dqn.zip"
    src.write_bytes(sb3_zip(tensors, [], None, observation_space=_sb3_space(reprs=bool(quantiles)), action_space={"n": 3}))
    res = _import(src, tmp_path / "imp", PIXELS)
    assert res["network"]["conv"] == [[8, 4, 2], [16, 3, 1]] and res["network"]["hidden"] == [24]
    assert res["origin"]["format"] == ("sb3-qrdqn" if quantiles else "sb3")
    states = _states(PIXELS, 1000, 78)
    out = torch_forward(states, convs, linears, [2, 1], scale=1 / 255)
    want = out.reshape(len(out), quantiles, 3).mean(axis=1) if quantiles else out
    got = _artifact_q(res["path"], states)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())


def test_hwc_env_reads_a_channels_first_torch_net(tmp_path: Path):
    """MinAtar gives (10, 10, 4) HWC; a torch net saw (4, 10, 10): the transpose is the env's, not the net's."""
    rng = np.random.default_rng(3)
    convs = _layers(rng, [(16, 4, 3, 3)])
    linears = _layers(rng, [(32, 16 * 8 * 8), (3, 32)])
    tensors = {"network.0.weight": convs[0][0], "network.0.bias": convs[0][1],
               "network.3.weight": linears[0][0], "network.3.bias": linears[0][1],
               "network.5.weight": linears[1][0], "network.5.bias": linears[1][1]}
    src = tmp_path / "minatar.cleanrl_model"
    src.write_bytes(torch_zip(tensors))
    res = _import(src, tmp_path / "imp", MINATAR)
    assert res["network"]["layout"] == "HWC" and res["network"]["conv"] == [[16, 3, 1]]
    states = _states(MINATAR, 1000, 79)
    want = torch_forward(states.transpose(0, 3, 1, 2), convs, linears, [1])
    got = _artifact_q(res["path"], states)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())


def test_refusals_ambiguous_strides_pooling_and_a_malicious_cnn_zip(tmp_path: Path):
    rng = np.random.default_rng(4)
    # 2x2 then 2x2 kernels on 20x20: strides (1, 2) and (2, 1) both give 9x9... -> ambiguous.
    convs = _layers(rng, [(4, 4, 2, 2), (4, 4, 2, 2)])
    lin = _layers(rng, [(3, 4 * 9 * 9)])
    t = {"network.0.weight": convs[0][0], "network.0.bias": convs[0][1], "network.2.weight": convs[1][0],
         "network.2.bias": convs[1][1], "network.5.weight": lin[0][0], "network.5.bias": lin[0][1]}
    amb = tmp_path / "amb.cleanrl_model"
    amb.write_bytes(torch_zip(t))
    msg = _fails(["import", str(amb), "--env", PIXELS, "-o", str(tmp_path / "o1")])
    assert "ambiguous" in msg and "ONNX" in msg
    # A pooling layer between convs shows as a gap of 2 parameter-free modules.
    t2 = dict(t)
    t2["network.3.weight"] = t2.pop("network.2.weight")
    t2["network.3.bias"] = t2.pop("network.2.bias")
    pool = tmp_path / "pool.cleanrl_model"
    pool.write_bytes(torch_zip(t2))
    assert "pooling" in _fails(["import", str(pool), "--env", PIXELS, "-o", str(tmp_path / "o2")])
    # A CnnPolicy zip whose policy.pth plants os.system: refused, never run.
    tensors, _, _ = _sb3_cnn(rng)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.zip"
    evil.write_bytes(sb3_zip(tensors, [], None, observation_space=_sb3_space(),
                             inject=malicious_call(arg=f"touch {marker}")))
    msg = _fails(["import", str(evil), "--env", PIXELS, "-o", str(tmp_path / "o3")])
    assert "os.system" in msg and not marker.exists()
    # A conv net on a vector env: one line naming the mismatch.
    assert "image" in _fails(["import", str(amb), "--env", "CartPole-v1", "-o", str(tmp_path / "o4")])


def test_imported_conv_net_quantizes_to_int8_and_keeps_its_actions(tmp_path: Path):
    rng = np.random.default_rng(5)
    tensors, convs, linears = _sb3_cnn(rng)
    src = tmp_path / "dqn.zip"
    src.write_bytes(sb3_zip(tensors, [], None, observation_space=_sb3_space()))
    res = _import(src, tmp_path / "imp", PIXELS)
    r = runner.invoke(app, ["quantize", res["path"], "--mode", "int8", "-o", str(tmp_path / "int8"), "--json"])
    assert r.exit_code == 0, r.output
    q = json.loads(r.stdout)
    states = _states(PIXELS, 1000, 80)
    parent = _artifact_q(res["path"], states)
    from dqnc.runtime import Policy

    got = Policy(str(Path(q["path"]) / "model.tflite")).q_values(states)
    top2 = np.sort(parent, axis=1)[:, -2:]
    decisive = (top2[:, 1] - top2[:, 0]) > 0.05 * (parent.max() - parent.min())
    assert (got.argmax(1) == parent.argmax(1))[decisive].mean() >= 0.97


def _nature(rng):
    convs = _layers(rng, [(32, 4, 8, 8), (64, 32, 4, 4), (64, 64, 3, 3)])
    return convs, _layers(rng, [(64, 3136), (3, 64)])


def test_nature_dqn_zips_and_cleanrl_files_import_on_84x84_frames(tmp_path: Path):
    """On 84x84 frames the Nature net's 3136 features fit strides 4-2-1, 2-4-1 and 3-1-3: SB3's
    NatureCNN and CleanRL's dqn_atari are known by their format; a custom extractor is refused."""
    rng = np.random.default_rng(6)
    convs, linears = _nature(rng)
    env = "tests.pixels_env:Pixels84-v0"
    cleanrl = {f"network.{i}.{p}": a for i, (w, b) in zip((0, 2, 4, 7, 9), convs + linears)
               for p, a in (("weight", w), ("bias", b))}
    src = tmp_path / "dqn_atari.cleanrl_model"
    src.write_bytes(torch_zip(cleanrl))
    states = _states(env, 200, 81)
    want = torch_forward(states, convs, linears, [4, 2, 1], scale=1 / 255)
    res = _import(src, tmp_path / "clean", env)
    assert res["network"]["conv"] == [[32, 8, 4], [64, 4, 2], [64, 3, 1]]
    got = _artifact_q(res["path"], states)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())
    sb3 = {}
    names = ["features_extractor.cnn.0", "features_extractor.cnn.2", "features_extractor.cnn.4",
             "features_extractor.linear.0", "q_net.0"]
    for name, (w, b) in zip(names, convs + linears):
        sb3 |= {f"q_net.{name}.weight": w, f"q_net.{name}.bias": b}
    zipped = tmp_path / "dqn.zip"
    zipped.write_bytes(sb3_zip(sb3, [], None, observation_space=_sb3_space((4, 84, 84))))
    res = _import(zipped, tmp_path / "sb3", env)
    # SB3: NatureCNN's linear has its ReLU, then q_net.0 reads 64 features (no ReLU after the head).
    got = _artifact_q(res["path"], states)
    assert np.max(np.abs(got - want)) <= 1e-5 * (want.max() - want.min())
    assert {m.get("stride_from") for m in res["origin"]["mapping"][:3]} == {"the Nature DQN network the format defines"}
    custom = tmp_path / "custom.zip"
    data = sb3_zip(sb3, [], None, observation_space=_sb3_space((4, 84, 84)))
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(buf, "w") as zout:
        for item in zin.namelist():
            body = zin.read(item)
            if item == "data":
                doc = json.loads(body)
                doc["policy_kwargs"] = {"features_extractor_class": "<class '__main__.MyCNN'>", "net_arch": []}
                body = json.dumps(doc).encode()
            zout.writestr(item, body)
    custom.write_bytes(buf.getvalue())
    msg = _fails(["import", str(custom), "--env", env, "-o", str(tmp_path / "o5")])
    assert "ambiguous" in msg and "4x2x1" in msg
