"""LightGCN pooled (shared/lightgcn.py): the propagation is the paper's normalised mean over
layers, markets' users never merge while items do, the test graph holds the validation pairs and
the training graph does not, and on the synthetic storefronts it ranks well above popularity."""

from __future__ import annotations

import numpy as np
import torch

from storefed.shared.baselines import run_lightgcn_pooled, run_popularity
from storefed.shared.data import load_dataset
from storefed.shared.lightgcn import build_graph, propagate, valid_edges


def test_propagation_is_the_normalised_mean_over_layers():
    ds = load_dataset("synthetic", None, ["m0", "m1"], seed=0, n_neg=20)
    n_items = ds.catalog.n_items
    graph = build_graph(ds.markets, n_items)
    s0, s1 = ds.markets["m0"], ds.markets["m1"]
    assert graph.offsets == {"m0": 0, "m1": s0.n_users}
    assert graph.n_users == s0.n_users + s1.n_users  # users of two markets never merge
    n = graph.n_users + graph.n_rows
    dense = torch.zeros(n, n, dtype=torch.float64)
    dense[graph.users, graph.n_users + graph.items] = 1.0
    dense = dense + dense.T
    assert float(dense.max()) == 1.0  # distinct pairs only
    deg = dense.sum(1)
    inv = torch.where(deg > 0, deg.clamp(min=1).rsqrt(), torch.zeros_like(deg))
    a_hat = inv[:, None] * dense * inv[None, :]
    e0 = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = (e0 + a_hat @ e0 + a_hat @ a_hat @ e0) / 3
    got = propagate(graph.adjacency(), e0.float(), 2).double()
    assert torch.allclose(got, want, atol=1e-5)
    # the padding item row is isolated: it keeps only its own E0 share
    pad = graph.n_users + graph.n_rows - 1
    assert torch.allclose(got[pad], e0[pad] / 3, atol=1e-6)


def test_the_test_graph_adds_the_validation_pairs_and_only_it_does():
    ds = load_dataset("synthetic", None, ["m0", "m1"], seed=0, n_neg=20)
    graph = build_graph(ds.markets, ds.catalog.n_items)
    u, i = valid_edges(graph, ds.markets)
    col = graph.n_users + torch.as_tensor(i)
    train = graph.adjacency().to_dense()[torch.as_tensor(u), col]
    test = graph.adjacency(extra=(u, i)).to_dense()[torch.as_tensor(u), col]
    assert float(train.abs().max()) == 0.0  # held out of training
    assert bool((test > 0).all())


def test_lightgcn_pooled_beats_popularity_and_reports_its_tuning():
    ds = load_dataset("synthetic", None, None, seed=0, n_neg=99)
    got = run_lightgcn_pooled(ds.markets, ds.catalog.n_items, seed=0,
                              grid=((1, 1e-2), (2, 1e-2)), max_epochs=20)
    pop = run_popularity(ds.markets, ds.catalog.n_items)
    avg = lambda r: np.mean([float(v["ndcg@10"]) for v in r.values()])  # noqa: E731
    assert avg(got) > avg(pop) + 0.02, (avg(got), avg(pop))
    tuned = {str(v["tuned"]) for v in got.values()}
    assert len(tuned) == 1  # one pooled model: the same setting for every market
    t = next(iter(got.values()))["tuned"]
    assert t["layers"] in (1, 2) and 0 < t["epochs"] <= 20  # type: ignore[index]
