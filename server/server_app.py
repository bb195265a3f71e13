"""storefed ServerApp: federated rounds over the shared encoder (thin: config -> shared/)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from server.strategy import EncoderFedAvg
from shared.checkpoint import load_encoder, save_encoder
from shared.config import RunConfig
from shared.data import load_catalog
from shared.errors import CheckpointError
from shared.node import initial_encoder, model_config
from shared.report import write_metrics

log = logging.getLogger("storefed")


def run_server(grid: Grid, cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) ``cfg.num_rounds`` rounds; write ``encoder.pt`` and ``metrics.json``
    under ``cfg.out_dir`` after every round (atomically). Returns the metrics document."""
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
        state, start = ck.state, ck.round
        rounds = [r for r in ck.meta.get("rounds", []) if r["round"] <= start]
        log.info("resuming from %s after round %d", ckpt_path, start)
    n_markets = len(cfg.market_list)
    min_nodes = max(cfg.min_nodes, n_markets)
    strategy = EncoderFedAvg(
        state, cfg.aggregation == "rowwise", fraction_train=cfg.fraction_train,
        fraction_evaluate=1.0, min_train_nodes=min(min_nodes, max(1, int(
            n_markets * cfg.fraction_train)) if n_markets else min_nodes),
        min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
    doc: dict[str, Any] = {}
    for rnd in range(start + 1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        train_cfg = ConfigRecord({"server-round": rnd})
        replies = grid.send_and_receive(
            strategy.configure_train(rnd, ArrayRecord(torch_state_dict=strategy.global_state),
                                     train_cfg, grid), timeout=cfg.round_timeout)
        strategy.aggregate_train(rnd, replies)
        t_train = time.perf_counter() - t0
        ev_replies = grid.send_and_receive(
            strategy.configure_evaluate(rnd, ArrayRecord(torch_state_dict=strategy.global_state),
                                        ConfigRecord({"server-round": rnd}), grid),
            timeout=cfg.round_timeout)
        strategy.aggregate_evaluate(rnd, ev_replies)
        markets = {}
        for m, metrics in sorted(strategy.last_markets.items()):
            train = strategy.last_train.get(m, {})
            markets[m] = {"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"],
                          "examples": metrics["examples"], "loss": train.get("train-loss"),
                          "train_examples": train.get("num-examples"),
                          "categories": metrics["categories"]}
        seconds = time.perf_counter() - t0
        rounds.append({"round": rnd, "markets": markets, "seconds": seconds,
                       "train_seconds": t_train,
                       "rejected": [{"market": m, "reason": why}
                                    for r, m, why in strategy.rejected if r == rnd]})
        save_encoder(ckpt_path, strategy.global_state, mcfg, catalog.item_ids,
                     catalog.categories, catalog.item_category.tolist(), catalog.fingerprint(),
                     rnd, meta={"rounds": rounds, "config": cfg.to_mapping()})
        doc = write_metrics(metrics_path, rounds, extra={"config": cfg.to_mapping()})
        avg = doc["final"]["average"]
        log.info("round %d/%d: %d markets, avg ndcg@10 %.4f hr@10 %.4f (%.1fs)", rnd,
                 cfg.num_rounds, len(markets), avg["ndcg@10"], avg["hr@10"], seconds)
    if not doc:
        doc = write_metrics(metrics_path, rounds, extra={"config": cfg.to_mapping()})
    return doc


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
