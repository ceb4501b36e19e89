from __future__ import annotations

import pytest

from dqnc.config import ENV_DEFAULTS, TrainConfig, build_train_config, load_yaml_mapping
from dqnc.errors import ConfigError


def test_env_defaults_apply_and_flags_override_file():
    cfg = build_train_config("Acrobot-v1", {"lr": 0.5, "seed": 4}, {"lr": 0.01, "seed": None})
    assert cfg.total_steps == ENV_DEFAULTS["Acrobot-v1"]["total_steps"]
    assert cfg.lr == 0.01  # flag beats file
    assert cfg.seed == 4  # unset flag leaves the file's value


def test_env_can_come_from_the_file():
    assert build_train_config(None, {"env": "CartPole-v1"}, {}).env == "CartPole-v1"


def test_missing_env_is_a_clear_error():
    with pytest.raises(ConfigError, match="--env"):
        build_train_config(None, {}, {})


def test_unknown_key_suggests_the_nearest_one():
    with pytest.raises(ConfigError, match=r"unknown key 'gama'.*did you mean 'gamma'"):
        build_train_config("CartPole-v1", {"gama": 0.9}, {})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [("gamma", 1.5, "gamma"), ("total_steps", -1, "total_steps"), ("hidden", [], "hidden"),
     ("hidden", [0, 4], "hidden"), ("lr", "fast", "lr"), ("activation", "sigmoid", "activation")],
)
def test_out_of_range_and_wrong_type_values_are_rejected(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("_", "[-_]")):
        build_train_config("CartPole-v1", {key: value}, {})


def test_configs_are_frozen():
    cfg = TrainConfig(env="CartPole-v1")
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("env: CartPole-v1\nlr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: YAML syntax error"):
        load_yaml_mapping(p)


@pytest.mark.parametrize(("text", "fragment"), [("", "empty"), ("- 1\n- 2\n", "mapping")])
def test_yaml_must_hold_a_mapping(tmp_path, text, fragment):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_yaml_mapping(p)


def test_yaml_loading_is_safe(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("env: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_yaml_mapping(p)
