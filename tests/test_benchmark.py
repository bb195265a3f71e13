"""storefed benchmark: end to end on tiny synthetic data (JSON schema, finite metrics) and the
classical baselines checked by hand on tiny cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from storefed.shared.baselines import (
    fit_itemknn,
    popularity_scores,
    run_itemknn_pooled,
    score_metrics,
    train_bpr_mf,
)
from storefed.shared.config import RunConfig
from storefed.shared.data import EvalSet, MarketSplit
from storefed.shared.train import input_histories
from storefed.simulations.cli import main
from storefed.simulations.experiments import benchmark

PAD = 6  # 6 items (0..5), padding index 6


def _split(market, users, items, valid, test, hist_valid, hist_test):
    ev = lambda cands, hist: EvalSet(users=np.arange(len(cands)),  # noqa: E731
                                     candidates=np.asarray(cands), histories=np.asarray(hist))
    return MarketSplit(market=market, user_ids=tuple(f"u{i}" for i in range(max(users) + 1)),
                       train_users=np.asarray(users), train_items=np.asarray(items),
                       train_histories=np.zeros((max(users) + 1, 1), dtype=np.int64),
                       valid=ev(valid, hist_valid), test=ev(test, hist_test),
                       items=np.unique(np.asarray(items)))


def test_popularity_counts_the_markets_own_training_interactions():
    s = _split("a", [0, 0, 1, 1, 2], [0, 1, 0, 2, 0], [[1, 3]], [[2, 0, 5]], [[0]], [[0]])
    scores = popularity_scores(s, 6, s.test)
    assert scores.tolist() == [[1.0, 3.0, 0.0]]  # item 2 once, item 0 three times, 5 never
    # positive ranked 2nd of 3 -> ndcg = 1/log2(3)
    assert score_metrics(scores)["ndcg@10"] == pytest.approx(1 / math.log2(3))


def test_itemknn_pooled_cosine_by_hand():
    # market a: user0 {0,1}, user1 {0,1,2}; market b (its own users): user0 {1,2}
    a = _split("a", [0, 0, 1, 1, 1], [0, 1, 0, 1, 2], [[0, 1]], [[2, 1]], [[PAD]], [[PAD]])
    b = _split("b", [0, 0], [1, 2], [[1, 2]], [[1, 2]], [[PAD]], [[PAD]])
    knn = fit_itemknn([a, b], 6)
    # degrees: item0 2 users, item1 3, item2 2; co-occurrence (0,1)=2, (0,2)=1, (1,2)=2
    assert knn.degree[:3].tolist() == [2.0, 3.0, 2.0]
    sim = knn.similarity(np.array([0, 0, 1, 0, 3]), np.array([1, 2, 2, 0, 0]))
    assert sim.tolist() == pytest.approx([2 / math.sqrt(6), 1 / 2, 2 / math.sqrt(6), 0.0, 0.0])
    # user with history {0, 1}: score(2) = sim(0,2) + sim(1,2); score(3) = 0; pads ignored
    scores = knn.scores(np.array([[0, 1, PAD]]), np.array([[2, 3]]))
    assert scores[0].tolist() == pytest.approx([0.5 + 2 / math.sqrt(6), 0.0])
    # the pooled method: market b's co-occurrences count for market a's users
    res = run_itemknn_pooled({"a": a, "b": b}, 6)
    assert set(res) == {"a", "b"} and all(0 <= r["ndcg@10"] <= 1 for r in res.values())


def test_bpr_mf_ranks_trained_positives_above_unseen_items():
    users = np.repeat(np.arange(30), 3)
    items = np.tile([0, 1, 2], 30)
    s = _split("a", users.tolist(), items.tolist(), [[0, 3, 4, 5]] * 30, [[1, 3, 4, 5]] * 30,
               [[2]] * 30, [[2]] * 30)
    s = MarketSplit(**{**s.__dict__, "items": np.arange(6)})
    res = train_bpr_mf(s, 6, dim=8, l2=0.0, max_epochs=40, seed=0, lr=0.05, eval_every=10)
    assert res.valid_ndcg == pytest.approx(1.0)
    assert float(score_metrics(res.test_scores)["ndcg@10"]) == pytest.approx(1.0)


def test_causal_history_keeps_only_earlier_items():
    hist = torch.tensor([[3, 1, 4, PAD], [3, 1, 4, PAD]])
    pos = torch.tensor([4, 5])  # 5 is not in the window -> bag (nothing to drop)
    out = input_histories(hist, pos, PAD, "causal")
    assert out.tolist() == [[3, 1, PAD, PAD], [3, 1, 4, PAD]]
    assert input_histories(hist, torch.tensor([1, 3]), PAD, "bag").tolist() == [
        [3, PAD, 4, PAD], [PAD, 1, 4, PAD]]


def _check_doc(doc, markets, seeds):
    assert doc["seeds"] == seeds and isinstance(doc["protocol"], str)
    for name, res in doc["methods"].items():
        if "unavailable" in res:
            assert name in benchmark.OPTIONAL_METHODS
            continue
        assert set(res["markets"]) == set(markets), name
        for m, v in res["markets"].items():
            assert set(v) >= {"ndcg@10", "ndcg@10_std", "hr@10", "hr@10_std"}
            assert all(math.isfinite(x) and x >= 0 for x in v.values()), (name, m, v)
            assert 0 <= v["ndcg@10"] <= v["hr@10"] <= 1
        assert set(res["average"]) == {"ndcg@10", "hr@10"}
        assert math.isfinite(res["seconds_per_round"]) and res["seconds_per_round"] >= 0
        assert math.isfinite(res["bytes_per_client_round"])


@pytest.mark.slow
def test_benchmark_end_to_end_on_synthetic(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["benchmark", "--dataset", "synthetic", "--seeds", "1", "--rounds", "2",
               "--local-epochs", "1", "--config", "embedding-dim=16", "--overhead-repeats", "2",
               "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "benchmark.json").read_text())
    markets = ["m0", "m1", "m2", "m3"]
    assert set(doc["methods"]) == set(benchmark.DEFAULT_METHODS)
    _check_doc(doc, markets, 1)
    assert doc["methods"]["storefed"]["bytes_per_client_round"] > 0
    assert doc["methods"]["local"]["bytes_per_client_round"] == 0
    ov = doc["overhead"]
    assert ov["flower_over_inprocess"] > 0 and ov["throughput"]["ratio"] > 0
    assert len(ov["inprocess_round_seconds"]) == len(ov["flower_round_seconds"]) == 2
    # two timed pairs; the ratio is of each arm's fastest run
    assert len(ov["flower_samples_seconds"]) == len(ov["inprocess_samples_seconds"]) == 2
    assert ov["flower_federated_seconds"] == min(ov["flower_samples_seconds"])
    assert ov["inprocess_federated_seconds"] == min(ov["inprocess_samples_seconds"])
    assert len(ov["pair_ratios"]) == 2
    assert ov["steady_round_ratio"] > 0 and math.isfinite(ov["flower_fixed_seconds"])
    assert (out / "benchmark.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "storefed" in printed and "itemknn-pooled" in printed


def test_benchmark_seeds_give_mean_and_std(tmp_path):
    cfg = RunConfig(dataset="synthetic", markets="m0,m1", num_rounds=1, local_epochs=1,
                    embedding_dim=8)
    doc = benchmark.run_benchmark(cfg, tmp_path, 2, ["popularity", "local", "central",
                                                     "fedavg-full"], overhead_repeats=0)
    _check_doc(doc, ["m0", "m1"], 2)
    # different seeds draw different negatives: some spread across seeds
    assert any(v["ndcg@10_std"] > 0 for v in doc["methods"]["popularity"]["markets"].values())
    with pytest.raises(Exception, match="unknown benchmark method"):
        benchmark.run_benchmark(cfg, tmp_path, 1, ["nope"], overhead_repeats=0)


def test_the_aggregate_keeps_what_each_seed_tuned():
    """A reference's tuning (picked on validation) is part of its result: per seed and market in
    the aggregate, and absent for methods that tune nothing."""
    def run(nd: float, lam: float | None) -> dict:
        entry = {"ndcg@10": nd, "hr@10": nd}
        if lam is not None:
            entry["ease_lambda"] = lam
        return {"markets": {"a": dict(entry)}, "seconds_per_round": 0.0,
                "bytes_per_client_round": 0.0}

    agg = benchmark.aggregate_method([run(0.5, 50.0), run(0.7, 200.0)])
    assert agg["tuning"] == [{"a": {"ease_lambda": 50.0}}, {"a": {"ease_lambda": 200.0}}]
    assert math.isclose(agg["markets"]["a"]["ndcg@10"], 0.6)
    assert "tuning" not in benchmark.aggregate_method([run(0.5, None)])
