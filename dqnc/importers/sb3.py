"""Stable-Baselines3 DQN ``.zip`` files and ``VecNormalize`` statistics, read without SB3 or PyTorch.

An SB3 zip holds ``data`` (JSON: hyperparameters, spaces, ``policy_kwargs``) and ``policy.pth``
(the policy's state_dict in the PyTorch zip format). The online network is
``q_net.q_net.{0,2,4...}`` (``q_net_target`` is the target copy and is ignored); its activation
is ``policy_kwargs.activation_fn`` (default ReLU) and its widths must match ``net_arch``. The
``:serialized:`` cloudpickle blobs in ``data`` are never decoded.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import limits
from dqnc.errors import ArtifactError, UsageError
from dqnc.importers import torchzip
from dqnc.importers.cleanrl import linear_chain
from dqnc.importers.common import Clip, Op, ScaleShift, Source, UnsupportedModelError

ACTIVATIONS = {"ReLU": "relu", "Tanh": "tanh", "ELU": "elu", "Sigmoid": "sigmoid"}
DEFAULT_NET_ARCH = [64, 64]  # SB3 DQN's default when policy_kwargs has no net_arch


def _activation(policy_kwargs: dict[str, Any], what: str) -> str:
    raw = policy_kwargs.get("activation_fn")
    if raw is None:
        return "relu"
    name = str(raw).rstrip("'>").rsplit(".", 1)[-1]
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"{what}: activation_fn {raw!r} is not supported (supported: "
                                    f"{', '.join('nn.' + a for a in ACTIVATIONS)})")
    return ACTIVATIONS[name]


def load(path: Path, cfg: Any) -> Source:
    what = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if "policy.pth" not in names or "data" not in names:
                raise ArtifactError(f"{what}: not a Stable-Baselines3 model zip (no 'data' and 'policy.pth' inside)")
            data = limits.loads_json(limits.read_zip_member(zf, "data", what, limits.MAX_JSON_BYTES), f"{what}: 'data'")
            policy = torchzip.read_zip_entry(zf, "policy.pth", what)
            version = (limits.read_zip_member(zf, "_stable_baselines3_version", what, 4096).decode(errors="replace").strip()
                       if "_stable_baselines3_version" in names else None)
    except (ArtifactError, limits.LimitError):
        raise
    except (*limits.DAMAGED_ZIP, KeyError) as e:
        raise ArtifactError(f"{what}: damaged Stable-Baselines3 zip ({type(e).__name__}: "
                            f"{torchzip.first_line(e)}); re-save the model") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{what}: the zip's 'data' entry is not a JSON object; re-save the model")
    obs_space = data.get("observation_space") or {}
    if isinstance(obs_space, dict) and "Box" not in str(obs_space.get(":type:", "Box")):
        raise UnsupportedModelError(f"{what}: observation space {obs_space.get(':type:')} is not supported "
                                    "(supported: Box observations)")
    policy_kwargs = data.get("policy_kwargs") or {}
    if not isinstance(policy_kwargs, dict):
        policy_kwargs = {}
    if policy_kwargs.get("dueling"):
        raise UnsupportedModelError(f"{what}: dueling SB3 policies are not supported")
    activation = _activation(policy_kwargs, what)
    state = torchzip.load_state_dict(policy, f"{what}: policy.pth")
    extra = sorted(k for k in state if not k.startswith(("q_net.q_net.", "q_net_target.")))
    if extra:
        raise UnsupportedModelError(f"{what}: policy tensor {extra[0]!r} is outside q_net.q_net (a features extractor "
                                    "such as NatureCNN); supported: MlpPolicy (Linear layers after a flatten)")
    ops, mapping, obs_dim = linear_chain(state, "q_net.q_net", activation, what)
    hidden = [m["shape"][0] for m in mapping[:-1]]
    net_arch = policy_kwargs.get("net_arch", DEFAULT_NET_ARCH)
    if isinstance(net_arch, list) and net_arch != hidden:
        raise ArtifactError(f"{what}: policy.pth layer widths {hidden} disagree with net_arch {net_arch} in 'data': "
                            "the zip was edited or mixed from two models")
    policy_class = data.get("policy_class")
    return Source("sb3", obs_dim, ops, mapping, details={
        "sb3_version": version, "net_arch": hidden, "activation": activation,
        "policy_class": policy_class.get("__module__") if isinstance(policy_class, dict) else policy_class,
        "num_timesteps": data.get("num_timesteps"), "ignored": "q_net_target.* (the target network)"})


def _state(obj: Any) -> dict[str, Any]:
    st = getattr(obj, "state", None)
    return st if isinstance(st, dict) else {}


def vecnormalize_ops(path: Path, obs_dim: int) -> tuple[list[Op], dict[str, Any]]:
    """The observation normalization of an SB3 ``VecNormalize.save`` pickle, as ops.

    SB3 feeds ``clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)`` to the network:
    the affine part folds into the first layer and the clip becomes one ReLU layer, so the
    deployed policy takes raw observations and still clips exactly as SB3 does.
    """
    what = str(path)
    obj = torchzip.load_pickle(torchzip.read_file(path, torchzip.MAX_PICKLE_BYTES, "dqnc.importers.torchzip.MAX_PICKLE_BYTES"),
                                "vecnormalize", what)
    if not getattr(obj, "_global", "").endswith("VecNormalize"):
        raise ArtifactError(f"{what}: not a VecNormalize pickle (holds {limits.clip(repr(obj), 80)}); "
                            "pass the file VecNormalize.save wrote")
    st = _state(obj)
    if not st.get("norm_obs", True):
        raise UsageError(f"{what}: this VecNormalize did not normalize observations (norm_obs=False): drop --obs-norm")
    rms = st.get("obs_rms")
    rms_state = _state(rms)
    if not rms_state:
        raise UnsupportedModelError(f"{what}: observation statistics {rms!r} are not one RunningMeanStd "
                                    "(dict observations are not supported)")
    try:
        mean = np.asarray(rms_state["mean"], np.float64).ravel()
        var = np.asarray(rms_state["var"], np.float64).ravel()
        eps = float(st.get("epsilon", 1e-8))
        clip = float(st.get("clip_obs", 10.0))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{what}: malformed VecNormalize statistics ({e})") from None
    if mean.shape != (obs_dim,) or var.shape != (obs_dim,):
        raise ArtifactError(f"{what}: statistics for {mean.size} observation values, but the network takes {obs_dim}: "
                            "pass the VecNormalize saved with this model")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)) or eps < 0:
        raise ArtifactError(f"{what}: VecNormalize statistics are not finite / variances negative: the file is damaged")
    if not clip > 0:
        raise UsageError(f"{what}: clip_obs {clip} would map every observation to 0: refusing to fold it")
    std = np.sqrt(var + eps)
    ops: list[Op] = [ScaleShift(1.0 / std, -mean / std)]
    note: dict[str, Any] = {"kind": "VecNormalize", "file": str(path.resolve()), "epsilon": eps, "clip_obs": clip,
                            "folded": "affine into the first layer"}
    if np.isfinite(clip):
        ops.append(Clip(-clip, clip))
        note["clip"] = f"honoured: one ReLU layer of width {2 * obs_dim} clips to +-{clip:g} before the first layer"
    return ops, note
