"""storefed ServerApp: federated rounds over the shared encoder (thin: config -> shared/)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.exchange import send_and_receive
from server.strategy import EncoderFedAvg
from shared.checkpoint import check_state, load_encoder, save_encoder
from shared.config import RunConfig
from shared.data import Catalog, load_catalog
from shared.errors import CheckpointError, ConfigError
from shared.model import ModelConfig
from shared.node import initial_encoder, model_config
from shared.report import write_metrics
from shared.transfer import reptile_step
from shared.wire import to_record

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
    catalog = load_catalog(cfg.dataset, cfg.data_dir or None, seed=cfg.seed)
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


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) ``cfg.num_rounds`` rounds; write ``encoder.pt`` and ``metrics.json``
    under ``cfg.out_dir`` after every round (atomically). Returns the metrics document."""
    run = prepare_run(cfg)
    strategy = run.strategy
    doc: dict[str, Any] = {}
    for rnd in range(run.start + 1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        train_cfg = ConfigRecord({"server-round": rnd})
        replies = send_and_receive(
            grid, strategy.configure_train(rnd, to_record(strategy.global_state), train_cfg,
                                     grid),
            timeout=cfg.round_timeout)
        before = strategy.global_state
        strategy.aggregate_train(rnd, replies)
        if cfg.server_lr != 1.0:  # Reptile-style outer step (shared/transfer.py)
            strategy.global_state = reptile_step(before, strategy.global_state, cfg.server_lr)
        doc = finish_round(grid, run, rnd, t0, time.perf_counter() - t0)
    return final_doc(run, doc)


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's run config with ``overrides`` on top."""
    app = ServerApp()
    fixed = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **fixed})
        if cfg.secagg:
            from server.secagg import run_server_secagg  # noqa: PLC0415 - optional path

            run_server_secagg(grid, context, cfg)
        else:
            run_server(grid, cfg)

    return app


app = make_app()
