"""A minimal writer of the PyTorch zip checkpoint format, for tests (no torch needed).

It emits the same pickle opcodes ``torch.save`` does for a state_dict of contiguous float32
tensors (``collections.OrderedDict`` of ``torch._utils._rebuild_tensor_v2`` calls whose
storages are persistent ids ``('storage', torch.FloatStorage, key, 'cpu', numel)``), plus raw
little-endian storages under ``ARCHIVE/data/KEY``. ``extra_pickle`` lets a test plant globals.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import numpy as np


def _str(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(i: int) -> bytes:
    return pickle.BININT + struct.pack("<i", i)


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def state_dict_pickle(tensors: dict[str, np.ndarray], inject: bytes = b"") -> bytes:
    out = [pickle.PROTO + b"\x02", _global("collections", "OrderedDict"), pickle.EMPTY_TUPLE, pickle.REDUCE, pickle.MARK]
    for i, (key, arr) in enumerate(tensors.items()):
        arr = np.ascontiguousarray(arr, np.float32)
        stride = [int(s // 4) for s in arr.strides] if arr.ndim else []
        storage = _tuple([_str("storage"), _global("torch", "FloatStorage"), _str(str(i)), _str("cpu"), _int(arr.size)])
        hooks = _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
        args = _tuple([storage + pickle.BINPERSID, _int(0), _tuple([_int(int(d)) for d in arr.shape]),
                       _tuple([_int(s) for s in stride]), pickle.NEWFALSE, hooks])
        out += [_str(key), _global("torch._utils", "_rebuild_tensor_v2"), args, pickle.REDUCE]
    out += [pickle.SETITEMS]
    if inject:  # replace the dict by the injected object: e.g. a call of os.system
        out += [pickle.POP, inject]
    out += [pickle.STOP]
    return b"".join(out)


def torch_zip(tensors: dict[str, np.ndarray], archive: str = "archive", inject: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", state_dict_pickle(tensors, inject))
        zf.writestr(f"{archive}/byteorder", "little")
        for i, arr in enumerate(tensors.values()):
            zf.writestr(f"{archive}/data/{i}", np.ascontiguousarray(arr, "<f4").tobytes())
        zf.writestr(f"{archive}/version", "3\n")
    return buf.getvalue()


def malicious_call(module: str = "os", name: str = "system", arg: str = "touch /tmp/dqnc-pwned") -> bytes:
    return _global(module, name) + _tuple([_str(arg)]) + pickle.REDUCE


def sb3_zip(tensors: dict[str, np.ndarray], net_arch: list[int], activation: str | None = "Tanh",
            obs_type: str = "gymnasium.spaces.box.Box", observation_space: dict | None = None,
            action_space: dict | None = None, inject: bytes = b"") -> bytes:
    """An SB3 DQN model zip: 'data' JSON as SB3 writes it, plus policy.pth (``observation_space``:
    the readable keys SB3 writes beside the pickled space, e.g. ``_shape``, ``dtype``, ``low_repr``)."""
    policy_kwargs: dict = {"net_arch": net_arch}
    if activation:
        policy_kwargs = {":type:": "<class 'dict'>", ":serialized:": "not-decoded", "net_arch": net_arch,
                         "activation_fn": f"<class 'torch.nn.modules.activation.{activation}'>"}
    data = {"policy_class": {":type:": "<class 'abc.ABCMeta'>", ":serialized:": "x",
                             "__module__": "stable_baselines3.dqn.policies"},
            "policy_kwargs": policy_kwargs, "num_timesteps": 1000,
            "observation_space": observation_space or {":type:": f"<class '{obs_type}'>", ":serialized:": "x"}}
    if action_space is not None:
        data["action_space"] = {":type:": "<class 'gymnasium.spaces.discrete.Discrete'>", ":serialized:": "x", **action_space}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("data", json.dumps(data))
        zf.writestr("policy.pth", torch_zip(tensors, inject=inject))
        zf.writestr("_stable_baselines3_version", "2.9.2")
    return buf.getvalue()


def vecnormalize_pickle(mean: np.ndarray, var: np.ndarray, clip_obs: float, epsilon: float = 1e-8) -> bytes:
    """A pickle shaped like VecNormalize.save's: objects by global name, numpy arrays by numpy's reduce."""

    def arr(a: np.ndarray) -> bytes:
        body = pickle.dumps(np.asarray(a, np.float64), protocol=4)
        return body[2:-1].lstrip(pickle.FRAME)[8:] if body[2:3] == pickle.FRAME else body[2:-1]  # numpy's own opcodes

    def obj(module: str, name: str, state: list[tuple[str, bytes]]) -> bytes:
        body = pickle.EMPTY_DICT + pickle.MARK + b"".join(_str(k) + v for k, v in state) + pickle.SETITEMS
        return _global(module, name) + pickle.EMPTY_TUPLE + pickle.NEWOBJ + body + pickle.BUILD

    rms = obj("stable_baselines3.common.running_mean_std", "RunningMeanStd",
              [("mean", arr(mean)), ("var", arr(var)), ("count", pickle.BINFLOAT + struct.pack(">d", 100.0))])
    vn = obj("stable_baselines3.common.vec_env.vec_normalize", "VecNormalize",
             [("obs_rms", rms), ("clip_obs", pickle.BINFLOAT + struct.pack(">d", clip_obs)),
              ("epsilon", pickle.BINFLOAT + struct.pack(">d", epsilon)), ("norm_obs", pickle.NEWTRUE)])
    return pickle.PROTO + b"\x04" + vn + pickle.STOP
