"""Stable-Baselines3 DQN ``.zip`` files and ``VecNormalize`` statistics, read without SB3 or PyTorch.

An SB3 zip holds ``data`` (JSON: hyperparameters, spaces, ``policy_kwargs``) and ``policy.pth``
(the policy's state_dict in the PyTorch zip format). The online network is
``q_net.q_net.{0,2,4...}`` (``q_net_target`` is the target copy and is ignored); its activation
is ``policy_kwargs.activation_fn`` (default ReLU) and its widths must match ``net_arch``. A
CnnPolicy adds ``q_net.features_extractor.*`` (NatureCNN or a custom extractor, read from its
tensors by :mod:`dqnc.importers.torchconv`); QR-DQN's ``quantile_net.*`` head is folded into Q
(the mean over quantiles). The ``/255`` SB3 applies to uint8 0-255 images is read from the saved
observation space and folded into the first kernel. The ``:serialized:`` cloudpickle blobs in
``data`` (a custom extractor's class among them) are never decoded.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dqnc import limits
from dqnc.errors import ArtifactError, UsageError
from dqnc.importers import torchconv, torchzip
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


def _read_zip(path: Path, what: str) -> tuple[dict[str, Any], bytes, str | None]:
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
    return data, policy, version


def load(path: Path, cfg: Any, spec: Any = None) -> Source:
    what = str(path)
    data, policy, version = _read_zip(path, what)
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
    policy_class = data.get("policy_class")
    details = {"sb3_version": version, "activation": activation,
               "policy_class": policy_class.get("__module__") if isinstance(policy_class, dict) else policy_class,
               "num_timesteps": data.get("num_timesteps")}
    if any(k.startswith(("q_net.features_extractor.", "quantile_net.")) for k in state):
        return _conv_source(state, data, policy_kwargs, activation, details, what, spec)
    extra = sorted(k for k in state if not k.startswith(("q_net.q_net.", "q_net_target.")))
    if extra:
        raise UnsupportedModelError(f"{what}: policy tensor {extra[0]!r} is outside q_net.q_net and no features extractor "
                                    "(supported: MlpPolicy, CnnPolicy and conv features extractors, QR-DQN)")
    ops, mapping, obs_dim = linear_chain(state, "q_net.q_net", activation, what)
    hidden = [m["shape"][0] for m in mapping[:-1]]
    net_arch = policy_kwargs.get("net_arch", DEFAULT_NET_ARCH)
    if isinstance(net_arch, list) and net_arch != hidden:
        raise ArtifactError(f"{what}: policy.pth layer widths {hidden} disagree with net_arch {net_arch} in 'data': "
                            "the zip was edited or mixed from two models")
    return Source("sb3", obs_dim, ops, mapping, details=details | {
        "net_arch": hidden, "ignored": "q_net_target.* (the target network)"})


def _space_shape(space: Any) -> tuple[int, ...] | None:
    """The observation shape SB3 recorded (``_shape``; the space itself is pickled and never read)."""
    shape = space.get("_shape", space.get("shape")) if isinstance(space, dict) else None
    if isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and 0 < v <= 4096 for v in shape):
        return tuple(shape)
    return None


def _bound(space: dict[str, Any], name: str) -> set[int] | None:
    """The values of a Box bound as SB3 saved it: ``low_repr``/``high_repr`` ("0") where gymnasium
    filled them, else the numbers in numpy's printed array (``[[[0 0 0 ... 0 0 0] ...``)."""
    text = space.get(f"{name}_repr") or space.get(name)
    if not isinstance(text, str | int | float):
        return None
    values = re.findall(r"-?\d+(?:\.\d+)?", str(text)[:100_000])
    return {int(float(v)) if float(v).is_integer() else -1 for v in values} or None


def _normalized(space: Any, policy_kwargs: dict[str, Any]) -> bool:
    """SB3 divides by 255 inside the policy for a uint8 Box with bounds 0-255 (``normalize_images``)."""
    if not isinstance(space, dict) or policy_kwargs.get("normalize_images") is False:
        return False
    return "uint8" in str(space.get("dtype", "")) and _bound(space, "low") == {0} and _bound(space, "high") == {255}


def _image_chw(shape: tuple[int, ...] | None, channels: int, spec: Any, what: str) -> tuple[tuple[int, int, int], str]:
    """The CHW image the first conv reads, and how it was found."""
    if shape is not None:
        if shape[0] == channels:
            return (shape[0], shape[1], shape[2]), "the zip's observation space (channels first)"
        if shape[2] == channels:
            return (shape[2], shape[0], shape[1]), "the zip's observation space (channels last, permuted by the extractor)"
        raise UnsupportedModelError(f"{what}: the first conv reads {channels} channels but the saved observations are {shape}")
    if spec is None or not spec.is_image:
        raise UnsupportedModelError(f"{what}: the zip records no image observation shape; import it with an image env")
    from dqnc.qnet.layout import to_hwc

    h, w, c = to_hwc(tuple(spec.obs_shape), spec.obs_layout)
    return (c, h, w), "the env's observations"


def _conv_source(state: dict[str, np.ndarray], data: dict[str, Any], policy_kwargs: dict[str, Any], activation: str,
                 details: dict[str, Any], what: str, spec: Any) -> Source:
    """A CnnPolicy (NatureCNN or a custom Conv2d/ReLU/Flatten/Linear extractor) or QR-DQN policy."""
    quantile = any(k.startswith("quantile_net.") for k in state)
    online = "quantile_net." if quantile else "q_net."
    head = online + ("quantile_net." if quantile else "q_net.")
    feats = torchconv.modules(state, online + "features_extractor.", what)
    head_mods = torchconv.modules(state, head, what)
    other = sorted(k for k in state if k.startswith(online) and not k.startswith((head, online + "features_extractor.")))
    if other or not feats or not head_mods:
        raise UnsupportedModelError(f"{what}: policy tensors {other[:1] or 'under ' + online} do not form a features "
                                    f"extractor then a {head}* head (supported: {torchconv.SUPPORTED})")
    n_conv = next((i for i, m in enumerate(feats) if not m.is_conv), len(feats))
    if n_conv == 0:
        raise UnsupportedModelError(f"{what}: the features extractor has no Conv2d first (supported: {torchconv.SUPPORTED})")
    space = data.get("observation_space")
    chw, shape_from = _image_chw(_space_shape(space), int(feats[0].weight.shape[1]), spec, what)
    # SB3's CnnPolicy without a features_extractor_class is NatureCNN: its strides are SB3's, not a guess.
    nature = "features_extractor_class" not in policy_kwargs or "NatureCNN" in str(policy_kwargs["features_extractor_class"])
    strides = torchconv.nature_strides(feats[:n_conv]) if nature else None
    ops, mapping = torchconv.conv_ops(feats[:n_conv], (feats[n_conv:] + head_mods)[0], chw, what, strides=strides)
    lin_ops, lin_map = torchconv.linear_ops(feats[n_conv:], "relu", what, act_after_last=bool(feats[n_conv:]))
    head_ops, head_map = torchconv.linear_ops(head_mods, activation, what)
    ops += lin_ops + head_ops
    n_quantiles = None
    if quantile:
        action_space = data.get("action_space")
        n = action_space.get("n") if isinstance(action_space, dict) else None
        n_actions = int(n) if isinstance(n, int) else (spec.n_actions if spec is not None else 0)
        ops.append(torchconv.quantile_mean(int(head_mods[-1].weight.shape[0]), n_actions, what))
        n_quantiles = int(head_mods[-1].weight.shape[0]) // n_actions
    preprocessing = []
    if _normalized(space, policy_kwargs):
        ops.insert(0, ScaleShift(np.float32(1 / 255), np.float32(0)))
        preprocessing.append({"kind": "normalize_images", "scale": 1 / 255, "folded": "into the first conv's weights"})
    return Source("sb3-qrdqn" if quantile else "sb3", int(np.prod(chw)), ops, mapping + lin_map + head_map, preprocessing,
                  details | {"architecture": "conv", "image_shape_from": shape_from, "frame_order": "channel -1 newest",
                             "quantiles": n_quantiles, "ignored": f"{online.rstrip('.')}_target.* (the target network)"},
                  obs_shape=chw, layout="CHW")


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
