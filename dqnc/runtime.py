"""TFLite inference with numpy and a TFLite runtime only: LiteRT, else tflite-runtime.

This module imports nothing from dqnc or TensorFlow. ``dqnc export`` copies it verbatim into
every bundle as ``run_policy.py``, so the code that dqnc evaluates is the code a device runs.

    python run_policy.py --obs 0.01,-0.02,0.03,0.04      # prints the action index
    echo '[0.01, -0.02, 0.03, 0.04]' | python run_policy.py   # one JSON observation per line
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

RUNTIMES = ("ai_edge_litert", "tflite_runtime")


class quiet_stderr:
    """Keep C++ chatter written straight to fd 2 (e.g. "Created TensorFlow Lite XNNPACK delegate")
    off the terminal; what was captured is replayed if the block raises. DQNC_TF_LOGS=1 shows all."""

    def __init__(self, replay_on_error: bool = True) -> None:
        self.replay_on_error = replay_on_error

    def __enter__(self) -> quiet_stderr:
        self.saved = None
        if os.environ.get("DQNC_TF_LOGS"):
            return self
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
        except (OSError, ValueError):
            return self
        import tempfile

        self.capture = tempfile.TemporaryFile()
        os.dup2(self.capture.fileno(), 2)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.saved is None:
            return
        os.dup2(self.saved, 2)
        os.close(self.saved)
        if exc_type is not None and self.replay_on_error:
            self.capture.seek(0)
            sys.stderr.write(self.capture.read().decode(errors="replace"))
        self.capture.close()


def interpreter_class(prefer: str | None = None) -> tuple[Any, str]:
    """The interpreter module of the first runtime that imports (LiteRT first), and its name."""
    order = [prefer] if prefer else list(RUNTIMES)
    errors = []
    for name in order:
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert import interpreter as module
            elif name == "tflite_runtime":
                from tflite_runtime import interpreter as module
            else:
                raise ImportError(f"unknown runtime {name!r}")
            return module, name
        except ImportError as e:  # also numpy-ABI failures of old wheels
            errors.append(f"{name}: {e}")
    raise ImportError("no TFLite runtime could be imported (" + "; ".join(errors) + "): pip install ai-edge-litert")


class Policy:
    """A Q-network in a .tflite file: float observations in, float Q-values or an action out.

    Integer (int8/int16) inputs and outputs are quantized/dequantized with the tensors' own
    scale and zero point, so callers never see the model's precision.
    """

    def __init__(self, model_path: str | None = None, model_content: bytes | None = None,
                 runtime: str | None = None, num_threads: int = 1,
                 obs_mean: Any = None, obs_std: Any = None, interpreter: Any = None) -> None:
        if interpreter is not None:
            # Another runtime behind the tf.lite.Interpreter calls used here (dqnc.tflm).
            self.interpreter, self.delegate, self.runtime = interpreter, "none", interpreter.runtime
        else:
            module, self.runtime = interpreter_class(runtime)
            if model_path is not None and model_content is None:
                with open(model_path, "rb") as f:
                    model_content = f.read()
            if not model_content:
                raise ValueError("empty model: the .tflite file holds no bytes")
            if len(model_content) < 8 or model_content[4:8] != b"TFL3":
                raise ValueError("not a TFLite flatbuffer (missing the 'TFL3' identifier)")
            self.interpreter, self.delegate = _allocate(module, model_content, num_threads)
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"expected 1 input and 1 output, found {len(inputs)} and {len(outputs)}")
        self._in, self._out = inputs[0], outputs[0]
        self.obs_dim = int(np.prod(self._in["shape"][1:]))
        self.n_actions = int(np.prod(self._out["shape"][1:]))
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        self.input_scale, self.input_zero_point = _qparams(self._in)
        self.output_scale, self.output_zero_point = _qparams(self._out)
        self._in_shape = tuple(int(s) for s in self._in["shape"])
        self._in_index, self._out_index = self._in["index"], self._out["index"]
        self._set = self.interpreter.set_tensor
        self._get = self.interpreter.get_tensor
        self._invoke = self.interpreter.invoke
        # Observations are standardized per feature before the model's own (per-tensor) input
        # quantization; both are folded into one affine map, x * a + c, applied in numpy.
        mean = np.zeros(self.obs_dim) if obs_mean is None else np.asarray(obs_mean, np.float64).reshape(-1)
        std = np.ones(self.obs_dim) if obs_std is None else np.asarray(obs_std, np.float64).reshape(-1)
        if mean.shape != (self.obs_dim,) or std.shape != (self.obs_dim,) or (std <= 0).any():
            raise ValueError(f"obs_mean/obs_std must hold {self.obs_dim} values (std > 0)")
        if self.input_dtype.kind == "f":
            self._a, self._c = 1.0 / std, -mean / std
        else:
            self._a = 1.0 / (std * self.input_scale)
            self._c = -mean / (std * self.input_scale) + self.input_zero_point
        self._a, self._c = np.asarray(self._a, np.float32), np.asarray(self._c, np.float32)
        if self.input_dtype.kind != "f":
            info = np.iinfo(self.input_dtype)
            self._lo, self._hi = np.float32(info.min), np.float32(info.max)
        self._identity = self.input_dtype.kind == "f" and obs_mean is None and obs_std is None

    @classmethod
    def from_manifest(cls, model_path: str, manifest: dict[str, Any] | None, **kwargs: Any) -> Policy:
        """A Policy with the observation preprocessing recorded in a dqnc manifest (if any)."""
        pre = (manifest or {}).get("preprocess") or {}
        return cls(model_path, obs_mean=pre.get("obs_mean"), obs_std=pre.get("obs_std"), **kwargs)

    def _quantize(self, obs: np.ndarray) -> np.ndarray:
        if obs.shape[-1:] != (self.obs_dim,):  # images (HWC): the per-feature map is over the flat order
            obs = obs.reshape(-1, self.obs_dim)
        if self._identity:
            return obs.astype(self.input_dtype, copy=False)
        x = obs * self._a
        x += self._c
        if self.input_dtype.kind == "f":
            return x.astype(self.input_dtype)
        np.rint(x, out=x)
        np.maximum(x, self._lo, out=x)  # ufuncs: np.clip's Python wrapper costs ~1 us per call
        np.minimum(x, self._hi, out=x)
        return x.astype(self.input_dtype)

    def _dequantize(self, q: np.ndarray) -> np.ndarray:
        if self.output_dtype.kind == "f":
            return q.astype(np.float32)
        return ((q.astype(np.float32) - self.output_zero_point) * self.output_scale).astype(np.float32)

    def q_values(self, obs: Any) -> np.ndarray:
        """Q-values for a batch ``[N, obs_dim]`` (or one observation), as float32 ``[N, n_actions]``."""
        rows = np.asarray(obs).reshape(-1, self.obs_dim)
        out = np.empty((len(rows), self.n_actions), np.float32)
        for start in range(0, len(rows), 1024):  # chunks: 10,000 Atari states are 1.1 GB as float32
            xq = self._quantize(rows[start:start + 1024].astype(np.float32))
            for i in range(len(xq)):
                self._set(self._in_index, xq[i].reshape(self._in_shape))
                self._invoke()
                out[start + i] = self._dequantize(self._get(self._out_index).reshape(-1))
        return out

    __call__ = q_values

    def io(self) -> dict[str, Any]:
        """Input/output dtype, shape, scale and zero point, as manifests record them."""
        def one(detail: dict[str, Any], dtype: np.dtype, scale: float, zero: int) -> dict[str, Any]:
            return {"dtype": dtype.name, "shape": [int(s) for s in detail["shape"]], "scale": scale, "zero_point": zero}

        return {"input": one(self._in, self.input_dtype, self.input_scale, self.input_zero_point),
                "output": one(self._out, self.output_dtype, self.output_scale, self.output_zero_point)}

    @property
    def has_sparse_tensors(self) -> bool:
        return any(d.get("sparsity_parameters") for d in self.interpreter.get_tensor_details())

    def act(self, obs: Any) -> int:
        """The greedy action for one observation (the per-step path of a control loop).

        Dequantizing is monotonic (scale > 0), so the argmax is taken on the raw output.
        """
        self._set(self._in_index, self._quantize(np.asarray(obs, np.float32)).reshape(self._in_shape))
        self._invoke()
        return int(self._get(self._out_index).argmax())

    def invoke_quantized(self, xq: np.ndarray) -> np.ndarray:
        """Set an already-quantized input, invoke, return the raw output: the interpreter's own cost."""
        self._set(self._in_index, xq)
        self._invoke()
        return self._get(self._out_index)


def _allocate(module: Any, content: bytes, num_threads: int) -> tuple[Any, str]:
    """An allocated interpreter: the runtime's default delegates (XNNPACK) first, plain builtin
    kernels where a delegate refuses the graph (XNNPACK rejects some sparse int8 layers)."""
    resolver = getattr(module, "OpResolverType", None)
    try:
        with quiet_stderr(replay_on_error=resolver is None):  # a refused delegate is not news
            it = module.Interpreter(model_content=content, num_threads=num_threads)
            it.allocate_tensors()
            it.invoke()  # some runtimes apply delegates (and announce them) on the first invoke
        return it, "default"
    except RuntimeError:
        if resolver is None:
            raise
    with quiet_stderr():
        it = module.Interpreter(model_content=content, num_threads=num_threads,
                                experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        it.invoke()
    return it, "builtin"


def _qparams(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description="Map observations to actions with a TFLite Q-network.")
    p.add_argument("--model", default=os.path.join(here, "model.tflite"), help="path of the .tflite file")
    p.add_argument("--obs", help="one observation as comma-separated floats; else JSON lines on stdin")
    p.add_argument("--runtime", choices=RUNTIMES, help="force a runtime (default: first that imports)")
    p.add_argument("--q", action="store_true", help="print Q-values too, as JSON")
    args = p.parse_args(argv)
    manifest = None
    manifest_path = os.path.join(os.path.dirname(os.path.abspath(args.model)), "manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    try:
        policy = Policy.from_manifest(args.model, manifest, runtime=args.runtime)
    except (ImportError, ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [args.obs] if args.obs is not None else sys.stdin
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            obs = json.loads(line) if line.startswith("[") else [float(v) for v in line.split(",")]
            x = np.asarray(obs, np.float32).reshape(-1, policy.obs_dim)
        except ValueError as e:
            print(f"error: bad observation {line!r} ({e}); expected {policy.obs_dim} numbers", file=sys.stderr)
            return 2
        q = policy.q_values(x)
        for row in q:
            print(json.dumps({"action": int(row.argmax()), "q": [round(float(v), 6) for v in row]}) if args.q
                  else int(row.argmax()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
