import math

import numpy as np
import pytest
import torch

from storefed.shared.metrics import ndcg_hr_at_k, summarize


def test_hand_computed_values():
    # positive at rank 0, rank 3, rank 10 (outside the top 10)
    s = torch.zeros(3, 12)
    s[0] = torch.tensor([5.0] + [1.0] * 11)
    s[1] = torch.tensor([5.0, 9, 8, 7] + [1.0] * 8)
    s[2] = torch.tensor([0.0] + [1.0] * 11)  # 11 negatives above the positive
    ndcg, hr = ndcg_hr_at_k(s, 10)
    assert ndcg.tolist() == pytest.approx([1.0, 1 / math.log2(5), 0.0])
    assert hr.tolist() == [1.0, 1.0, 0.0]


def test_constant_scorer_scores_like_random():
    ndcg, hr = ndcg_hr_at_k(torch.zeros(50, 100), 10)
    expected = sum(1 / math.log2(r + 2) for r in range(10)) / 100
    assert ndcg.mean().item() == pytest.approx(expected)  # 0.0454
    assert abs(ndcg.mean().item() - 0.0454) < 1e-3
    assert hr.mean().item() == pytest.approx(0.10)


def test_ties_never_favour_the_positive():
    # positive tied with every negative must not beat a strictly lower positive by more than chance
    tied = torch.ones(1, 100)
    nd_tied, _ = ndcg_hr_at_k(tied, 10)
    top = torch.ones(1, 100)
    top[0, 0] = 2.0
    nd_top, _ = ndcg_hr_at_k(top, 10)
    assert nd_tied.item() < 0.05 < nd_top.item() == 1.0
    # a tie with one negative at the top: rank 0 or 1 with equal chance
    s = torch.tensor([[3.0, 3.0, 1.0, 1.0]])
    nd, _ = ndcg_hr_at_k(s, 10)
    assert nd.item() == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_random_scores_match_ranx():
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(7)
    scores = torch.from_numpy(rng.normal(size=(60, 100)))
    ndcg, hr = ndcg_hr_at_k(scores, 10)
    qrels = ranx.Qrels({f"u{u}": {"i0": 1} for u in range(60)})
    run = ranx.Run({f"u{u}": {f"i{j}": float(scores[u, j]) for j in range(100)}
                    for u in range(60)})
    ref = ranx.evaluate(qrels, run, ["ndcg@10", "hit_rate@10"])
    assert ndcg.mean().item() == pytest.approx(ref["ndcg@10"], abs=1e-9)
    assert hr.mean().item() == pytest.approx(ref["hit_rate@10"], abs=1e-9)


def test_summarize_per_category():
    out = summarize(np.array([1.0, 0.0, 0.5]), np.array([1.0, 0.0, 1.0]), np.array([0, 1, 0]),
                    ["a", "b"])
    assert out["examples"] == 3
    assert out["categories"]["a"]["ndcg@10"] == pytest.approx(0.75)
    assert out["categories"]["b"]["examples"] == 1
