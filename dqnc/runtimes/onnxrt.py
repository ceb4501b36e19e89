"""ONNX Runtime: the policy as ONNX (:mod:`dqnc.onnx_export`), run by ``onnxruntime`` on the CPU.

A bundle exported with ``onnx: true`` runs its own ``model.onnx`` (checksummed by the manifest);
any other .tflite artifact is converted in memory first. The model keeps the .tflite's integer
input and output, so ``runtime.Policy`` drives it as it drives TFLM: the same input quantization,
output scale and first-maximum action as every other runtime. :func:`bundle_onnx` is export's
``onnx: true``: model.onnx for the bundle, shipped only after ONNX Runtime ran it against LiteRT.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dqnc.runtimes.base import Runtime

ONNXRUNTIME = "onnxruntime"
INSTALL = "pip install 'dqnc[onnx]' (or pip install onnxruntime)"


class Session:
    """An ONNX Runtime session behind the few tf.lite.Interpreter calls ``runtime.Policy`` makes;
    ``io`` is :func:`dqnc.onnx_export.io_of` of the .tflite the model was written from."""

    runtime = ONNXRUNTIME

    def __init__(self, onnx_model: bytes, io: dict[str, dict[str, Any]]) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one state per call: threads cost more than they give
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        self._output = [self.session.get_outputs()[0].name]
        self._io = io
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def _detail(self, which: str, index: int) -> dict[str, Any]:
        d = self._io[which]
        return {"index": index, "shape": d["shape"], "dtype": d["dtype"], "quantization": d["quantization"]}

    def get_input_details(self) -> list[dict[str, Any]]:
        return [self._detail("input", 0)]

    def get_output_details(self) -> list[dict[str, Any]]:
        return [self._detail("output", 1)]

    def get_tensor_details(self) -> list[dict[str, Any]]:
        return []  # no sparse tensors: dqnc.onnx_export refuses them

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        self._x = value

    def invoke(self) -> None:
        self._y = self.session.run(self._output, {self._input: self._x})[0]

    def get_tensor(self, index: int) -> np.ndarray:
        assert self._y is not None
        return self._y

    def run_batch(self, xq: np.ndarray) -> np.ndarray:
        """Raw outputs ``[N, n_actions]`` for model inputs ``[N, ...]`` in one call (the batch axis is free)."""
        return np.asarray(self.session.run(self._output, {self._input: xq})[0])


def onnx_bytes(source: Any, content: bytes) -> bytes:
    """The bundle's own model.onnx where its manifest lists it (verified at load), else ``content`` converted."""
    from dqnc.onnx_export import ONNX_FILE, to_onnx

    if not isinstance(source, (bytes, bytearray)) and (source.manifest.get("files") or {}).get(ONNX_FILE) \
            and (source.path / ONNX_FILE).is_file():
        return bytes((source.path / ONNX_FILE).read_bytes())
    return to_onnx(content)


def policy(onnx_model: bytes, content: bytes, manifest: dict[str, Any] | None = None) -> Any:
    """A ``runtime.Policy`` whose inferences run in ONNX Runtime (``content``: the .tflite it was written from)."""
    from dqnc.onnx_export import io_of
    from dqnc.runtime import Policy

    pre = (manifest or {}).get("preprocess") or {}
    return Policy(obs_mean=pre.get("obs_mean"), obs_std=pre.get("obs_std"),
                  interpreter=Session(onnx_model, io_of(content)))


def _available() -> str | None:
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return f"needs onnxruntime: {INSTALL}"
    return None


def _refuses(content: bytes, manifest: dict[str, Any] | None) -> str | None:
    from dqnc.onnx_export import refusal

    why = refusal(content)
    return f"no ONNX form of this model: {why}" if why else None


def _open(source: Any, manifest: dict[str, Any] | None) -> Any:
    from dqnc.errors import UsageError

    content = bytes(source) if isinstance(source, (bytes, bytearray)) else source.model_path.read_bytes()
    if manifest is None and not isinstance(source, (bytes, bytearray)):
        manifest = source.manifest
    try:
        return policy(onnx_bytes(source, content), content, manifest)
    except ImportError as e:  # installed but broken (e.g. a numpy ABI mismatch)
        raise UsageError(f"--runtime {ONNXRUNTIME} cannot import onnxruntime ({e}): {INSTALL}") from None


# model.onnx must act as model.tflite: its mean regret, against LiteRT's own scores and relative to
# their action spread, may not exceed this (a flip on a one-step tie costs a few thousandths).
MAX_REGRET_VS_LITERT = 0.01


def bundle_onnx(cfg: Any, source: Any, content: bytes, litert: Any, checked: tuple[Any, ...]) -> tuple[bytes, dict[str, Any]]:
    """``model.onnx`` for export's bundle and its manifest entry, after ONNX Runtime ran it on the
    check states (``checked``: :func:`dqnc.export.check_states`'s states, their origin, the
    parent's Q-values and Q-function) on the inputs LiteRT quantizes.

    LiteRT is the judge: the file ships the policy model.tflite holds. ONNX Runtime's actions may
    differ from LiteRT's on at most ``cfg.max_action_mismatch`` of the states (default
    ``NO_PARENT_MAX_MISMATCH``, 1%), each a near tie (:func:`dqnc.runtimes.crosscheck`: within
    ``NEAR_TIE_STEPS`` integer steps in both runtimes, or within float rounding for an fp32 model),
    with a mean regret against LiteRT's scores of at most :data:`MAX_REGRET_VS_LITERT`. Agreement
    and regret against the parent are reported beside LiteRT's. A failure raises GateFailed."""
    from importlib import metadata

    from dqnc.errors import GateFailed, UsageError
    from dqnc.fidelity import actions_of, fidelity
    from dqnc.onnx_export import ONNX_FILE, OPSET, form, to_onnx
    from dqnc.runtimes.crosscheck import NO_PARENT_MAX_MISMATCH, crosscheck
    from dqnc.runtimes.names import LITERT

    why = _available()
    if why:
        raise UsageError(f"export --onnx checks the model in ONNX Runtime, which {why}")
    states, who, q_parent, _ = checked
    model = to_onnx(content)
    limit = NO_PARENT_MAX_MISMATCH if cfg.max_action_mismatch is None else cfg.max_action_mismatch
    check = crosscheck(litert, policy(model, content, source.manifest), states, max_mismatch=limit,
                       labels=(ONNXRUNTIME, LITERT))
    ours = actions_of(check.raw_candidate)
    vs_litert = fidelity(check.raw_reference.astype(np.float64), ours)
    figures = {**check.figures, "states_from": who, "agreement_vs_litert": vs_litert["agreement"],
               "regret_vs_litert": vs_litert["regret"], "max_regret_vs_litert": MAX_REGRET_VS_LITERT}
    if q_parent is not None:
        on = {ONNXRUNTIME: fidelity(q_parent, ours), LITERT: fidelity(q_parent, actions_of(check.raw_reference))}
        figures.update({f"{k}_vs_parent": {rt: f[k] for rt, f in on.items()} for k in ("agreement", "regret")})
    entry = {"file": ONNX_FILE, "bytes": len(model), "form": form(content), "opset": OPSET,
             ONNXRUNTIME: metadata.version("onnxruntime"), "check": figures}
    problems = [check.why] if check.why else []
    if vs_litert["regret"] > MAX_REGRET_VS_LITERT:
        problems.append(f"ONNX Runtime's mean regret against LiteRT's scores is {vs_litert['regret']:.4f} of their "
                        f"action spread > {MAX_REGRET_VS_LITERT:g}")
    if problems:
        raise GateFailed(f"{'; '.join(problems)}: model.onnx would act unlike model.tflite; nothing written",
                         {"onnx": entry})
    return model, entry


ONNXRT_RUNTIME = Runtime(name=ONNXRUNTIME, summary="ONNX Runtime on the CPU, on the policy as QDQ (int8) or fp32 ONNX "
                         "(the onnx extra)", available=_available, refuses=_refuses, open=_open)
