"""Runs of the storefed model *without* Flower, for the benchmark's reference points.

All of them reuse ``shared.node.MarketNode`` (same data, model, initialisation, optimiser and
per-round seeds as a federated client), so the only difference to ``storefed simulate`` is what
is shared and how:

* ``run_local(cfg)``: every market trains alone for the same ``num_rounds x local_epochs``
  (its encoder never leaves it);
* ``run_central(cfg)``: all markets' data pooled in one process: one encoder, each market's
  private heads, and batches of all markets interleaved under one optimiser for
  ``num_rounds x local_epochs`` epochs (the quality ceiling of the model family, not private);
* ``run_inprocess(cfg)``: the federated round loop itself in one process (encoder-only updates
  in the ``shared.wire`` format, summed and applied exactly like the server): the same local
  training as a Flower run, without Flower, which is what the overhead figure compares to;
  ``share_heads=True`` averages the whole model (heads too) with plain FedAvg weights, which
  is the benchmark's ``fedavg-full``.

Each returns ``{"markets": {m: summary}, "average": {...}, "seconds": s, "rounds": r,
"seconds_per_round": s / r, "bytes_per_client_round": b, "train_examples": n,
"train_seconds": t}`` (``run_inprocess`` adds ``round_seconds``) where ``summary`` is
``shared.metrics.summarize``'s dict (test split).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from storefed.shared.config import RunConfig
from storefed.shared.model import encoder_state, load_parts
from storefed.shared.node import MarketNode, initial_encoder, train_settings
from storefed.shared.train import train_joint
from storefed.shared.wire import apply_summed_update, make_update, sum_updates


def make_nodes(cfg: RunConfig) -> list[MarketNode]:
    """One in-memory node per market of ``cfg`` (no state directory)."""
    if not cfg.market_list:
        raise ValueError("cfg.markets is empty: resolve the markets first")
    return [MarketNode(cfg, m, None) for m in cfg.market_list]


def _doc(nodes: list[MarketNode], seconds: float, rounds: int, bytes_per_round: float,
         examples: int, train_seconds: float, which: str = "test") -> dict[str, Any]:
    markets = {n.market: n.evaluate(None, which) for n in nodes}
    k = max(len(markets), 1)
    nd = [float(v["ndcg@10"]) for v in markets.values()]  # type: ignore[arg-type]
    hr = [float(v["hr@10"]) for v in markets.values()]  # type: ignore[arg-type]
    return {
        "markets": markets,
        "average": {"ndcg@10": sum(nd) / k, "hr@10": sum(hr) / k},
        "seconds": seconds, "rounds": rounds, "seconds_per_round": seconds / max(rounds, 1),
        "bytes_per_client_round": bytes_per_round, "train_examples": examples,
        "train_seconds": train_seconds,
    }


def run_local(cfg: RunConfig, which: str = "test") -> dict[str, Any]:
    """Each market alone: ``num_rounds`` rounds of ``local_epochs`` on its own encoder."""
    t0 = time.perf_counter()
    nodes = make_nodes(cfg)
    examples, train_s = 0, 0.0
    for node in nodes:
        own = initial_encoder(cfg, node.catalog)
        for rnd in range(1, cfg.num_rounds + 1):
            _, metrics = node.train_round(own, rnd)
            own = encoder_state(node.model)
            examples += int(metrics["num-examples"]) * cfg.local_epochs
            train_s += float(metrics["train-seconds"])
    return _doc(nodes, time.perf_counter() - t0, cfg.num_rounds, 0.0, examples, train_s, which)


def run_central(cfg: RunConfig, which: str = "test") -> dict[str, Any]:
    """All markets pooled in one process: one shared encoder, per-market heads, interleaved
    batches, ``num_rounds x local_epochs`` epochs over the pooled data."""
    t0 = time.perf_counter()
    nodes = make_nodes(cfg)
    shared_encoder = nodes[0].model.encoder
    for node in nodes[1:]:
        node.model.encoder = shared_encoder  # one encoder object: pooled training
    settings = train_settings(cfg, cfg.seed * 1000 + 1)
    settings = type(settings)(**{**settings.__dict__,
                                 "epochs": cfg.local_epochs * cfg.num_rounds})
    result = train_joint([n.model for n in nodes],
                         [(n.split.train_users, n.split.train_items, n.split.train_histories,
                           n.split.items) for n in nodes], settings, nodes[0].device)
    return _doc(nodes, time.perf_counter() - t0, cfg.num_rounds, 0.0, result.examples,
                result.seconds, which)


def run_inprocess(cfg: RunConfig, share_heads: bool = False, evaluate_every_round: bool = True,
                  which: str = "test") -> dict[str, Any]:
    """The federated round loop without Flower (see module doc). With
    ``evaluate_every_round`` every market is evaluated after each round, as a Flower run does."""
    t0 = time.perf_counter()
    nodes = make_nodes(cfg)
    catalog = nodes[0].catalog
    glob = initial_encoder(cfg, catalog)
    if share_heads:
        glob = _initial_full_state(nodes, glob)
    examples, train_s, sent = 0, 0.0, 0.0
    round_seconds = []
    for rnd in range(1, cfg.num_rounds + 1):
        t_round = time.perf_counter()
        updates = []
        for node in nodes:
            if share_heads:
                update, metrics = _train_full(node, glob, rnd)
            else:
                update, metrics = node.train_round(glob, rnd)
            updates.append(update)
            sent += sum(int(np.asarray(v).nbytes) for v in update.values())
            examples += int(metrics["num-examples"]) * cfg.local_epochs
            train_s += float(metrics["train-seconds"])
        glob = apply_summed_update(glob, sum_updates(updates))
        if evaluate_every_round or rnd == cfg.num_rounds:
            for node in nodes:
                _load(node, glob, share_heads)
                node.evaluate(None, which)
        round_seconds.append(time.perf_counter() - t_round)
    for node in nodes:
        _load(node, glob, share_heads)
    doc = _doc(nodes, time.perf_counter() - t0, cfg.num_rounds,
               sent / max(len(nodes) * cfg.num_rounds, 1), examples, train_s, which)
    doc["round_seconds"] = round_seconds
    return doc


# --------------------------------------------------------------------- whole-model FedAvg
def _initial_full_state(nodes: list[MarketNode],
                        encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Round-0 global model for fedavg-full: the shared initial encoder plus heads whose item
    bias is the example-weighted mean of the markets' popularity initialisations."""
    heads = nodes[0].private()
    weights = np.asarray([n.split.n_train for n in nodes], dtype=np.float64)
    bias = torch.zeros_like(heads["heads.item_bias"], dtype=torch.float64)
    for w, n in zip(weights, nodes, strict=True):
        bias += float(w) * n.private()["heads.item_bias"].double()
    heads["heads.item_bias"] = (bias / max(float(weights.sum()), 1.0)).float()
    return {**encoder, **heads}


def _load(node: MarketNode, state: dict[str, torch.Tensor], full: bool) -> None:
    if full:
        load_parts(node.model, encoder={k: v for k, v in state.items()
                                        if k.startswith("encoder.")},
                   private={k: v for k, v in state.items() if not k.startswith("encoder.")})
    else:
        load_parts(node.model, encoder=state)


def _train_full(node: MarketNode, glob: dict[str, torch.Tensor],
                rnd: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One fedavg-full client round: load the whole global model, train, send the delta of
    every tensor weighted by the number of examples (plain FedAvg)."""
    _load(node, glob, True)
    enc = {k: v for k, v in glob.items() if k.startswith("encoder.")}
    _, metrics = node.train_round(enc, rnd)
    local = {**encoder_state(node.model), **node.private()}
    return make_update(local, glob, node.split.n_train, None), metrics
