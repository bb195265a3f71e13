"""Ranking metrics over candidate score matrices (pure functions).

Protocol: each row holds one user's scores for ``1 + n_neg`` candidates, the held-out positive in
column 0. Ties between the positive and negatives are resolved by their *expected* value under a
uniformly random order of the tied items, so a tie never counts in the positive's favour beyond
chance: a constant scorer gets exactly the random-ranking value (nDCG@10 = 0.0454 with 99
negatives), and a scorer that ties everything with the positive cannot look good.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def positive_rank_bounds(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores``: U x C, positive in column 0 -> (greater, ties), each (U,) int64.

    ``greater`` counts negatives scored strictly above the positive, ``ties`` those scored equal;
    the positive's 0-based rank is uniform over ``greater .. greater + ties``.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be U x C with C >= 2, got shape {tuple(scores.shape)}")
    pos = scores[:, :1]
    neg = scores[:, 1:]
    greater = (neg > pos).sum(dim=1)
    ties = (neg == pos).sum(dim=1)
    return greater, ties


def ndcg_hr_at_k(scores: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user nDCG@k and HR@k (each (U,) float64) for U x C scores, positive in column 0.

    With one relevant item, nDCG@k = 1 / log2(rank + 2) when rank < k (0-based), else 0.
    Tied candidates share the positive's rank range; the result is the mean over that range.
    """
    scores = scores.detach().to(torch.float64).cpu()
    greater, ties = positive_rank_bounds(scores)
    n_cand = scores.shape[1]
    ranks = torch.arange(n_cand, dtype=torch.float64)
    gain = torch.where(ranks < k, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks))
    hit = (ranks < k).to(torch.float64)
    # prefix sums give the mean gain over rank range [greater, greater + ties] in O(1) per user
    cg = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(gain, 0)])
    ch = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(hit, 0)])
    lo, hi = greater, greater + ties + 1
    width = (hi - lo).to(torch.float64)
    ndcg = (cg[hi] - cg[lo]) / width
    hr = (ch[hi] - ch[lo]) / width
    return ndcg, hr


def summarize(
    ndcg: np.ndarray | torch.Tensor,
    hr: np.ndarray | torch.Tensor,
    categories: np.ndarray | None = None,
    category_names: Sequence[str] | None = None,
) -> dict[str, object]:
    """Mean metrics, plus per category of the held-out positive when categories are given.

    Returns ``{"ndcg@10": x, "hr@10": y, "examples": n, "categories": {name: {...}}}``.
    """
    nd = np.asarray(ndcg, dtype=np.float64)
    h = np.asarray(hr, dtype=np.float64)
    out: dict[str, object] = {
        "ndcg@10": float(nd.mean()) if nd.size else 0.0,
        "hr@10": float(h.mean()) if h.size else 0.0,
        "examples": int(nd.size),
    }
    cats: dict[str, dict[str, float | int]] = {}
    if categories is not None and category_names is not None:
        categories = np.asarray(categories)
        for ci in np.unique(categories):
            sel = categories == ci
            cats[str(category_names[int(ci)])] = {
                "ndcg@10": float(nd[sel].mean()),
                "hr@10": float(h[sel].mean()),
                "examples": int(sel.sum()),
            }
    out["categories"] = cats
    return out


def paired_bootstrap(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor,
                     n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over users (two models' per-user metric on the same users) and its 95%
    percentile interval over ``n_boot`` resamples of the users with replacement."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-d arrays, got shapes "
                         f"{x.shape} and {y.shape}")
    d = x - y
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci95_low": float(lo), "ci95_high": float(hi),
            "users": int(d.size)}
