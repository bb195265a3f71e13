"""Flower FedAvg, specialised: aggregate only the encoder, from weighted-delta sums, and keep
per-market evaluation metrics.

Flower's ``FedAvg`` does node sampling, message construction and error logging. Two things
change: (1) ``aggregate_train`` sums the wire-format updates of ``shared.wire`` (row-wise item
weights need sums of weights, not one scalar per client) after rejecting any reply whose keys,
shapes or values are invalid (NaN/Inf, negative weights), and (2) ``aggregate_evaluate`` keeps
each market's metrics (including per-category ones, whose keys differ between markets).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from storefed.shared.report import unflatten_eval
from storefed.shared.wire import (
    apply_summed_update,
    expected_update_shapes,
    from_record,
    sum_updates,
)

log = logging.getLogger("storefed")


def check_update(update: dict[str, np.ndarray],
                 shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why an update must be rejected, or None if it is valid."""
    if set(update) != set(shapes):
        missing, extra = sorted(set(shapes) - set(update)), sorted(set(update) - set(shapes))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, shape in shapes.items():
        arr = update[k]
        if tuple(arr.shape) != shape:
            return f"wrong shape for {k}: {tuple(arr.shape)} != {shape}"
        if not np.all(np.isfinite(arr)):
            return f"non-finite values in {k}"
        if k.startswith("weight/") and np.any(arr < 0):
            return f"negative weights in {k}"
    return None


class EncoderFedAvg(FedAvg):
    """FedAvg over the shared encoder only, as sums of weighted deltas (see module doc)."""

    def __init__(self, global_state: dict[str, torch.Tensor], rowwise: bool,
                 **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.global_state = global_state
        self.rowwise = rowwise
        self.rejected: list[tuple[int, str, str]] = []  # (round, market, reason)
        self.last_markets: dict[str, dict[str, Any]] = {}
        self.last_train: dict[str, dict[str, float]] = {}
        self.private_markets = 0  # evaluated markets whose policy keeps their figures

    # With fraction 1 every node online now takes part. Flower's FedAvg counts the online
    # nodes, then lists them again to sample that many: a node connecting in between (a market
    # joining a running deployment) makes it leave a random *other* node out of the round.
    # Here the nodes are listed once.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train < 1.0:
            return super().configure_train(server_round, arrays, config, grid)
        return self._to_all_online(server_round, arrays, config, grid, self.min_train_nodes,
                                   MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate < 1.0:
            return super().configure_evaluate(server_round, arrays, config, grid)
        return self._to_all_online(server_round, arrays, config, grid,
                                   self.min_evaluate_nodes, MessageType.EVALUATE)

    def _to_all_online(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       grid: Grid, min_nodes: int, message_type: str) -> Iterable[Message]:
        # Flower's wait-then-list, sampling none: its second value is the one listing
        _, nodes = sample_nodes(grid, max(self.min_available_nodes, min_nodes), 0)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, nodes, message_type)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        shapes = expected_update_shapes(self.global_state, self.rowwise)
        accepted: list[dict[str, np.ndarray]] = []
        self.last_train = {}
        for msg in valid:
            market = _market(msg)
            try:
                update = from_record(msg.content.array_records["arrays"])
                metrics = dict(msg.content.metric_records["metrics"])
            except (KeyError, TypeError, ValueError) as exc:
                self._reject(server_round, market, f"malformed reply: {exc}")
                continue
            reason = check_update(update, shapes)
            if reason is not None:
                self._reject(server_round, market, reason)
                continue
            accepted.append(update)
            self.last_train[market] = {k: float(v) for k, v in metrics.items()
                                       if isinstance(v, int | float)}
        if not accepted:
            log.warning("round %d: no valid encoder update; global encoder unchanged",
                        server_round)
            return None, None
        new_state = apply_summed_update(self.global_state, sum_updates(accepted))
        overflow = [k for k, v in new_state.items() if not bool(torch.isfinite(v).all())]
        if overflow:  # each update was finite, but their average overflows float32
            log.warning("round %d: aggregate has non-finite values in %s; global encoder "
                        "unchanged", server_round, overflow[0])
            return None, None
        self.global_state = new_state
        total = sum(m.get("num-examples", 0.0) for m in self.last_train.values())
        loss = sum(m.get("train-loss", 0.0) * m.get("num-examples", 0.0)
                   for m in self.last_train.values()) / max(total, 1.0)
        return (ArrayRecord(torch_state_dict=self.global_state),
                MetricRecord({"train-loss": loss, "num-examples": total,
                              "clients": float(len(accepted))}))

    def _reject(self, server_round: int, market: str, reason: str) -> None:
        self.rejected.append((server_round, market, reason))
        log.warning("round %d: excluded update from market %s: %s", server_round, market,
                    reason)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        valid, _ = self._check_and_log_replies(replies, is_train=False, validate=False)
        self.last_markets = {}
        self.private_markets = 0
        for msg in valid:
            if "metrics" not in msg.content:  # the market's policy keeps its evaluation
                self.private_markets += 1
                continue
            try:
                flat = {k: float(cast(float, v))
                        for k, v in msg.content.metric_records["metrics"].items()}
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("round %d: malformed evaluation reply from %s: %s", server_round,
                            _market(msg), exc)
                continue
            self.last_markets[_market(msg)] = unflatten_eval(flat)
        if not self.last_markets:
            return None
        n = len(self.last_markets)
        return MetricRecord({
            "ndcg@10": sum(m["ndcg@10"] for m in self.last_markets.values()) / n,
            "hr@10": sum(m["hr@10"] for m in self.last_markets.values()) / n,
            "markets": float(n)})


def _market(msg: Message) -> str:
    try:
        return str(msg.content["info"]["market"])
    except (KeyError, TypeError):
        return f"node-{msg.metadata.src_node_id}"
