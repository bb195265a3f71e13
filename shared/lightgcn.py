"""LightGCN (He et al., SIGIR 2020) over every market's training data pooled: a centralised
reference for the benchmark (``lightgcn-pooled``), not private, like ``ease-pooled``.

What it is: one bipartite graph of (market-local) users and the shared catalog's items, an edge
per distinct training (user, item) pair of any market. Users of different markets never merge
(a user index is offset per market); items do, which is how pooling helps. Embeddings ``E0``
(users and items, ``dim``) are propagated ``K`` times over the symmetrically normalised
adjacency ``A_hat = D^-1/2 A D^-1/2`` and averaged, ``E = mean(E0, A_hat E0, ..., A_hat^K E0)``;
a user's score for an item is the dot product of their rows of ``E``. Trained with the BPR loss
(one uniform negative per positive, drawn from the items the positive's market holds) and L2 on
the batch's ``E0`` rows, as in the paper.

Decisions:
* Tuned on validation, like the other references: ``LIGHTGCN_GRID`` (layers, L2) and the epoch
  count (early stopping on the markets' average validation nDCG@10, checked every
  ``eval_every`` epochs), the test scored once with the chosen setting.
* The test is scored on the graph with each user's validation pair added (no retraining):
  LightGCN is transductive, and every other method's test history holds that pair, so leaving
  it out would handicap the reference.
* Adam at lr 0.01 (the paper's 0.001 needs hundreds of epochs; this is a CPU reference).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from storefed.shared.data import MarketSplit
from storefed.shared.metrics import ndcg_hr_at_k

#: (layers, L2) tried on validation
# (XMarket, 7 markets pooled, 2 layers, seed 0: average valid nDCG@10 0.498 / 0.499 / 0.513 /
# 0.504 / 0.434 for L2 1e-4 / 1e-3 / 1e-2 / 3e-2 / 1e-1; the layers are searched per run)
LIGHTGCN_GRID: tuple[tuple[int, float], ...] = ((1, 1e-2), (2, 1e-2), (3, 1e-2))


@dataclass(frozen=True)
class Graph:
    """The pooled bipartite graph: ``n_users`` users (markets' users stacked, ``offsets``
    giving each market's first row), then ``n_rows`` item rows (padding included, isolated)."""

    offsets: dict[str, int]
    n_users: int
    n_rows: int
    users: np.ndarray  # edge user rows (global), int64
    items: np.ndarray  # edge item indices, int64

    def adjacency(self, extra: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
        """A_hat, (n_users + n_rows) square, sparse CSR float32; ``extra``: more (user, item)
        edges (global user rows) for scoring only."""
        u, i = self.users, self.items
        if extra is not None:
            pairs = np.unique(np.concatenate([u * self.n_rows + i,
                                              extra[0] * self.n_rows + extra[1]]))
            u, i = pairs // self.n_rows, pairs % self.n_rows
        n = self.n_users + self.n_rows
        rows = np.concatenate([u, self.n_users + i])
        cols = np.concatenate([self.n_users + i, u])
        deg = np.bincount(rows, minlength=n).astype(np.float64)
        inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1.0)), 0.0)
        vals = inv[rows] * inv[cols]
        with warnings.catch_warnings():  # torch flags sparse CSR as beta on every build
            warnings.simplefilter("ignore", UserWarning)
            a = torch.sparse_coo_tensor(torch.as_tensor(np.stack([rows, cols])),
                                        torch.as_tensor(vals, dtype=torch.float32), (n, n))
            return a.coalesce().to_sparse_csr()


def build_graph(splits: Mapping[str, MarketSplit], n_items: int) -> Graph:
    """Every market's distinct training pairs, users offset per market."""
    n_rows = n_items + 1
    offsets: dict[str, int] = {}
    users, items, start = [], [], 0
    for m, s in splits.items():
        offsets[m] = start
        pairs = np.unique(s.train_users.astype(np.int64) * n_rows + s.train_items)
        users.append(pairs // n_rows + start)
        items.append(pairs % n_rows)
        start += s.n_users
    return Graph(offsets=offsets, n_users=start, n_rows=n_rows,
                 users=np.concatenate(users) if users else np.zeros(0, np.int64),
                 items=np.concatenate(items) if items else np.zeros(0, np.int64))


def propagate(adj: torch.Tensor, e0: torch.Tensor, layers: int) -> torch.Tensor:
    """mean(E0, A E0, ..., A^K E0): (n_users + n_rows) x dim."""
    out, e = e0, e0
    for _ in range(layers):
        e = adj @ e
        out = out + e
    return out / (layers + 1)


@dataclass(frozen=True)
class LightGCNResult:
    layers: int
    l2: float
    epochs: int
    valid_ndcg: float  # the markets' average
    valid_scores: dict[str, np.ndarray]
    test_scores: dict[str, np.ndarray]


def _scores(emb: torch.Tensor, graph: Graph, splits: Mapping[str, MarketSplit],
            which: str) -> dict[str, np.ndarray]:
    out = {}
    for m, s in splits.items():
        ev = s.eval_set(which)
        u = emb[torch.as_tensor(ev.users.astype(np.int64) + graph.offsets[m])]
        c = emb[graph.n_users + torch.as_tensor(ev.candidates.astype(np.int64))]
        out[m] = torch.einsum("ud,ucd->uc", u, c).double().numpy()
    return out


def _avg_ndcg(scores: Mapping[str, np.ndarray]) -> float:
    return float(np.mean([float(ndcg_hr_at_k(torch.as_tensor(v), 10)[0].mean())
                          for v in scores.values()]))


def valid_edges(graph: Graph, splits: Mapping[str, MarketSplit]) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """Each user's validation pair (the positive in column 0), global user rows."""
    us, its = [], []
    for m, s in splits.items():
        us.append(s.valid.users.astype(np.int64) + graph.offsets[m])
        its.append(s.valid.candidates[:, 0].astype(np.int64))
    return np.concatenate(us), np.concatenate(its)


def train_lightgcn(splits: Mapping[str, MarketSplit], n_items: int, *, layers: int, l2: float,
                   seed: int, dim: int = 64, lr: float = 0.01, batch_size: int = 4096,
                   max_epochs: int = 60, eval_every: int = 5,
                   patience: int = 2) -> LightGCNResult:
    """One LightGCN over the pooled graph; keeps the epoch count with the best average
    validation nDCG@10, stopping once ``patience`` checks in a row did not improve on it."""
    graph = build_graph(splits, n_items)
    adj = graph.adjacency()
    gen = torch.Generator().manual_seed(seed)
    e0 = (torch.randn(graph.n_users + graph.n_rows, dim, generator=gen) * 0.1).requires_grad_()
    opt = torch.optim.Adam([e0], lr=lr)
    users, items = torch.as_tensor(graph.users), torch.as_tensor(graph.items)
    # negatives: uniform over the items the positive's market holds (one pool per market)
    pools = [torch.as_tensor(s.items.astype(np.int64)) for s in splits.values()]
    market_of = torch.as_tensor(np.searchsorted(
        np.asarray(list(graph.offsets.values())), graph.users, side="right") - 1)
    best_nd, best_epoch = -1.0, 0
    best_valid: dict[str, np.ndarray] = {}
    best_test: dict[str, np.ndarray] = {}
    test_adj = graph.adjacency(extra=valid_edges(graph, splits))
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(users), generator=gen)
        for s in range(0, len(users), batch_size):
            idx = order[s:s + batch_size]
            u, i, mk = users[idx], items[idx], market_of[idx]
            j = torch.empty_like(i)
            for k, pool in enumerate(pools):
                sel = (mk == k).nonzero(as_tuple=True)[0]
                if len(sel):
                    j[sel] = pool[torch.randint(len(pool), (len(sel),), generator=gen)]
            emb = propagate(adj, e0, layers)
            eu, ei, ej = emb[u], emb[graph.n_users + i], emb[graph.n_users + j]
            diff = (eu * (ei - ej)).sum(-1)
            reg = l2 * (e0[u].pow(2).sum() + e0[graph.n_users + i].pow(2).sum()
                        + e0[graph.n_users + j].pow(2).sum()) / (2 * len(idx))
            loss = -F.logsigmoid(diff).mean() + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % eval_every == 0 or epoch == max_epochs:
            with torch.no_grad():
                valid = _scores(propagate(adj, e0, layers), graph, splits, "valid")
                nd = _avg_ndcg(valid)
                if nd > best_nd:
                    best_nd, best_epoch, best_valid = nd, epoch, valid
                    best_test = _scores(propagate(test_adj, e0, layers), graph, splits, "test")
                elif epoch - best_epoch >= patience * eval_every:
                    break
    return LightGCNResult(layers=layers, l2=l2, epochs=best_epoch, valid_ndcg=best_nd,
                          valid_scores=best_valid, test_scores=best_test)


def tune_lightgcn(splits: Mapping[str, MarketSplit], n_items: int, seed: int,
                  grid: Sequence[tuple[int, float]] = LIGHTGCN_GRID,
                  max_epochs: int = 60) -> LightGCNResult:
    """The grid point and epoch count with the best average validation nDCG@10."""
    results = [train_lightgcn(splits, n_items, layers=k, l2=l2, seed=seed,
                              max_epochs=max_epochs) for k, l2 in grid]
    return max(results, key=lambda r: r.valid_ndcg)
