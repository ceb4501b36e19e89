"""The PyTorch checkpoint format, read without PyTorch and without running pickled code.

``torch.save`` writes a zip: ``ARCHIVE/data.pkl`` (a pickle that describes the object and
names each tensor's storage) plus one raw little-endian file per storage (``ARCHIVE/data/KEY``).
A pickle can call any importable function, so :class:`RestrictedUnpickler` resolves only the
globals that tensor rebuilding needs (``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage``
types, ``collections.OrderedDict``) to local numpy implementations and refuses every other
global by name. Storage views are bounds-checked before any array is made from them, so a
tampered header cannot read outside the stored bytes.

The same unpickler, with a wider profile, reads SB3's ``VecNormalize`` pickles: numpy arrays
are rebuilt by numpy's own pickle helpers, and SB3/gymnasium objects become inert records of
their pickled state (their classes are never imported).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from dqnc.errors import ArtifactError

# torch storage type -> numpy dtype (bfloat16 is widened to float32 when rebuilt).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1",
}
MAX_ENTRY_BYTES = 1 << 30  # no Q-network for a control task comes near 1 GiB; a larger entry is a zip bomb


class UnsafePickleError(ArtifactError):
    """A pickle asked for a global outside the allowed profile (it was not imported or called)."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. inside a persistent id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


class _Opaque:
    """An inert record of a pickled object whose class is never imported (SB3/gymnasium types)."""

    _global = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self._global}>"


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` as a bounds-checked numpy view, copied."""
    if not isinstance(storage, np.ndarray):
        raise ValueError("tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(isinstance(v, int) for v in (offset, *size, *stride)):
        raise ValueError(f"malformed tensor header (size {size}, stride {stride})")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"negative tensor offset/size/stride ({offset}, {size}, {stride})")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise ValueError(f"tensor view (offset {offset}, size {size}, stride {stride}) reaches past its "
                             f"storage of {storage.size} elements")
    else:
        return np.zeros(size, storage.dtype)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * item for s in stride],
                                           writeable=False)
    return np.array(view)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> Any:
    return data


_NUMPY_SAFE = {  # numpy's own pickle helpers: they build arrays/dtypes/scalars from bytes, nothing else
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles spell bytes as encode(str, "latin1")
}
_OPAQUE_MODULES = ("stable_baselines3.common.vec_env.", "stable_baselines3.common.running_mean_std",
                   "gymnasium.spaces.", "numpy.random._pickle", "numpy.random.bit_generator")


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` allows only the ``profile``'s globals.

    ``profile`` is ``"tensors"`` (PyTorch state dicts) or ``"vecnormalize"`` (SB3 statistics).
    """

    def __init__(self, data: bytes, profile: str = "tensors", storages: Any = None, what: str = "file") -> None:
        super().__init__(io.BytesIO(data))
        self.profile = profile
        self.storages = storages
        self.what = what

    def find_class(self, module: str, name: str) -> Any:
        if self.profile == "tensors":
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return _rebuild_tensor
            if module == "torch._utils" and name == "_rebuild_parameter":
                return _rebuild_parameter
            if module == "torch" and name in STORAGE_DTYPES:
                return _StorageType(name)
            if module == "collections" and name == "OrderedDict":
                return OrderedDict
        elif self.profile == "vecnormalize":
            if (module, name) in _NUMPY_SAFE:
                import importlib

                return getattr(importlib.import_module(module), name)
            if module == "collections" and name == "OrderedDict":
                return OrderedDict
            if any(module == m.rstrip(".") or module.startswith(m) for m in _OPAQUE_MODULES):
                return type(name, (_Opaque,), {"_global": f"{module}.{name}"})
        allowed = ("tensor rebuilding (torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict)"
                   if self.profile == "tensors" else
                   "numpy arrays and SB3/gymnasium statistics records")
        raise UnsafePickleError(
            f"{self.what}: the pickle asks for the global {module}.{name}, which dqnc refuses to load "
            f"(only {allowed} is allowed): the file is not a plain checkpoint or was tampered with; "
            "nothing from it was executed"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self.profile != "tensors" or self.storages is None:
            raise pickle.UnpicklingError("persistent id outside a PyTorch archive")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        stype, key, numel = pid[1], str(pid[2]), pid[4]
        return self.storages(key, stype, numel)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def read_zip_entry(zf: zipfile.ZipFile, name: str, what: str) -> bytes:
    """One zip member's bytes, refusing oversized members (the CRC is checked by zipfile)."""
    info = zf.getinfo(name)
    if info.file_size > MAX_ENTRY_BYTES:
        raise ArtifactError(f"{what}: member {name!r} claims {info.file_size:,} bytes, more than any Q-network; "
                            "the file is damaged or not a checkpoint")
    return zf.read(name)


def load_state_dict(data: bytes, what: str) -> dict[str, np.ndarray]:
    """Read a ``torch.save``'d state dict (zip format) from bytes into ``{key: ndarray}``."""
    if data[:2] != b"PK":
        if data[:1] == b"\x80":
            raise ArtifactError(f"{what}: a legacy (pre-1.6, non-zip) PyTorch file; re-save it with a current "
                                "torch.save, which writes the zip format dqnc reads")
        raise ArtifactError(f"{what}: not a PyTorch checkpoint (no zip header)")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ArtifactError(f"{what}: a zip but not a PyTorch archive (expected one ARCHIVE/data.pkl, "
                                f"found {len(pkls)})")
        prefix = pkls[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and read_zip_entry(zf, f"{prefix}byteorder", what).strip() not in (b"little", b""):
            raise ArtifactError(f"{what}: big-endian PyTorch archives are not supported; re-save on a little-endian machine")
        cache: dict[str, np.ndarray] = {}

        def storage(key: str, stype: _StorageType, numel: Any) -> np.ndarray:
            if key not in cache:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise ArtifactError(f"{what}: storage {key!r} named in data.pkl is missing from the archive "
                                        "(truncated or tampered)")
                raw = read_zip_entry(zf, member, what)
                if len(raw) % stype.dtype.itemsize:
                    raise ValueError(f"storage {key!r} has {len(raw)} bytes, not a whole number of {stype.name} items")
                arr = np.frombuffer(raw, stype.dtype)
                if stype.name == "BFloat16Storage":  # bfloat16 is the top half of a float32
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                cache[key] = arr
            return cache[key]

        obj = RestrictedUnpickler(read_zip_entry(zf, pkls[0], what), "tensors", storage, what).load()
    except ArtifactError:
        raise
    except (Exception, RecursionError) as e:  # any damage in an untrusted file is bad input, not a crash
        raise ArtifactError(f"{what}: damaged PyTorch archive ({type(e).__name__}: {_first_line(e)}); "
                            "re-save the checkpoint") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what}: holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v
    if not out:
        raise ArtifactError(f"{what}: the state_dict holds no tensors")
    return out


def load_pickle(data: bytes, profile: str, what: str) -> Any:
    """Unpickle a non-PyTorch pickle (e.g. VecNormalize) with the restricted unpickler."""
    try:
        return RestrictedUnpickler(data, profile, None, what).load()
    except ArtifactError:
        raise
    except (Exception, RecursionError) as e:
        raise ArtifactError(f"{what}: not a readable pickle ({type(e).__name__}: {_first_line(e)})") from None


def read_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {str(path)!r}: {e.strerror}") from None
