import tomllib
from pathlib import Path

import pytest

from storefed.shared.config import RunConfig
from storefed.shared.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_config_equals_dataclass_defaults():
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    toml_cfg = doc["tool"]["flwr"]["app"]["config"]
    assert sorted(toml_cfg) == sorted(RunConfig.keys())
    assert RunConfig.from_mapping(toml_cfg, source="pyproject.toml") == RunConfig()


def test_unknown_key_is_rejected_with_its_name_and_a_hint():
    with pytest.raises(ConfigError, match="num_rounds.*did you mean 'num-rounds'"):
        RunConfig.from_mapping({"num_rounds": 3})
    with pytest.raises(ConfigError, match="'lrr'"):
        RunConfig.from_mapping({"lrr": 0.1})


@pytest.mark.parametrize("key,value", [("num-rounds", "3"), ("num-rounds", 2.5),
                                       ("lr", "fast"), ("secagg", 1), ("num-rounds", True),
                                       ("dataset", 3)])
def test_wrong_type_is_rejected(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        RunConfig.from_mapping({key: value})


def test_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="loss"):
        RunConfig.from_mapping({"loss": "mse"})
    with pytest.raises(ConfigError, match="num-rounds"):
        RunConfig.from_mapping({"num-rounds": 0})


def test_round_trip_and_frozen():
    cfg = RunConfig.from_mapping({"lr": 1, "markets": "a, b", "secagg": True})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.market_list == ["a", "b"]
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(AttributeError):
        cfg.lr = 2.0  # type: ignore[misc]
