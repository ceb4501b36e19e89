"""The PyTorch checkpoint format, read without PyTorch and without running pickled code.

``torch.save`` writes a zip: ``ARCHIVE/data.pkl`` (a pickle that describes the object and
names each tensor's storage) plus one raw little-endian file per storage (``ARCHIVE/data/KEY``).
A pickle can call any importable function, so :class:`RestrictedUnpickler` resolves only the
globals that tensor rebuilding needs (``torch._utils._rebuild_tensor_v2``, the ``torch.*Storage``
types, ``collections.OrderedDict``) to local numpy implementations and refuses every other
global by name. Storage views are bounds-checked before any array is made from them, so a
tampered header cannot read outside the stored bytes, and sized against :mod:`dqnc.limits` before
any is copied: a view may not hold more elements than its storage (a stride-0 view of 4 floats
declared as 32768 x 32768 once made a 1.1 KB file take 4.1 GB). Containers nested deeper than
``limits.MAX_NESTING`` are refused before they are built (a tuple nested 200,000 deep as a dict
key crashed the process hashing it) and again after loading.

The same unpickler, with a wider profile, reads SB3's ``VecNormalize`` pickles: numpy arrays
are rebuilt by numpy's own pickle helpers, and SB3/gymnasium objects become inert records of
their pickled state (their classes are never imported).
"""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import limits
from dqnc.errors import ArtifactError

# torch storage type -> numpy dtype (bfloat16 is widened to float32 when rebuilt).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?", "UntypedStorage": "u1",
}
MAX_ENTRY_BYTES = limits.MAX_DECOMPRESSED_BYTES  # no Q-network for a control task comes near 1 GiB
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # a pickle's own bytes (tensor data lives in the archive's storages)


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
                    hooks: Any = None, metadata: Any = None, *, what: str = "file") -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` as a bounds-checked numpy view, copied once its size is
    known to be within the limits and no larger than its storage."""
    if not isinstance(storage, np.ndarray):
        raise ValueError("tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or not all(isinstance(v, int) for v in (offset, *size, *stride)):
        raise ValueError(f"malformed tensor header (size {limits.clip(size, 80)}, stride {limits.clip(stride, 80)})")
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"negative tensor offset/size/stride ({offset}, {limits.clip(size, 80)}, {limits.clip(stride, 80)})")
    n = limits.check_elements(size, f"{what}: a tensor", name="MAX_TENSOR_ELEMENTS")
    if n > storage.size or any(st == 0 and dim > 1 for dim, st in zip(size, stride)):
        # A view holding more elements than its storage repeats them (stride 0, overlapping strides):
        # copying it would expand a few stored bytes into as much memory as the header asks for.
        raise limits.LimitError(f"{what}: a tensor view of shape {limits.clip(size, 80)} (stride {limits.clip(stride, 80)}) "
                                f"repeats the {storage.size:,} elements of its storage; torch.save never writes "
                                "such a view for a parameter: the file is damaged or hostile, re-save the checkpoint")
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
                return functools.partial(_rebuild_tensor, what=self.what)
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


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def read_zip_entry(zf: zipfile.ZipFile, name: str, what: str) -> bytes:
    """One zip member's bytes, refused (LimitError) past ``limits.MAX_DECOMPRESSED_BYTES``, declared
    or inflated (the CRC is checked by zipfile)."""
    return limits.read_zip_member(zf, name, what, MAX_ENTRY_BYTES)


_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "BUILD", "ADDITEMS"}  # add to the object below them
MAX_PICKLE_OBJECTS = 1_000_000  # objects a pickle stands for, each shared reference counted where it is used


def _pickle_nesting(data: bytes, what: str, limit: int = limits.MAX_NESTING) -> None:
    """Refuse a pickle whose objects nest deeper than ``limit``, or that stands for more than
    ``MAX_PICKLE_OBJECTS`` objects once its shared references are expanded, before unpickling it.

    Python's unpickler builds nested containers without recursion, but using them recurses in C:
    hashing a tuple nested 200,000 deep (a dict key) overflows the C stack and kills the process,
    and hashing 60 levels of ``t = (t, t)`` (490 bytes) takes 2^60 steps. This walks the opcodes
    once (no objects are made), tracking each stack entry's depth and expanded size."""
    if len(data) > MAX_PICKLE_BYTES:
        raise limits.LimitError(f"{what}: a pickle of {len(data):,} bytes, over dqnc's limit of {MAX_PICKLE_BYTES:,} "
                                "(dqnc.importers.torchzip.MAX_PICKLE_BYTES); a checkpoint's pickle is a few KB")
    stack: list[tuple[int, int] | None] = []  # (depth, expanded size); None marks a MARK
    memo: dict[Any, tuple[int, int]] = {}
    atom = (0, 1)
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name == "MARK":
            stack.append(None)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1] or atom
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, atom))
        elif name == "STOP":
            break
        else:
            consumed: list[tuple[int, int]] = []
            before = op.stack_before
            if pickletools.markobject in before:
                while stack and stack[-1] is not None:
                    consumed.append(stack.pop())  # type: ignore[arg-type]
                if not stack:
                    raise pickle.UnpicklingError(f"{name} without a MARK")
                stack.pop()
                below = before.index(pickletools.markobject)
            else:
                below = len(before)
            if len(stack) < below:
                raise pickle.UnpicklingError(f"{name} on a short stack")
            under = [e or atom for e in stack[len(stack) - below:]] if below else []
            del stack[len(stack) - below:]
            if name in _MUTATORS:  # the container keeps its place; it grows around its new items
                base, items = (under[0] if under else atom), under[1:] + consumed
                depth = max(base[0], 1 + max((d for d, _ in items), default=-1))
                size = base[1] + sum(n for _, n in items)
            else:
                items = under + consumed
                depth = 1 + max(d for d, _ in items) if items else 0
                size = 1 + sum(n for _, n in items)
            if depth > limit:
                raise limits.LimitError(f"{what}: the pickle nests objects more than {limit} levels deep "
                                        "(dqnc.limits.MAX_NESTING); the file is damaged or hostile")
            if size > MAX_PICKLE_OBJECTS:
                raise limits.LimitError(f"{what}: the pickle stands for over {MAX_PICKLE_OBJECTS:,} objects once its "
                                        "shared references are expanded (dqnc.importers.torchzip.MAX_PICKLE_OBJECTS); "
                                        "the file is damaged or hostile")
            stack.extend((depth, size) for _ in op.stack_after)


def _check_nesting(obj: Any, what: str, limit: int = limits.MAX_NESTING) -> Any:
    """Refuse an unpickled object nested deeper than ``limit`` (iterative; shared objects are
    revisited only when reached deeper, so a pickle's shared references cannot blow it up)."""
    best: dict[int, int] = {}
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if isinstance(x, dict):
            children: Any = [*x.keys(), *x.values()]
        elif isinstance(x, (list, tuple, set, frozenset)):
            children = x
        elif isinstance(x, _Opaque):
            children = (getattr(x, "args", ()), getattr(x, "state", None))
        else:
            continue
        if best.get(id(x), 0) >= depth:
            continue
        best[id(x)] = depth
        if depth > limit:
            raise limits.LimitError(f"{what}: the pickle nests objects more than {limit} levels deep "
                                    "(dqnc.limits.MAX_NESTING); the file is damaged or hostile")
        stack.extend((c, depth + 1) for c in children)
    return obj


def _unpickle(data: bytes, profile: str, storages: Any, what: str) -> Any:
    _pickle_nesting(data, what)
    return _check_nesting(RestrictedUnpickler(data, profile, storages, what).load(), what)


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
        loaded = [0]

        def storage(key: str, stype: _StorageType, numel: Any) -> np.ndarray:
            if key not in cache:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise ArtifactError(f"{what}: storage {limits.clip(key, 80)!r} named in data.pkl is missing from "
                                        "the archive (truncated or tampered)")
                raw = read_zip_entry(zf, member, what)
                loaded[0] += len(raw)
                if loaded[0] > MAX_ENTRY_BYTES:
                    raise limits.LimitError(f"{what}: its storages hold over {MAX_ENTRY_BYTES:,} bytes in all "
                                            "(dqnc.limits.MAX_DECOMPRESSED_BYTES); this is not a Q-network dqnc can deploy")
                if len(raw) % stype.dtype.itemsize:
                    raise ValueError(f"storage {key!r} has {len(raw)} bytes, not a whole number of {stype.name} items")
                arr = np.frombuffer(raw, stype.dtype)
                if stype.name == "BFloat16Storage":  # bfloat16 is the top half of a float32
                    arr = (arr.astype(np.uint32) << 16).view(np.float32)
                cache[key] = arr
            return cache[key]

        obj = _unpickle(read_zip_entry(zf, pkls[0], what), "tensors", storage, what)
    except (ArtifactError, limits.LimitError):
        raise
    except (Exception, RecursionError) as e:  # any damage in an untrusted file is bad input, not a crash
        raise ArtifactError(f"{what}: damaged PyTorch archive ({type(e).__name__}: {first_line(e)}); "
                            "re-save the checkpoint") from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{what}: holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")
    out = {}
    budget = limits.Budget(f"{what}: state_dict")
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            budget.take(v.shape, limits.clip(k, 80))
            out[str(k)] = v
    if not out:
        raise ArtifactError(f"{what}: the state_dict holds no tensors")
    return out


def load_pickle(data: bytes, profile: str, what: str) -> Any:
    """Unpickle a non-PyTorch pickle (e.g. VecNormalize) with the restricted unpickler."""
    try:
        return _unpickle(data, profile, None, what)
    except (ArtifactError, limits.LimitError):
        raise
    except (Exception, RecursionError) as e:
        raise ArtifactError(f"{what}: not a readable pickle ({type(e).__name__}: {first_line(e)})") from None


def read_file(path: Path, limit: int = MAX_ENTRY_BYTES, limit_name: str = "dqnc.limits.MAX_DECOMPRESSED_BYTES") -> bytes:
    """A model file's bytes, refused (LimitError) before reading when it is larger than ``limit``."""
    try:
        size = Path(path).stat().st_size
        if size > limit:
            raise limits.LimitError(f"{limits.clip(path)}: {size:,} bytes, over dqnc's limit of {limit:,} for this file "
                                    f"({limit_name}); this is not a Q-network dqnc can deploy")
        return Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"cannot read {str(path)!r}: {e.strerror}") from None
