"""One market's node as the ClientApp opens it: its settings (node config over run config), its
privacy policy, its private heads, and the plain FedAvg train step. Both ``client_app.py`` and
``client/secagg.py`` use it; it imports neither.

What stays here: the heads (``context.state[PRIVATE_KEY]`` and ``<state-dir>/<market>/``).
What travels: only what ``train_reply`` returns (the update and training metrics; under SecAgg+
``client/secagg.py`` sends a masked vector instead).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from storefed.shared.config import RunConfig
from storefed.shared.data import available_markets
from storefed.shared.errors import ConfigError
from storefed.shared.node import MarketNode
from storefed.shared.policy import PolicyRefusedError, PrivacyPolicy, load_policy
from storefed.shared.wire import state_from_record, to_record

log = logging.getLogger("storefed")
PRIVATE_KEY = "private"
MetricDict = dict[str, int | float | list[int] | list[float]]


def node_settings(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[RunConfig, str, Path]:
    """This node's market, config (node-level ``device`` wins) and private state directory.

    Deployment: ``--node-config "market='de' data-dir='...' state-dir='...' device='cuda'"``.
    Simulation: the market is ``markets[partition-id]``.
    """
    node = dict(node_config)
    changes: dict[str, Any] = {}
    for key in ("data-dir", "device", "dataset"):
        if key in node:
            changes[key.replace("-", "_")] = str(node[key])
    if changes:
        cfg = RunConfig.from_mapping({**cfg.to_mapping(), **{k.replace("_", "-"): v
                                                            for k, v in changes.items()}},
                                     source="node config")
    if "market" in node:
        market = str(node["market"])
    elif "partition-id" in node:
        markets = cfg.market_list or available_markets(cfg.dataset, cfg.data_dir or None)
        pid = int(node["partition-id"])
        if pid >= len(markets):
            raise ConfigError(f"node config partition-id {pid} but only {len(markets)} markets "
                              f"({', '.join(markets)}): set run-config key 'markets'")
        market = markets[pid]
    else:
        raise ConfigError("node config has no 'market' (and no partition-id with run-config "
                          "'markets' set): start the SuperNode with --node-config \"market='..'\"")
    state_dir = Path(str(node.get("state-dir") or cfg.state_dir or Path(cfg.out_dir) / "state"))
    return cfg, market, state_dir


def market_policy(context: Context,
                  fixed: Mapping[str, Any]) -> tuple[RunConfig, str, PrivacyPolicy, Path]:
    """The run config, the market, its own privacy policy (``shared/policy.py``: from the node
    config or the market's state directory, never from the run config or the server) and its
    state directory.
    A run config its policy forbids (``secagg = false`` for a secure-aggregation-only market)
    is refused here, before anything is trained or sent."""
    cfg = RunConfig.from_mapping({**dict(context.run_config), **fixed})
    _, market, state_dir = node_settings(cfg, context.node_config)
    policy = load_policy(context.node_config, state_dir / market)
    if policy.secure_aggregation_only and not cfg.secagg:
        log.warning("market %s refuses the run: its config has secagg = false and its privacy "
                    "policy is secure-aggregation-only", market)
        raise PolicyRefusedError(f"market {market}: run config secagg = false, policy is "
                                 f"secure-aggregation-only")
    return cfg, market, policy, state_dir / market


def open_node(msg: Message, context: Context,
              fixed: Mapping[str, Any]) -> tuple[MarketNode, dict[str, torch.Tensor]]:
    """The market's node with its private heads (from the context Flower keeps, else from its
    state directory, else fresh) and the global encoder the message carries."""
    cfg = RunConfig.from_mapping({**dict(context.run_config), **fixed})
    cfg, market, state_dir = node_settings(cfg, context.node_config)
    node = MarketNode(cfg, market, state_dir)
    private = (context.state.array_records[PRIVATE_KEY].to_torch_state_dict()
               if PRIVATE_KEY in context.state.array_records else None)
    source = node.restore(private)
    if source == "disk":  # a restarted node, or a new market prepared by `storefed join`
        log.info("market %s: heads restored from %s (saved after round %d)", market,
                 node.state_path, node.rounds_done)
    elif source == "fresh":
        log.debug("market %s: fresh heads (no %s yet)", market, node.state_path)
    return node, state_from_record(msg.content.array_records["arrays"])


def train_reply(msg: Message, context: Context, fixed: Mapping[str, Any]) -> Message:
    """A plain FedAvg train message: refused under a secure-aggregation-only policy, else one
    round of local training; the reply holds the update and training metrics."""
    _, _, policy, _ = market_policy(context, fixed)
    if policy.secure_aggregation_only:
        log.warning("refusing a plain train message: this market's privacy policy sends "
                    "updates only under secure aggregation (secure-aggregation-only)")
        raise PolicyRefusedError("plain train message refused: the market's policy is "
                                 "secure-aggregation-only")
    node, global_encoder = open_node(msg, context, fixed)
    rnd = int(cast(int, msg.content.config_records["config"]["server-round"]))
    update, metrics = node.train_round(global_encoder, rnd)
    context.state[PRIVATE_KEY] = ArrayRecord(torch_state_dict=node.private())
    node.persist(rnd)
    return Message(RecordDict({"arrays": to_record(update),
                               "metrics": MetricRecord(cast(MetricDict, metrics)),
                               "info": ConfigRecord({"market": node.market})}),
                   reply_to=msg)
