"""What one market does in a round, independent of Flower: train on its own data, produce an
encoder update, evaluate, and keep its private state (heads) in memory and on disk.

The client app wraps this in Flower messages; the benchmark's non-Flower baseline calls it
directly, so "federated" and "local" runs execute the same training code.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from storefed.shared import data, itemsim
from storefed.shared.checkpoint import load_private, save_private
from storefed.shared.config import RunConfig
from storefed.shared.data import Catalog, MarketSplit, ReaderOptions, load_market
from storefed.shared.itemsim import KNN_WEIGHT_GRID, ItemSimilarity, calibrate_weight
from storefed.shared.model import (
    MarketModel,
    ModelConfig,
    encoder_state,
    load_parts,
    private_state,
)
from storefed.shared.mtl import (
    SingleTaskModel,
    category_histories,
    center_item_bias,
    single_task_update,
    train_single_task,
)
from storefed.shared.train import (
    TrainSettings,
    evaluate,
    resolve_device,
    score_candidates,
    summarize_scores,
    train_local,
)
from storefed.shared.wire import make_update

log = logging.getLogger("storefed")


def model_config(cfg: RunConfig, catalog: Catalog) -> ModelConfig:
    """Model shapes for a run over ``catalog``."""
    return ModelConfig(n_items=catalog.n_items, n_categories=len(catalog.categories),
                       dim=cfg.embedding_dim,
                       n_experts=cfg.num_experts if cfg.mtl == "mmoe" else 1,
                       history_layers=cfg.history_layers)


def build_model(cfg: RunConfig, catalog: Catalog) -> MarketModel:
    """A freshly initialised model; the same seed gives the same initial encoder everywhere."""
    torch.manual_seed(cfg.seed)
    if cfg.mtl == "single-task":  # one independent model per category (shared/mtl.py)
        return SingleTaskModel(model_config(cfg, catalog),
                               torch.as_tensor(catalog.item_category))
    return MarketModel(model_config(cfg, catalog), torch.as_tensor(catalog.item_category))


def initial_encoder(cfg: RunConfig, catalog: Catalog) -> dict[str, torch.Tensor]:
    """The round-0 global encoder the server starts from."""
    return encoder_state(build_model(cfg, catalog))


def item_counts(split: MarketSplit, n_items: int) -> np.ndarray:
    """(n_items + 1,) training interactions per item row in this market (pad row: 0)."""
    return np.bincount(split.train_items, minlength=n_items + 1).astype(np.float32)


def init_heads_from_data(model: MarketModel, split: MarketSplit) -> None:
    """Fresh heads start with the market's log-popularity as item bias (no training needed)."""
    counts = torch.from_numpy(item_counts(split, model.cfg.n_items))
    bias = torch.log1p(counts)
    bias = bias - bias[torch.as_tensor(split.items)].mean()
    with torch.no_grad():
        model.heads.item_bias.copy_(bias)


def train_settings(cfg: RunConfig, seed: int) -> TrainSettings:
    return TrainSettings(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                         encoder_lr_scale=cfg.encoder_lr_scale, weight_decay=cfg.weight_decay,
                         negatives=cfg.train_negatives, loss=cfg.loss,
                         proximal_mu=cfg.proximal_mu, seed=seed, history=cfg.train_history,
                         history_dropout=cfg.history_dropout)


class KnnScores:
    """The market's item-kNN scores of its valid and test candidates (U x C, CPU). They are a
    fixed function of the market's own data, so they are computed once per split and reused at
    every evaluation (the neural part is what changes between rounds)."""

    def __init__(self, sim: torch.nn.Module, split: MarketSplit, device: torch.device) -> None:
        self.sim, self.split, self.device = sim, split, device
        self._scores: dict[str, torch.Tensor] = {}

    def get(self, which: str, batch_size: int = 1024) -> torch.Tensor:
        if which not in self._scores:
            ev = self.split.eval_set(which)
            parts = [self.sim.scores(  # type: ignore[operator]
                torch.as_tensor(ev.histories[s:s + batch_size], device=self.device),
                torch.as_tensor(ev.candidates[s:s + batch_size], device=self.device)).cpu()
                for s in range(0, len(ev.candidates), batch_size)]
            self._scores[which] = (torch.cat(parts) if parts
                                   else torch.zeros(0, ev.candidates.shape[1]))
        return self._scores[which]


@functools.lru_cache(maxsize=64)
def _cached_knn_scores(sim: torch.nn.Module, split: MarketSplit,
                       device: torch.device) -> KnnScores:
    return KnnScores(sim, split, device)


def clear_caches() -> None:
    """Forget the data, item-kNN and kNN scores memoised in this process (a cold start)."""
    data.clear_caches(data, itemsim, sys.modules[__name__])


def neural_scores(model: MarketModel, histories: np.ndarray, candidates: np.ndarray,
                  device: torch.device) -> torch.Tensor:
    """``score_candidates`` without the item-kNN term (U x C, CPU)."""
    sim, model.item_sim = model.item_sim, None
    try:
        return score_candidates(model, histories, candidates, device)
    finally:
        model.item_sim = sim


def calibrate_knn(model: MarketModel, split: MarketSplit, device: torch.device,
                  knn: KnnScores | None = None,
                  grid: tuple[float, ...] = KNN_WEIGHT_GRID) -> float:
    """Pick ``model``'s item-kNN mixing weight (``heads.knn_weight``, one value for every
    category) from ``grid`` on ``split``'s validation set for the model as it is now; returns
    it. A model without an attached ``item_sim`` is left alone (returns 0). ``knn``: cached kNN
    scores."""
    if model.item_sim is None:
        return 0.0
    knn = knn or KnnScores(model.item_sim, split, device)
    ev = split.valid
    weight = calibrate_weight(neural_scores(model, ev.histories, ev.candidates, device),
                              knn.get("valid"), grid)
    with torch.no_grad():
        model.heads.knn_weight.fill_(weight)
    return weight


def split_scores(model: MarketModel, split: MarketSplit, which: str, device: torch.device,
                 knn: KnnScores | None = None) -> torch.Tensor:
    """The model's U x C scores of the market's valid or test candidates (CPU); with an
    item-kNN attached, its weighted term comes from ``knn`` (cached) instead of being
    recomputed: the scores ``score_candidates`` gives, with less work."""
    ev = split.eval_set(which)
    if model.item_sim is None:
        return score_candidates(model, ev.histories, ev.candidates, device)
    knn = knn or KnnScores(model.item_sim, split, device)
    cats = model.item_category.cpu()[torch.as_tensor(ev.candidates)]
    weight = model.heads.knn_weight.detach().cpu()[cats]
    return neural_scores(model, ev.histories, ev.candidates, device) + weight * knn.get(which)


def evaluate_split(model: MarketModel, split: MarketSplit, catalog: Catalog, which: str,
                   device: torch.device, histories: np.ndarray | None = None,
                   knn: KnnScores | None = None) -> dict[str, object]:
    """``evaluate`` on the market's valid or test set (``split_scores``); ``histories``: other
    model inputs than the split's own (then scored through the model)."""
    ev = split.eval_set(which)
    if histories is not None:
        return evaluate(model, histories, ev.candidates, catalog.item_category,
                        catalog.categories, device)
    return summarize_scores(split_scores(model, split, which, device, knn), ev.candidates,
                            catalog.item_category, catalog.categories)


def attach_knn(model: MarketModel, split: MarketSplit, n_items: int) -> None:
    """Attach the market's private item-kNN (built from ``split``'s training data) to
    ``model``; its weight is set by ``calibrate_knn``."""
    model.attach_item_similarity(ItemSimilarity.from_split(split, n_items))


class MarketNode:
    """One market: its data split, model and private state. Nothing here is sent anywhere;
    ``train_round`` returns the only thing that travels (an encoder update)."""

    def __init__(self, cfg: RunConfig, market: str, state_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.market = market
        self.catalog, self.split = load_market(cfg.dataset, cfg.data_dir or None, market,
                                               seed=cfg.seed, n_neg=cfg.eval_negatives,
                                               max_history=cfg.max_history,
                                               options=ReaderOptions.from_run_config(cfg.to_mapping()))
        self.device = resolve_device(cfg.device)
        if cfg.torch_threads > 0:
            torch.set_num_threads(cfg.torch_threads)
        self.model = build_model(cfg, self.catalog)
        init_heads_from_data(self.model, self.split)
        if cfg.item_knn and cfg.mtl != "single-task":
            # private: built from this market's own training data, never sent or saved
            attach_knn(self.model, self.split, self.catalog.n_items)
        if cfg.mtl == "single-task":
            assert isinstance(self.model, SingleTaskModel)
            center_item_bias(self.model, self.split, item_counts(self.split, self.catalog.n_items))
        self.state_path = Path(state_dir) / market / "private.pt" if state_dir else None
        self.rounds_done = 0

    # ------------------------------------------------------------------ private state
    def restore(self, private: dict[str, torch.Tensor] | None) -> str:
        """Restore heads from memory (``private``) or else the state dir; returns the source."""
        if private is not None:
            load_parts(self.model, private=private)
            return "memory"
        if self.state_path is not None and self.state_path.is_file():
            state, self.rounds_done = load_private(self.state_path, self.market,
                                                   self.catalog.fingerprint())
            load_parts(self.model, private=state)
            return "disk"
        return "fresh"

    def private(self) -> dict[str, torch.Tensor]:
        return private_state(self.model)

    def persist(self, server_round: int) -> None:
        """Save heads atomically under the state dir (survives restarts of the node)."""
        self.rounds_done = server_round
        if self.state_path is not None:
            save_private(self.state_path, self.private(), self.market,
                         self.catalog.fingerprint(), server_round)

    # ------------------------------------------------------------------ round work
    def train_round(self, global_encoder: dict[str, torch.Tensor], server_round: int,
                    rowwise: bool | None = None,
                    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Load the global encoder, train locally, return (encoder update, train metrics).
        ``rowwise``: weigh item rows by this market's counts (default: the config's
        ``aggregation``; secure aggregation always passes False)."""
        if rowwise is None:
            rowwise = self.cfg.aggregation == "rowwise"
        load_parts(self.model, encoder=global_encoder)
        s = self.split
        if self.cfg.mtl == "single-task":
            return self._train_single_task(global_encoder, server_round, rowwise)
        settings = train_settings(self.cfg, self.cfg.seed * 1000 + server_round)
        result = train_local(self.model, s.train_users, s.train_items, s.train_histories,
                             self.negative_pool(), settings, self.device,
                             global_encoder=global_encoder)
        counts = item_counts(s, self.catalog.n_items) if rowwise else None
        update = make_update(encoder_state(self.model), global_encoder, s.n_train, counts)
        metrics = {"num-examples": float(s.n_train), "train-loss": result.loss,
                   "train-seconds": result.seconds, "train-steps": float(result.steps)}
        return update, metrics

    def negative_pool(self) -> np.ndarray:
        """The items training draws negatives from (``negative-pool``): the market's own, or
        every catalog item (the padding row excluded)."""
        if self.cfg.negative_pool == "catalog":
            return np.arange(self.catalog.n_items)
        return self.split.items

    def evaluate(self, global_encoder: dict[str, torch.Tensor] | None,
                 which: str = "test") -> dict[str, object]:
        """nDCG@10/HR@10 of this market (overall and per category) on valid or test."""
        if global_encoder is not None:
            load_parts(self.model, encoder=global_encoder)
        self.calibrate_knn()
        hist = None if self.cfg.mtl != "single-task" else self.histories(which)
        return evaluate_split(self.model, self.split, self.catalog, which, self.device, hist,
                              self._knn)

    def calibrate_knn(self) -> float:
        """With the private item-kNN on: pick its mixing weight (the same for every category)
        on this market's validation split for the current model; returns it (0 when off)."""
        return calibrate_knn(self.model, self.split, self.device, self._knn)

    @property
    def _knn(self) -> KnnScores | None:
        if self.model.item_sim is None:
            return None
        # one per (similarity, split, device) in this process: a ClientApp builds a node per
        # message from the cached split and similarity, so the scores outlive the node
        return _cached_knn_scores(self.model.item_sim, self.split, self.device)

    # ------------------------------------------------------------------ single-task (shared/mtl.py)
    def histories(self, which: str) -> np.ndarray:
        """Model input for ``which`` ("valid"/"test"): the eval histories, or per category
        (rows x N x L) for the single-task model, which must not see other categories."""
        ev = self.split.eval_set(which)
        if self.cfg.mtl != "single-task":
            return ev.histories
        return category_histories(self.split, which, self.catalog.item_category,
                                  len(self.catalog.categories), self.cfg.max_history,
                                  self.catalog.n_items)

    def _train_single_task(self, global_encoder: dict[str, torch.Tensor], server_round: int,
                           rowwise: bool) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        assert isinstance(self.model, SingleTaskModel)
        s, base = self.split, self.cfg.seed * 1000 + server_round
        result = train_single_task(self.model, s, self.cfg.max_history,
                                   lambda c: train_settings(self.cfg, base * 1009 + c),
                                   self.device, global_encoder)
        counts = item_counts(s, self.catalog.n_items) if rowwise else None
        update = single_task_update(encoder_state(self.model), global_encoder, s,
                                    self.catalog.item_category, counts)
        return update, {"num-examples": float(s.n_train), "train-loss": result.loss,
                        "train-seconds": result.seconds, "train-steps": float(result.steps)}
