"""The market's private ranker (shared/ranker.py): its features are the statistics they name,
it never reads the split it is evaluated on, it learns what the model alone misses, and a saved
ranker scores only the model it was fitted to."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from storefed.shared.baselines import fit_ease, fit_itemknn, market_counts
from storefed.shared.config import RunConfig
from storefed.shared.data import EvalSet, load_market
from storefed.shared.errors import CheckpointError
from storefed.shared.metrics import ndcg_hr_at_k
from storefed.shared.node import attach_knn, build_model, init_heads_from_data, neural_scores
from storefed.shared.ranker import (
    FEATURES,
    MarketStats,
    features,
    fit_ranker,
    load_ranker,
    save_ranker,
    version_of,
)
from storefed.shared.train import score_candidates

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def market():
    catalog, split = load_market("synthetic", None, "m0", seed=0)
    cfg = RunConfig(dataset="synthetic", markets="m0", embedding_dim=16, device="cpu")
    torch.manual_seed(0)
    model = build_model(cfg, catalog)
    init_heads_from_data(model, split)
    return catalog, split, model


def test_features_are_the_statistics_they_name(market):
    catalog, split, model = market
    stats = MarketStats.from_split(split, catalog.n_items)
    ev = split.valid
    x = features(model, stats, ev.histories, ev.candidates, CPU)
    assert x.shape == ev.candidates.shape + (len(FEATURES),)
    col = {n: x[:, :, i] for i, n in enumerate(FEATURES)}
    knn = fit_itemknn([split], catalog.n_items)
    np.testing.assert_allclose(col["knn"], knn.scores(ev.histories, ev.candidates), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(col["ease200"], fit_ease(knn, 200.0).scores(
        ev.histories, ev.candidates), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(col["pop"], np.log1p(market_counts(split, catalog.n_items))[
        ev.candidates], rtol=1e-6)
    np.testing.assert_allclose(col["emb_norm"], model.encoder.item_emb.weight.detach().norm(
        dim=1).numpy()[ev.candidates], rtol=1e-5)
    # the model's score without its kNN term, exactly, and the model is left as it was
    attach_knn(model, split, catalog.n_items)
    with torch.no_grad():
        model.heads.knn_weight.fill_(2.0)
    try:
        x = features(model, stats, ev.histories, ev.candidates, CPU)
        assert model.item_sim is not None
        np.testing.assert_array_equal(x[:, :, 0], neural_scores(
            model, ev.histories, ev.candidates, CPU).numpy())
        assert not np.allclose(x[:, :, 0], score_candidates(
            model, ev.histories, ev.candidates, CPU).numpy())
    finally:
        model.attach_item_similarity(None)
        with torch.no_grad():
            model.heads.knn_weight.zero_()
    pad = catalog.pad_index
    n_hist = (ev.histories != pad).sum(axis=1)
    assert (col["hist_len"][:, 0] == np.maximum(n_hist, 1)).all()
    last = ev.histories[np.arange(len(n_hist)), n_hist - 1]
    np.testing.assert_allclose(col["knn_last"], knn.similarity(
        np.broadcast_to(last[:, None], ev.candidates.shape), ev.candidates), rtol=1e-5,
        atol=1e-6)
    assert (col["knn_max"] <= col["knn"] + 1e-6).all()
    # computed in row blocks (a service ranking a catalog per user): the same features
    np.testing.assert_array_equal(features(model, stats, ev.histories, ev.candidates, CPU,
                                           cells=3_000), x)


def test_the_ranker_never_reads_the_split_it_is_evaluated_on(market):
    catalog, split, model = market
    stats = MarketStats.from_split(split, catalog.n_items)
    fitted = fit_ranker(model, split, stats, CPU, seed=0, max_rounds=60)
    rng = np.random.default_rng(1)
    garbage = EvalSet(users=split.test.users,
                      candidates=rng.integers(0, catalog.n_items, split.test.candidates.shape),
                      histories=rng.integers(0, catalog.n_items, split.test.histories.shape))
    other = fit_ranker(model, dataclasses.replace(split, test=garbage), stats, CPU, seed=0,
                       max_rounds=60)
    assert other.model_strings() == fitted.model_strings()
    # ... while a change to the validation split it trains on changes it
    shuffled = dataclasses.replace(split, valid=dataclasses.replace(
        split.valid, candidates=split.valid.candidates[:, ::-1].copy()))
    changed = fit_ranker(model, shuffled, stats, CPU, seed=0, max_rounds=60)
    assert changed.model_strings() != fitted.model_strings()


def test_the_ranker_learns_what_the_model_alone_misses(market):
    """An untrained encoder ranks near popularity; the ranker over the market's own item-kNN and
    EASE lifts the held-out test split well above it."""
    catalog, split, model = market
    stats = MarketStats.from_split(split, catalog.n_items)
    ranker = fit_ranker(model, split, stats, CPU, seed=0, max_rounds=60)
    ev = split.test
    own = ndcg_hr_at_k(score_candidates(model, ev.histories, ev.candidates, CPU), 10)[0].mean()
    ranked = ndcg_hr_at_k(ranker.rank(model, stats, ev.histories, ev.candidates, CPU),
                          10)[0].mean()
    assert float(ranked) > float(own) + 0.03, (float(ranked), float(own))
    assert 0.0 < ranker.cv_valid_ndcg <= 1.0 and min(ranker.fold_rounds) >= 1


def test_a_saved_ranker_round_trips_and_scores_only_its_own_model(market, tmp_path):
    catalog, split, model = market
    stats = MarketStats.from_split(split, catalog.n_items)
    ranker = fit_ranker(model, split, stats, CPU, seed=0, max_rounds=40)
    path = tmp_path / "m0" / "ranker.json"
    save_ranker(path, ranker, "m0")
    back = load_ranker(path, "m0")
    ev = split.test
    np.testing.assert_array_equal(back.rank(model, stats, ev.histories, ev.candidates, CPU),
                                  ranker.rank(model, stats, ev.histories, ev.candidates, CPU))
    assert back.model_version == version_of(model)
    with torch.no_grad():
        model.heads.item_bias.add_(0.01)  # another model (e.g. the next round's)
    try:
        with pytest.raises(CheckpointError, match="fitted to model version"):
            back.rank(model, stats, ev.histories, ev.candidates, CPU)
    finally:
        with torch.no_grad():
            model.heads.item_bias.sub_(0.01)
    with pytest.raises(CheckpointError, match="belongs to market 'm0'"):
        load_ranker(path, "m1")
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "features": doc["features"][:-1]}))
    with pytest.raises(CheckpointError, match=str(path)):
        load_ranker(path, "m0")
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=str(path)):
        load_ranker(path, "m0")


def test_the_ranker_scores_by_the_mean_of_its_fold_boosters(market, tmp_path):
    """Five fold boosters, each cut at its own early-stopped round; a file the previous version
    wrote (one refit booster over other features, ``storefed-ranker/1``) is refused by name."""
    catalog, split, model = market
    stats = MarketStats.from_split(split, catalog.n_items)
    ranker = fit_ranker(model, split, stats, CPU, seed=0, max_rounds=40)
    assert len(ranker.boosters) == len(ranker.fold_rounds) == 5
    ev = split.test
    x = features(model, stats, ev.histories, ev.candidates, CPU)
    flat = x.reshape(-1, x.shape[2])
    each = [b.predict(flat, num_iteration=r) for b, r in zip(ranker.boosters,
                                                              ranker.fold_rounds, strict=True)]
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(ranker.scores(x), np.mean(each, axis=0).reshape(x.shape[:2]))
    path = tmp_path / "m0" / "ranker.json"
    save_ranker(path, ranker, "m0")
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "boosters": doc["boosters"][:4]}))
    with pytest.raises(CheckpointError, match="4 boosters for 5 fold rounds"):
        load_ranker(path, "m0")
    old = {k: v for k, v in doc.items() if k not in ("boosters", "fold_rounds")}
    path.write_text(json.dumps({**old, "format": "storefed-ranker/1", "rounds": 7,
                                "booster": doc["boosters"][2]}))
    with pytest.raises(CheckpointError, match=f"{path}: format 'storefed-ranker/1'"):
        load_ranker(path, "m0")
