"""CLI conventions: --run-config (pairs, TOML file, --config alias), a corrupted checkpoint's
error without torch's unsafe advice."""

from __future__ import annotations

import io
import os

import pytest
import torch

from storefed.shared.checkpoint import read_checkpoint
from storefed.shared.config import RunConfig, parse_overrides
from storefed.shared.errors import CheckpointError, ConfigError


def test_run_config_pairs_file_and_alias(tmp_path):
    f = tmp_path / "o.toml"
    f.write_text('lr = 0.01\nmarkets = "m0,m1"\n')
    values = parse_overrides(["num-rounds=3 secagg=false", str(f), "lr=0.02"])
    assert values == {"num-rounds": 3, "secagg": False, "lr": 0.02, "markets": "m0,m1"}
    assert RunConfig.from_mapping(values).lr == 0.02
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["lr"])
    with pytest.raises(ConfigError, match="no such file"):
        parse_overrides([str(tmp_path / "missing.toml")])
    (tmp_path / "t.toml").write_text("[tool]\nx = 1\n")
    with pytest.raises(ConfigError, match="flat"):
        parse_overrides([str(tmp_path / "t.toml")])


def test_simulate_accepts_run_config_and_config_alias():
    import argparse

    from storefed.simulations.simulate import add_run_options

    p = argparse.ArgumentParser()
    add_run_options(p)
    args = p.parse_args(["--run-config", "lr=0.1", "--config", "seed=3"])
    assert parse_overrides(args.config) == {"lr": 0.1, "seed": 3}


def test_corrupted_checkpoint_error_has_no_unsafe_advice(tmp_path):
    buf = io.BytesIO()
    torch.save({"f": os.getcwd}, buf)  # a global that weights_only refuses
    bad = tmp_path / "encoder.pt"
    bad.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as exc:
        read_checkpoint(bad, "encoder")
    msg = str(exc.value)
    assert "corrupted or not a storefed checkpoint" in msg
    assert "weights_only" not in msg and "arbitrary code" not in msg
