"""Hostile and damaged foreign files: refused with exit 2 and one line naming the limit, in bounded
memory; never exit 3, never a crash.

Every file here is built by the test (no torch, no TensorFlow). Each test notes what the same file
did before dqnc.limits was wired into the readers (measured with ``dqnc import`` / ``dqnc eval``).
Cases that allocated or crashed run in a child process, whose peak RSS is read with ``os.wait4``.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.torchzip_writer import _global, _int, _str, _tuple, sb3_zip, torch_zip

ENV = "CartPole-v1"
PEAK_MB = 1500  # every refused file stays far below this (they take ~60-80 MB)
ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: float = 60, preexec=None) -> tuple[int, list[str], float]:
    """Run a child; (exit code or -signal, stderr lines, peak RSS in MB). Killed after ``timeout``."""
    env = {**os.environ, "COLUMNS": "250", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=preexec)
    out: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()))
               for k, f in (("o", p.stdout), ("e", p.stderr))]
    for t in readers:
        t.start()
    start = time.time()
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.time() - start > timeout:
            os.kill(p.pid, signal.SIGKILL)
            _, status, usage = os.wait4(p.pid, 0)
            break
        time.sleep(0.02)
    p.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it: keep Popen from waiting again
    for t in readers:
        t.join()
    return p.returncode, out["e"].decode(errors="replace").strip().splitlines(), usage.ru_maxrss / 1024


def _dqnc(*args: str, cwd: Path, timeout: float = 60) -> tuple[int, list[str], float]:
    return _run([sys.executable, "-m", "dqnc", *args], cwd, timeout)


def _refused(rc: int, err: list[str], peak: float, *needles: str) -> str:
    """Exit 2, one stderr line without a traceback that names the limit, bounded memory."""
    assert rc == 2, (rc, err[-5:])
    assert len(err) == 1 and "Traceback" not in err[0], err[-5:]
    for needle in needles:
        assert needle in err[0], err[0]
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"
    return err[0]


# --- ONNX ---------------------------------------------------------------------------------------

def _onnx(nodes, inits, obs_dims=("batch", 4), out_dims=("batch", 2)) -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("observation", TensorProto.FLOAT, list(obs_dims))],
                          [helper.make_tensor_value_info("q_values", TensorProto.FLOAT, list(out_dims))], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_onnx_broadcast_of_two_constants_is_refused_before_it_is_computed(tmp_path: Path):
    """Before: a 185 KB file adding a [N, 1] to a [1, N] constant (N = 23170) was still folding it
    at 90 s with 2.6 GB resident (killed; 2 GB per forward pass)."""
    from onnx import helper, numpy_helper

    n = 23170
    inits = [numpy_helper.from_array(np.ones(shape, np.float32), name)
             for shape, name in (((n, 1), "col"), ((1, n), "row"), ((4, 2), "w"))]
    nodes = [helper.make_node("Add", ["col", "row"], ["big"]), helper.make_node("MatMul", ["observation", "w"], ["q_values"])]
    (tmp_path / "b.onnx").write_bytes(_onnx(nodes, inits))
    line = _refused(*_dqnc("import", "b.onnx", "--env", ENV, "-o", "out", cwd=tmp_path, timeout=40),
                    "MAX_ACTIVATION_ELEMENTS", "(23170, 23170)")
    assert "'big'" in line and not (tmp_path / "out").exists()


def _declared_cases():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    matmul = [helper.make_node("MatMul", ["observation", "w"], ["q_values"])]
    huge = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 1 << 32], raw_data=b"\0" * 16)
    short = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 2], raw_data=b"\0" * 4)
    const = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    return {
        # before: exit 2, "malformed ONNX graph (ValueError: cannot reshape array of size 4 ...)" (no limit named)
        "initializer": (_onnx(matmul, [huge]), ["MAX_TENSOR_ELEMENTS", "(4, 4294967296)"]),
        # before: exit 3, "MemoryError: Unable to allocate 8.00 TiB" (the check batch of the declared width)
        "input": (_onnx([helper.make_node("Identity", ["observation"], ["q_values"])], [], ("batch", 1 << 40)),
                  ["MAX_ACTIVATION_ELEMENTS", "input 'observation'"]),
        # before: exit 2, "malformed ONNX graph (ValueError: cannot reshape ...)"
        "constant": (_onnx([helper.make_node("Constant", [], ["c"], value=const), *matmul], [w]),
                     ["MAX_ACTIVATION_ELEMENTS", "Constant"]),
        # before: exit 2, "malformed ONNX graph (ValueError: cannot reshape array of size 1 into shape (4,2))"
        "raw_data": (_onnx(matmul, [short]), ["holds 4 bytes", "32 bytes"]),
    }


@pytest.mark.parametrize("case", ["initializer", "input", "constant", "raw_data"])
def test_onnx_declared_sizes_are_checked_before_numpy_allocates(tmp_path: Path, case: str):
    data, needles = _declared_cases()[case]
    (tmp_path / "m.onnx").write_bytes(data)
    _refused(*_dqnc("import", "m.onnx", "--env", ENV, "-o", "out", cwd=tmp_path, timeout=30), *needles)


_WIDE = """
import resource, sys, numpy as np
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the old code asked for 8 GB: MemoryError, not a swap storm
from pathlib import Path
from dqnc.config import ImportConfig
from dqnc.importers import load_source
src = load_source(Path(sys.argv[1]), ImportConfig(env="CartPole-v1"))
x = np.random.default_rng(0).normal(size=(2000, 4)).astype(np.float32)
q = src.forward(x)
w = int(sys.argv[2])
h = np.maximum(x.sum(axis=1, keepdims=True), 0)  # every hidden unit is sum(x) (weights of 1), then relu
want = np.repeat(h * w, 2, axis=1)
assert q.shape == (2000, 2) and np.allclose(q, want, rtol=1e-3), (q[:2], want[:2])
print("ok")
"""


def test_onnx_wide_layers_are_evaluated_in_chunks_of_bounded_size(tmp_path: Path):
    """A [4, W] weight built by broadcasting (W = 2^19, a 4 MB file) checked on 2000 states.

    Before: the reference forward made 2000 x W intermediates at once (4 GB each; under the child's
    3 GB address-space limit: MemoryError, exit 1). Now the batch runs in chunks of at most
    MAX_ACTIVATION_ELEMENTS values."""
    from onnx import helper, numpy_helper

    w = 1 << 19
    inits = [numpy_helper.from_array(np.full(shape, fill, np.float32), name)
             for shape, fill, name in (((4, 1), 1, "c4"), ((1, w), 0, "rw"), ((w, 1), 1, "cw"), ((1, 2), 0, "r2"))]
    nodes = [helper.make_node("Add", ["c4", "rw"], ["w1"]), helper.make_node("Add", ["cw", "r2"], ["w2"]),
             helper.make_node("MatMul", ["observation", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["q_values"])]
    (tmp_path / "wide.onnx").write_bytes(_onnx(nodes, inits))
    (tmp_path / "wide.py").write_text(_WIDE)
    rc, err, peak = _run([sys.executable, "wide.py", "wide.onnx", str(w)], tmp_path, timeout=60)
    assert rc == 0, err[-5:]
    assert peak < PEAK_MB, f"peak RSS {peak:.0f} MB"


# --- PyTorch zips, SB3 zips, VecNormalize pickles -------------------------------------------------

def _torch_view(size, stride, numel=4) -> bytes:
    """A state dict whose one tensor is a view ``size``/``stride`` of a ``numel``-element storage."""
    storage = _tuple([_str("storage"), _global("torch", "FloatStorage"), _str("0"), _str("cpu"), _int(numel)])
    args = _tuple([storage + pickle.BINPERSID, _int(0), _tuple([_int(d) for d in size]), _tuple([_int(s) for s in stride]),
                   pickle.NEWFALSE, _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE])
    pkl = b"".join([pickle.PROTO + b"\x02", _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE, pickle.MARK,
                    _str("network.0.weight"), _global("torch._utils", "_rebuild_tensor_v2"), args, pickle.REDUCE,
                    pickle.SETITEMS, pickle.STOP])
    return _archive(pkl, {"archive/data/0": np.ones(numel, "<f4").tobytes()})


def _archive(pkl: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_torch_stride0_view_is_refused_before_it_is_copied(tmp_path: Path):
    """Before: this 1.1 KB file (4 stored floats viewed as 32768 x 32768 with stride 0) took 4.1 GB
    and ended, 6.7 s later, in "the network takes 32768 inputs" (exit 2, the wrong reason)."""
    (tmp_path / "s.cleanrl_model").write_bytes(_torch_view((1 << 15, 1 << 15), (0, 0)))
    _refused(*_dqnc("import", "s.cleanrl_model", "--env", ENV, "-o", "out", cwd=tmp_path, timeout=30),
             "MAX_TENSOR_ELEMENTS", "s.cleanrl_model")


@pytest.mark.parametrize("size, stride, numel", [((4096, 4096), (0, 0), 4), ((2, 4), (1, 0), 4), ((2, 4), (1, 1), 5)])
def test_torch_views_that_repeat_their_storage_are_refused(tmp_path: Path, size, stride, numel):
    """Before: the (4096, 4096) view was copied into a 64 MB weight (exit 2 only at the env check);
    the two (2, 4) views (rows overlapping in 4 or 5 stored floats) imported, exit 0."""
    from typer.testing import CliRunner

    from dqnc.cli import app

    (tmp_path / "v.cleanrl_model").write_bytes(_torch_view(size, stride, numel))
    r = CliRunner().invoke(app, ["import", str(tmp_path / "v.cleanrl_model"), "--env", ENV, "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and f"repeats the {numel} elements of its storage" in r.output, r.output


def _nested_tuple_key(depth: int = 200_000) -> bytes:
    body = pickle.MARK * depth + pickle.EMPTY_TUPLE + pickle.TUPLE * depth
    return _archive(b"".join([pickle.PROTO + b"\x02", _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
                              pickle.MARK, body, _str("x"), pickle.SETITEMS, pickle.STOP]))


def _shared_tuple_key(levels: int = 60) -> bytes:
    """t = (); 60 times t = (t, t): 490 bytes standing for 2^60 tuples (hashing it never ends)."""
    body = pickle.EMPTY_TUPLE
    for i in range(levels):
        body += pickle.BINPUT + bytes([i]) + pickle.BINGET + bytes([i]) + pickle.TUPLE2
    return _archive(b"".join([pickle.PROTO + b"\x02", _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE,
                              pickle.MARK, body, _str("x"), pickle.SETITEMS, pickle.STOP]))


def _nested_json_sb3(depth: int = 100_000) -> bytes:
    good = sb3_zip({"q_net.q_net.0.weight": np.ones((2, 4), np.float32), "q_net.q_net.0.bias": np.ones(2, np.float32)}, [], None)
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["data"] = ("[" * depth + "]" * depth).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for n, v in members.items():
            zf.writestr(n, v)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["tuple-key", "shared-key", "sb3-json", "vecnormalize"])
def test_deeply_nested_pickles_and_json_are_refused(tmp_path: Path, case: str):
    """Before: tuple-key: SIGSEGV (hashing a 200,000-deep tuple overflowed the C stack);
    shared-key: still hashing after 20 s (killed); sb3-json: exit 3 (RecursionError in json);
    vecnormalize: exit 3 (RecursionError in the repr of a 200,000-deep list)."""
    args = ["import", "m.cleanrl_model", "--env", ENV, "-o", "out"]
    if case == "tuple-key":
        (tmp_path / "m.cleanrl_model").write_bytes(_nested_tuple_key())
        needles = ["MAX_NESTING"]
    elif case == "shared-key":
        (tmp_path / "m.cleanrl_model").write_bytes(_shared_tuple_key())
        needles = ["MAX_PICKLE_OBJECTS"]
    elif case == "sb3-json":
        (tmp_path / "m.zip").write_bytes(_nested_json_sb3())
        args[1], needles = "m.zip", ["'data'", "nested more than 100 levels", "dqnc.limits"]
    else:
        (tmp_path / "m.cleanrl_model").write_bytes(torch_zip({"network.0.weight": np.ones((2, 4), np.float32),
                                                              "network.0.bias": np.zeros(2, np.float32)}))
        depth = 200_000
        (tmp_path / "vn.pkl").write_bytes(pickle.PROTO + b"\x02" + pickle.MARK * depth + pickle.EMPTY_LIST
                                          + pickle.LIST * depth + pickle.STOP)
        args += ["--obs-norm", "vn.pkl"]
        needles = ["vn.pkl", "MAX_NESTING"]
    _refused(*_dqnc(*args, cwd=tmp_path, timeout=20), *needles)


# --- TFLite files, on TFLite Micro and LiteRT ------------------------------------------------------

def _fb():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    return fb


def _pack(model) -> bytes:
    import flatbuffers

    b = flatbuffers.Builder(0)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def tiny_int8(obs: int = 4, hidden: int = 8, actions: int = 2) -> bytes:
    """An int8 CartPole-shaped Q-network (two FULLY_CONNECTED layers), built with the schema's object API."""
    fb = _fb()
    rng = np.random.default_rng(0)
    m = fb.ModelT()
    m.version, m.description = 3, "dqnc attack-bounds test model"
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.FULLY_CONNECTED
    code.version = 4
    m.operatorCodes, m.buffers, tensors = [code], [fb.BufferT()], []

    def buf(arr: np.ndarray) -> int:
        b = fb.BufferT()
        b.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8)
        m.buffers.append(b)
        return len(m.buffers) - 1

    def tensor(name, shape, ttype, scale, zero=0, buffer=0) -> int:
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), ttype, buffer
        t.quantization = fb.QuantizationParametersT()
        t.quantization.scale, t.quantization.zeroPoint = [float(scale)], [int(zero)]
        tensors.append(t)
        return len(tensors) - 1

    i8, i32 = fb.TensorType.INT8, fb.TensorType.INT32
    x = tensor("obs", [1, obs], i8, 0.05)
    w1 = tensor("w1", [hidden, obs], i8, 0.02, buffer=buf(rng.integers(-127, 128, (hidden, obs)).astype(np.int8)))
    b1 = tensor("b1", [hidden], i32, 0.001, buffer=buf(rng.integers(-100, 100, hidden).astype(np.int32)))
    h = tensor("h", [1, hidden], i8, 0.05, -128)
    w2 = tensor("w2", [actions, hidden], i8, 0.02, buffer=buf(rng.integers(-127, 128, (actions, hidden)).astype(np.int8)))
    b2 = tensor("b2", [actions], i32, 0.001, buffer=buf(rng.integers(-100, 100, actions).astype(np.int32)))
    y = tensor("q", [1, actions], i8, 0.1)

    def fc(i, w, b, o, act):
        op = fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [i, w, b], [o]
        op.builtinOptionsType = fb.BuiltinOptions.FullyConnectedOptions
        op.builtinOptions = fb.FullyConnectedOptionsT()
        op.builtinOptions.fusedActivationFunction = act
        return op

    sg = fb.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.name = tensors, [x], [y], "main"
    sg.operators = [fc(x, w1, b1, h, fb.ActivationFunctionType.RELU), fc(h, w2, b2, y, fb.ActivationFunctionType.NONE)]
    m.subgraphs = [sg]
    return _pack(m)


def damaged(good: bytes) -> list[tuple[str, bytes]]:
    """40 deterministic damages: truncations, byte flips (fixed seeds), and edited fields."""
    fb = _fb()
    n = len(good)
    out = [(f"truncate-{cut}", good[:cut]) for cut in (0, 7, 8, 16, 40, n // 4, n // 2, 3 * n // 4, n - 16, n - 1)]
    for seed in range(18):
        rng = np.random.default_rng(seed)
        b = bytearray(good)
        for pos in rng.integers(8, n, 1 + seed % 6):
            b[pos] ^= int(rng.integers(1, 256))
        out.append((f"flip-seed{seed}", bytes(b)))
    base = fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(bytearray(good), 0))

    def edit(name, change):
        m = copy.deepcopy(base)
        change(m, m.subgraphs[0].tensors, m.subgraphs[0].operators)
        out.append((name, _pack(m)))

    edit("input-shape-huge", lambda m, t, o: setattr(t[0], "shape", [1, 2**31 - 1]))
    edit("activation-4TB", lambda m, t, o: setattr(t[3], "shape", [1 << 21, 1 << 21]))
    edit("weight-shape-huge", lambda m, t, o: setattr(t[1], "shape", [1 << 16, 1 << 16]))
    edit("shape-negative", lambda m, t, o: setattr(t[3], "shape", [1, -8]))
    edit("weight-shape-vs-buffer", lambda m, t, o: setattr(t[1], "shape", [8, 40]))
    edit("buffer-index-out-of-range", lambda m, t, o: setattr(t[1], "buffer", 1000))
    edit("opcode-index-out-of-range", lambda m, t, o: setattr(o[1], "opcodeIndex", 7))
    edit("op-input-out-of-range", lambda m, t, o: setattr(o[0], "inputs", [0, 9999, 2]))
    edit("graph-output-out-of-range", lambda m, t, o: setattr(m.subgraphs[0], "outputs", [-3]))
    root = fb.Model.GetRootAsModel(bytearray(good), 0)
    sg, buf1 = root.Subgraphs(0), root.Buffers(1)
    for name, at, value in (("tensors-length-huge", sg._tab.Vector(sg._tab.Offset(4)) - 4, 0x7FFFFFF0),
                            ("buffer-length-huge", buf1._tab.Vector(buf1._tab.Offset(4)) - 4, 0x40000000),
                            ("root-offset-out-of-file", 0, n + 1000)):
        b = bytearray(good)
        struct.pack_into("<I", b, at, value)
        out.append((name, bytes(b)))
    assert len(out) == 40
    return out


_EVAL_ALL = """
import json, os, sys, tempfile
from dqnc import cli
runtime, names = sys.argv[1], sys.argv[2:]
results = open("results-" + runtime + ".jsonl", "a")
for name in names:
    print(name, file=sys.__stdout__, flush=True)  # the parent learns which file a crash happened on
    sys.argv = ["dqnc", "eval", name + ".tflite", "--env", "CartPole-v1", "--runtime", runtime, "--episodes", "1"]
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        err.seek(0)
        text = err.read().decode(errors="replace").strip().splitlines()
    results.write(json.dumps({"name": name, "runtime": runtime, "code": code, "stderr": text}) + "\\n")
    results.flush()
"""


def _eval_all(tmp: Path, runtime: str, names: list[str]) -> list[dict]:
    """`dqnc eval` on each file, in one child per runtime (a crash ends the child: it is restarted after the file)."""
    results: list[dict] = []
    todo = list(names)
    while todo:
        rc, err, _ = _run([sys.executable, "-c", _EVAL_ALL, runtime, *todo], tmp, timeout=300)
        done = [json.loads(line) for line in (tmp / f"results-{runtime}.jsonl").read_text().splitlines()] \
            if (tmp / f"results-{runtime}.jsonl").exists() else []
        finished = {r["name"] for r in done}
        results = [r for r in done if r["runtime"] == runtime]
        remaining = [n for n in todo if n not in finished]
        if rc == 0 or not remaining:
            break
        crashed = remaining[0]  # the child died on this file: record it, go on with the rest
        with open(tmp / f"results-{runtime}.jsonl", "a") as f:
            f.write(json.dumps({"name": crashed, "runtime": runtime, "code": rc, "stderr": err[-3:]}) + "\n")
        todo = remaining[1:]
    return [json.loads(line) for line in (tmp / f"results-{runtime}.jsonl").read_text().splitlines()]


def test_damaged_tflite_files_never_crash_or_exit_3_on_tflm_or_litert(tmp_path: Path):
    """40 damaged copies of a small int8 model, `dqnc eval --runtime tflm|litert` on each.

    Before (measured one `dqnc eval` process per file): with --runtime tflm, 18 of 40 exited 3
    (struct.error, TypeError "bad number for type uint32", IndexError, ValueError from LiteRT's
    parameter count) and 3 killed the process (SIGSEGV: activation-4TB, op-input-out-of-range,
    graph-output-out-of-range); --runtime litert exited 0 or 2 (activation-4TB: 0)."""
    cases = damaged(tiny_int8())
    for name, data in cases:
        (tmp_path / f"{name}.tflite").write_bytes(data)
    names = [name for name, _ in cases]
    with ThreadPoolExecutor(2) as pool:
        found = [r for rs in pool.map(lambda rt: _eval_all(tmp_path, rt, names), ["tflm", "litert"]) for r in rs]
    assert len(found) == 80, len(found)
    bad = [r for r in found if r["code"] not in (0, 1, 2) or len(r["stderr"]) > 1
           or any("Traceback" in line or "internal error" in line for line in r["stderr"])]
    assert not bad, "\n".join(f"{r['runtime']} {r['name']}: exit {r['code']}: {r['stderr'][-2:]}" for r in bad)
    refused = {(r["runtime"], r["name"]): r for r in found if r["code"] == 2}
    for runtime in ("tflm", "litert"):  # the hostile declarations are refused by name, not by luck
        for name in ("activation-4TB", "input-shape-huge", "weight-shape-huge"):
            assert "MAX_TENSOR_ELEMENTS" in refused[runtime, name]["stderr"][0], refused[runtime, name]
        for name in ("op-input-out-of-range", "graph-output-out-of-range", "tensors-length-huge"):
            assert "out of range" in refused[runtime, name]["stderr"][0] or "do not fit" in refused[runtime, name]["stderr"][0]


def test_tflite_check_accepts_what_dqnc_builds():
    """The pre-check refuses damage, not models: the test model, the shipped MinAtar sample and a
    LUT-compressed (TFLM DECODE) model pass; its limits are dqnc.limits'."""
    from dqnc import limits, lowbit, runtime

    assert (runtime.MAX_TENSOR_ELEMENTS, runtime.MAX_TOTAL_ELEMENTS) == (limits.MAX_TENSOR_ELEMENTS, limits.MAX_TOTAL_ELEMENTS)
    good = tiny_int8()
    runtime.check_model(good)
    runtime.check_model((ROOT / "sample_models" / "minatar-breakout-int8" / "model.tflite").read_bytes())
    snapped, _ = lowbit.snap(good, 4)
    lut = lowbit.lut_compress(snapped, 4)
    assert lowbit.uses_decode(lut)
    runtime.check_model(lut)
