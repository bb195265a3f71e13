"""EASE pooled (shared/baselines.py): the closed form solves its ridge problem, the padding
item scores nothing, and on the synthetic storefronts it ranks well above popularity."""

from __future__ import annotations

import numpy as np
import torch

from storefed.shared.baselines import (
    fit_ease,
    fit_itemknn,
    run_ease_pooled,
    run_popularity,
)
from storefed.shared.data import load_dataset


def test_ease_weights_solve_the_constrained_ridge_problem():
    ds = load_dataset("synthetic", None, ["m0", "m1"], seed=0, n_neg=20)
    n = ds.catalog.n_items
    knn = fit_itemknn(list(ds.markets.values()), n)
    ease = fit_ease(knn, 50.0)
    # back to the full catalog's (n + 1) x (n + 1) matrix: unseen items' rows and columns 0
    b = ease.b.double()[torch.from_numpy(ease.index)][:, torch.from_numpy(ease.index)]
    gram = torch.zeros((n + 1) * (n + 1), dtype=torch.float64)
    gram[torch.from_numpy(knn.keys)] = torch.from_numpy(knn.cooc)
    gram = gram.view(n + 1, n + 1)
    gram.diagonal().add_(torch.from_numpy(knn.degree))
    # stationarity of ||X - XB||^2 + lam ||B||^2 with diag(B) = 0: (G + lam I) B - G is
    # diagonal (the Lagrange multipliers) on the real items
    resid = (gram + 50.0 * torch.eye(n + 1, dtype=torch.float64)) @ b - gram
    off = resid[:n, :n] - torch.diag(torch.diagonal(resid[:n, :n]))
    assert float(off.abs().max()) < 1e-4  # float32 weights; a wrong formula leaves O(1)
    assert float(b.diagonal().abs().max()) == 0.0 and float(b[n].abs().max()) == 0.0
    h = np.array([[0, n, n]])
    c = np.array([[1, 2, n]])
    got = ease.scores(h, c)
    assert np.allclose(got, [[float(b[0, 1]), float(b[0, 2]), 0.0]], atol=1e-6)


def test_ease_over_held_items_matches_the_full_catalog_solution():
    """Solving on the items the data holds is exact: the same weights as inverting the whole
    catalog's Gram matrix (items nobody holds get 0)."""
    ds = load_dataset("synthetic", None, ["m0"], seed=0, n_neg=20)
    n = ds.catalog.n_items
    knn = fit_itemknn([ds.markets["m0"]], n)
    assert (knn.degree[:n] == 0).any()  # the test needs unseen items
    gram = torch.zeros((n + 1) * (n + 1), dtype=torch.float64)
    gram[torch.from_numpy(knn.keys)] = torch.from_numpy(knn.cooc)
    gram = gram.view(n + 1, n + 1)
    gram.diagonal().add_(torch.from_numpy(knn.degree) + 50.0)
    p = torch.linalg.inv(gram)
    full = -p / p.diagonal()[None, :]
    full.fill_diagonal_(0.0)
    full[n, :] = 0.0
    full[:, n] = 0.0
    ease = fit_ease(knn, 50.0)
    b = ease.b.double()[torch.from_numpy(ease.index)][:, torch.from_numpy(ease.index)]
    assert float((b - full).abs().max()) < 1e-5


def test_ease_pooled_beats_popularity_and_reports_its_lambda():
    ds = load_dataset("synthetic", None, None, seed=0, n_neg=99)
    ease = run_ease_pooled(ds.markets, ds.catalog.n_items)
    pop = run_popularity(ds.markets, ds.catalog.n_items)
    avg = lambda r: np.mean([float(v["ndcg@10"]) for v in r.values()])  # noqa: E731
    assert avg(ease) > avg(pop) + 0.02, (avg(ease), avg(pop))
    assert {v["ease_lambda"] for v in ease.values()} <= {10.0, 50.0, 200.0, 500.0, 1000.0}
