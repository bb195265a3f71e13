"""The one round loop of the server, whichever aggregation runs.

A round: sample the markets and build the train messages (``EncoderFedAvg.configure_train``),
aggregate their updates into the new global encoder (an ``Aggregation``: plain FedAvg in
``server/strategy.py``, SecAgg+ in ``server/secagg.py``), optionally take the Reptile-style outer
step (``server-lr``), evaluate the new encoder on every market, and write ``encoder.pt`` and
``metrics.json`` atomically. A resumed run continues after the last round in ``encoder.pt``.

What the server keeps: the global encoder, each round's metrics document. What it never has:
any market's heads, data or (under SecAgg+) its own update.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from storefed.server.exchange import send_and_receive
from storefed.server.strategy import EncoderFedAvg
from storefed.shared.checkpoint import check_state, load_encoder, save_encoder
from storefed.shared.config import RunConfig
from storefed.shared.data import Catalog, ReaderOptions, load_catalog
from storefed.shared.errors import CheckpointError, ConfigError
from storefed.shared.model import ModelConfig
from storefed.shared.node import initial_encoder, model_config
from storefed.shared.report import VALID_METRICS, write_metrics
from storefed.shared.wire import to_record

log = logging.getLogger("storefed")


@dataclass
class ServerRun:
    """A server run's fixed parts and its progress (shared by the plain and SecAgg+ loops)."""

    cfg: RunConfig
    catalog: Catalog
    mcfg: ModelConfig
    ckpt_path: Path
    metrics_path: Path
    strategy: EncoderFedAvg
    rounds: list[dict[str, Any]]
    start: int
    extra: dict[str, Any] = field(default_factory=dict)  # more top-level keys of metrics.json


def prepare_run(cfg: RunConfig) -> ServerRun:
    """Catalog, model shapes, the strategy with the initial (or resumed) global encoder."""
    catalog = load_catalog(cfg.dataset, cfg.data_dir or None, seed=cfg.seed,
                           options=ReaderOptions.from_run_config(cfg.to_mapping()))
    mcfg = model_config(cfg, catalog)
    out = Path(cfg.out_dir)
    ckpt_path, metrics_path = out / "encoder.pt", out / "metrics.json"
    state = initial_encoder(cfg, catalog)
    rounds: list[dict[str, Any]] = []
    start = 0
    if cfg.resume and ckpt_path.is_file():
        ck = load_encoder(ckpt_path)
        if ck.catalog_fingerprint != catalog.fingerprint() or ck.model != mcfg:
            raise CheckpointError(f"cannot resume from {ckpt_path}: it was saved for another "
                                  f"catalog or model shape ({ck.model} vs {mcfg})")
        check_state(ckpt_path, ck.state, state)
        state, start = ck.state, ck.round
        rounds = [r for r in ck.meta.get("rounds", []) if r["round"] <= start]
        log.info("resuming from %s after round %d", ckpt_path, start)
    n_markets = len(cfg.market_list)
    if cfg.secagg and n_markets and max(1, int(n_markets * cfg.fraction_train)) < 2:
        raise ConfigError(f"secagg needs at least 2 markets per round (markets = "
                          f"{cfg.markets!r}, fraction-train = {cfg.fraction_train:g}): the "
                          f"secure sum of one market is its update; set secagg = false "
                          f"(--no-secagg) to run without secure aggregation")
    min_nodes = max(cfg.min_nodes, n_markets)
    strategy = EncoderFedAvg(
        state, cfg.aggregation == "rowwise", fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0, min_train_nodes=min(min_nodes, max(1, int(
            n_markets * cfg.fraction_train)) if n_markets else min_nodes),
        min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
    return ServerRun(cfg, catalog, mcfg, ckpt_path, metrics_path, strategy, rounds, start)


def go_on_with_online_nodes(run: ServerRun) -> None:
    """After the run's first train phase, sample from the nodes that are online (at least
    ``min-nodes``) instead of waiting for every market: Flower's ``sample_nodes`` waits, without
    a timeout, until ``min_available_nodes`` are online, so one dead SuperNode would block every
    later phase forever once the SuperLink marks it offline. Round 1 still waits for all."""
    s, n_markets = run.strategy, len(run.cfg.market_list)
    floor = max(1, min(run.cfg.min_nodes, n_markets) if n_markets else run.cfg.min_nodes)
    s.min_available_nodes = min(s.min_available_nodes, floor)
    s.min_train_nodes = min(s.min_train_nodes, floor)
    s.min_evaluate_nodes = min(s.min_evaluate_nodes, floor)


def finish_round(grid: Grid, run: ServerRun, rnd: int, t0: float, t_train: float,
                 extra: dict[str, Any] | None = None,
                 eval_records: Mapping[int, Mapping[str, ConfigRecord]] | None = None,
                 on_eval: Callable[[list[Message]], Any] | None = None) -> dict[str, Any]:
    """Evaluate the new global encoder on every market, append the round (plus ``extra``
    keys) and write ``encoder.pt`` + ``metrics.json``; returns the metrics document.

    ``eval_records`` adds per-node records to the evaluate messages and ``on_eval`` sees the
    replies (SecAgg+ piggybacks the next round's share-keys stage on evaluation)."""
    cfg, strategy = run.cfg, run.strategy
    go_on_with_online_nodes(run)
    msgs = list(strategy.configure_evaluate(
        rnd, to_record(strategy.global_state),
        ConfigRecord({"server-round": rnd}), grid))
    if eval_records:
        msgs = [Message(RecordDict({**dict(m.content.items()),
                                    **eval_records.get(m.metadata.dst_node_id, {})}),
                        dst_node_id=m.metadata.dst_node_id,
                        message_type=m.metadata.message_type, group_id=m.metadata.group_id)
                for m in msgs]
    ev_replies = send_and_receive(grid, msgs, timeout=cfg.round_timeout)
    if on_eval is not None:
        on_eval(ev_replies)
    strategy.aggregate_evaluate(rnd, ev_replies)
    markets = {}
    for m, metrics in sorted(strategy.last_markets.items()):
        train = strategy.last_train.get(m, {})
        # under secure aggregation only *whether* a market's update is in the round's sum is
        # known, not its own loss or example count (those stay null)
        markets[m] = {"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"],
                      "examples": metrics["examples"], "trained": m in strategy.last_train,
                      **{f"valid_{k}": metrics.get(f"valid/{k}") for k in VALID_METRICS},
                      "loss": train.get("train-loss"),
                      "train_examples": train.get("num-examples"),
                      "categories": metrics["categories"]}
    seconds = time.perf_counter() - t0
    run.rounds.append({"round": rnd, "markets": markets, "private_markets":
                       strategy.private_markets, "seconds": seconds,
                       "train_seconds": t_train,
                       "rejected": [{"market": m, "reason": why}
                                    for r, m, why in strategy.rejected if r == rnd],
                       **(extra or {})})
    catalog = run.catalog
    save_encoder(run.ckpt_path, strategy.global_state, run.mcfg, catalog.item_ids,
                 catalog.categories, catalog.item_category.tolist(), catalog.fingerprint(),
                 rnd, meta={"rounds": run.rounds, "config": cfg.to_mapping()})
    doc = write_metrics(run.metrics_path, run.rounds,
                        extra={"config": cfg.to_mapping(), **run.extra})
    avg = doc["final"]["average"]
    log.info("round %d/%d: %d markets, avg ndcg@10 %.4f hr@10 %.4f (%.1fs)", rnd,
             cfg.num_rounds, len(markets), avg["ndcg@10"], avg["hr@10"], seconds)
    return doc


def final_doc(run: ServerRun, doc: dict[str, Any]) -> dict[str, Any]:
    """The metrics document after the loop (written once if no round ran)."""
    if doc:
        return doc
    return write_metrics(run.metrics_path, run.rounds,
                         extra={"config": run.cfg.to_mapping(), **run.extra})


@dataclass
class RoundStep:
    """What an aggregation hands the loop besides the new global encoder: extra keys of the
    round's metrics entry, per-node records to add to the evaluate messages and a callback that
    sees the evaluate replies (SecAgg+ piggybacks the next round's key exchange on them)."""

    extra: dict[str, Any] = field(default_factory=dict)
    eval_records: Mapping[int, Mapping[str, ConfigRecord]] | None = None
    on_eval: Callable[[list[Message]], Any] | None = None


class Aggregation(Protocol):
    """One way to turn a round's train messages into ``run.strategy.global_state``."""

    def train_round(self, grid: Grid, rnd: int, messages: list[Message]) -> RoundStep: ...


class PlainAggregation:
    """Plain FedAvg: every market's update in the clear, summed by ``EncoderFedAvg`` (only
    markets whose privacy policy allows it answer; the default policy refuses)."""

    def __init__(self, run: ServerRun) -> None:
        self.run = run

    def train_round(self, grid: Grid, rnd: int, messages: list[Message]) -> RoundStep:
        replies = send_and_receive(grid, messages, timeout=self.run.cfg.round_timeout)
        self.run.strategy.aggregate_train(rnd, replies)
        return RoundStep()


def reptile_step(before: dict[str, torch.Tensor], aggregated: dict[str, torch.Tensor],
                 server_lr: float) -> dict[str, torch.Tensor]:
    """Reptile's outer update over the source markets' round: ``before + server_lr *
    (aggregated - before)``, where ``aggregated`` is the aggregation's result (the mean of the
    markets' locally adapted encoders). ``server_lr = 1`` is the aggregation itself."""
    return {k: (b.double() + server_lr * (aggregated[k].double() - b.double())).to(b.dtype)
            for k, b in before.items()}


def run_rounds(grid: Grid, cfg: RunConfig,
               aggregation: Callable[[ServerRun], Aggregation]) -> dict[str, Any]:
    """Run (or resume) ``cfg.num_rounds`` rounds with the aggregation ``aggregation(run)``
    builds; write ``encoder.pt`` and ``metrics.json`` under ``cfg.out_dir`` after every round
    (atomically). Returns the metrics document."""
    run = prepare_run(cfg)
    agg = aggregation(run)
    strategy = run.strategy
    doc: dict[str, Any] = {}
    for rnd in range(run.start + 1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(rnd, to_record(strategy.global_state),
                                                 ConfigRecord({"server-round": rnd}), grid))
        before = strategy.global_state
        step = agg.train_round(grid, rnd, messages)
        if cfg.server_lr != 1.0 and strategy.global_state is not before:
            strategy.global_state = reptile_step(before, strategy.global_state, cfg.server_lr)
        doc = finish_round(grid, run, rnd, t0, time.perf_counter() - t0, extra=step.extra,
                           eval_records=step.eval_records, on_eval=step.on_eval)
    return final_doc(run, doc)
