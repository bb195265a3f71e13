"""Classical baselines, scored on exactly the same ``EvalSet`` candidates as the neural models.

* ``popularity``: a market's own training interaction counts per item.
* ``itemknn-pooled``: item-item cosine similarity over the training interactions of *all*
  markets pooled (binary user x item matrix, users are market-local so they never merge);
  a user's score for a candidate is the sum of its similarities to the user's history items.
* ``ease-pooled``: EASE (Steck, WWW 2019), the closed-form item-item linear model, over the
  training interactions of all markets pooled: ``B = I - P / diag(P)`` with
  ``P = (X^T X + lambda I)^-1``, zero diagonal; a user's score for a candidate is the sum of
  ``B[h, c]`` over the user's history items. ``lambda`` is picked on the validation split from
  ``EASE_LAMBDAS``. A centralised reference (it pools every market's data), not private.
* ``lightgcn-pooled``: LightGCN over every market's training data pooled (``shared/lightgcn.py``),
  layers / L2 / epochs picked on the validation split. A centralised reference, not private.
* ``bpr-mf-local``: matrix factorisation (user and item vectors + item bias) trained with the BPR
  loss on one market's training interactions, negatives uniform over the market's items; the
  dimension / L2 / number of epochs are picked on the validation split, then the test is scored.

Ties in a score are broken by a tiny multiple of the market's item popularity (far below any
real score difference), so a candidate the method cannot tell apart falls back to popularity
rather than to the pessimistic tie rule of ``shared.metrics``; this is stated in the benchmark
protocol line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from storefed.shared.data import EvalSet, MarketSplit
from storefed.shared.lightgcn import LIGHTGCN_GRID, tune_lightgcn
from storefed.shared.metrics import ndcg_hr_at_k, summarize

TIE_BREAK = 1e-9


def market_counts(split: MarketSplit, n_items: int) -> np.ndarray:
    """(n_items + 1,) training interactions per item in this market (last row: padding)."""
    return np.bincount(split.train_items, minlength=n_items + 1).astype(np.float64)


def score_metrics(scores: np.ndarray) -> dict[str, object]:
    """nDCG@10 / HR@10 summary of a U x C score matrix (positive in column 0)."""
    if scores.shape[0] == 0:
        return summarize(np.zeros(0), np.zeros(0))
    ndcg, hr = ndcg_hr_at_k(torch.from_numpy(np.asarray(scores, dtype=np.float64)), 10)
    return summarize(ndcg.numpy(), hr.numpy())


def _tie_break(counts: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    pop = np.log1p(counts)
    return TIE_BREAK * pop[candidates] / max(float(pop.max()), 1.0)


# --------------------------------------------------------------------------- popularity
def popularity_scores(split: MarketSplit, n_items: int, ev: EvalSet) -> np.ndarray:
    """U x C scores: the candidate's training count in this market."""
    return market_counts(split, n_items)[ev.candidates]


# --------------------------------------------------------------------------- pooled item-kNN
@dataclass(frozen=True)
class ItemKNN:
    """Sparse item-item co-occurrence (sorted keys ``i * n + j``) and item degrees."""

    n_rows: int  # n_items + 1 (padding row included, never co-occurs)
    keys: np.ndarray  # int64, sorted, unique
    cooc: np.ndarray  # float64, users holding both items
    degree: np.ndarray  # (n_rows,) float64, users holding each item

    def similarity(self, a: np.ndarray, b: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """Cosine similarity of item arrays ``a`` and ``b`` (same shape), 0 where unseen;
        ``alpha`` != 0.5: the asymmetric cosine ``cooc / (d_a^alpha d_b^(1 - alpha))``."""
        k = a.astype(np.int64) * self.n_rows + b.astype(np.int64)
        pos = np.searchsorted(self.keys, k.ravel())
        pos = np.minimum(pos, len(self.keys) - 1) if len(self.keys) else pos
        found = (self.keys[pos] == k.ravel()) if len(self.keys) else np.zeros(k.size, bool)
        co = np.where(found, self.cooc[pos] if len(self.keys) else 0.0, 0.0).reshape(k.shape)
        denom = (np.sqrt(self.degree[a] * self.degree[b]) if alpha == 0.5 else
                 np.power(self.degree[a], alpha) * np.power(self.degree[b], 1.0 - alpha))
        return np.where(denom > 0, co / np.where(denom > 0, denom, 1.0), 0.0)

    def scores(self, histories: np.ndarray, candidates: np.ndarray,
               batch: int = 512, alpha: float = 0.5) -> np.ndarray:
        """U x C: sum over the user's (non-padding) history items of sim(history, candidate)
        (``similarity`` with ``alpha``)."""
        pad = self.n_rows - 1
        out = np.zeros(candidates.shape, dtype=np.float64)
        for s in range(0, len(candidates), batch):
            h = histories[s:s + batch]
            c = candidates[s:s + batch]
            sim = self.similarity(np.broadcast_to(h[:, :, None], h.shape + (c.shape[1],)),
                                  np.broadcast_to(c[:, None, :], (c.shape[0],) + h.shape[1:]
                                                  + (c.shape[1],)), alpha)
            sim = np.where((h != pad)[:, :, None], sim, 0.0)
            out[s:s + batch] = sim.sum(axis=1)
        return out


def fit_itemknn(splits: Sequence[MarketSplit], n_items: int) -> ItemKNN:
    """Item-item cosine over the training interactions of all ``splits`` pooled."""
    n_rows = n_items + 1
    pair_keys: list[np.ndarray] = []
    degree = np.zeros(n_rows, dtype=np.float64)
    for split in splits:
        u, it = split.train_users, split.train_items
        ui = np.unique(u.astype(np.int64) * n_rows + it.astype(np.int64))  # distinct pairs
        u, it = ui // n_rows, ui % n_rows
        degree += np.bincount(it, minlength=n_rows)
        counts = np.bincount(u)
        starts = np.cumsum(counts) - counts
        # all ordered pairs (i, j), i != j, of each user's items, built per user-size group
        for size in np.unique(counts[counts > 1]).tolist():
            users = np.flatnonzero(counts == size)
            block = it[starts[users][:, None] + np.arange(size)]  # n_users x size
            a = np.repeat(block, size, axis=1)
            b = np.tile(block, (1, size))
            keep = a != b
            pair_keys.append((a[keep] * n_rows + b[keep]).astype(np.int64))
    if pair_keys:
        keys, cooc = np.unique(np.concatenate(pair_keys), return_counts=True)
    else:
        keys, cooc = np.zeros(0, np.int64), np.zeros(0, np.int64)
    return ItemKNN(n_rows=n_rows, keys=keys, cooc=cooc.astype(np.float64), degree=degree)


# --------------------------------------------------------------------------- EASE, pooled
EASE_LAMBDAS = (10.0, 50.0, 200.0, 500.0, 1000.0)


@dataclass(frozen=True)
class Ease:
    """EASE weights over the items ``knn`` has seen (degree > 0): an item nobody holds has no
    co-occurrence, so its block of ``(G + lam I)^-1`` is diagonal and its weights are exactly 0;
    solving on the held items alone gives the same scores at ``M^2`` instead of ``n_items^2``
    (a 2,922-item market: well under a second and 34 MB instead of 85 s and 700 MB)."""

    index: np.ndarray  # (n_rows,) int64 row of each item in ``b``, M (the zero row) where unseen
    b: torch.Tensor  # (M + 1) x (M + 1) float32, last row and column 0 (unseen items, padding)

    def scores(self, histories: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """U x C: sum over the user's history items h (padding scores 0) of B[h, c]."""
        h = torch.from_numpy(self.index[histories])
        c = torch.from_numpy(self.index[candidates])
        return self.b[h[:, :, None], c[:, None, :]].sum(dim=1).double().numpy()


def fit_ease(knn: ItemKNN, lam: float) -> Ease:
    """EASE from the Gram matrix ``X^T X`` (``knn``'s co-occurrence off the diagonal, item
    degrees on it): ``B = -P / diag(P)`` with ``P = (G + lam I)^-1``, ``diag(B) = 0``."""
    held = np.flatnonzero(knn.degree > 0)
    held = held[held != knn.n_rows - 1]
    m = len(held)
    index = np.full(knn.n_rows, m, dtype=np.int64)
    index[held] = np.arange(m)
    gram = torch.zeros((m + 1) * (m + 1), dtype=torch.float64)
    if len(knn.keys):
        i, j = index[knn.keys // knn.n_rows], index[knn.keys % knn.n_rows]
        keep = (i < m) & (j < m)
        gram[torch.from_numpy(i[keep] * (m + 1) + j[keep])] = torch.from_numpy(knn.cooc[keep])
    gram = gram.view(m + 1, m + 1)
    gram.diagonal()[:m].add_(torch.from_numpy(knn.degree[held]) + lam)
    gram[m, m] = 1.0
    p = torch.linalg.inv(gram)
    b = -p / p.diagonal()[None, :]
    b.fill_diagonal_(0.0)
    b[m, :] = 0.0
    b[:, m] = 0.0
    return Ease(index=index, b=b.float())


# --------------------------------------------------------------------------- BPR-MF per market
@dataclass(frozen=True)
class BPRResult:
    dim: int
    l2: float
    epochs: int
    valid_ndcg: float
    test_scores: np.ndarray
    valid_scores: np.ndarray


def _bpr_scores(p: torch.Tensor, q: torch.Tensor, bias: torch.Tensor,
                ev: EvalSet) -> np.ndarray:
    with torch.no_grad():
        u = p[torch.as_tensor(ev.users)]
        c = torch.as_tensor(ev.candidates)
        return ((u[:, None, :] * q[c]).sum(-1) + bias[c]).double().numpy()


def train_bpr_mf(split: MarketSplit, n_items: int, *, dim: int, l2: float, max_epochs: int,
                 seed: int, lr: float = 0.01, batch_size: int = 1024,
                 eval_every: int = 5, patience: int = 2) -> BPRResult:
    """BPR-MF on one market; keeps the epoch count with the best validation nDCG@10 and stops
    early once ``patience`` validations in a row did not improve on it."""
    gen = torch.Generator().manual_seed(seed)
    n_users = split.n_users
    p = (torch.randn(n_users, dim, generator=gen) * 0.1).requires_grad_()
    q = (torch.randn(n_items + 1, dim, generator=gen) * 0.1).requires_grad_()
    bias = torch.zeros(n_items + 1, requires_grad=True)
    opt = torch.optim.Adam([p, q, bias], lr=lr, fused=True)
    users = torch.as_tensor(split.train_users)
    items = torch.as_tensor(split.train_items)
    pool = torch.as_tensor(split.items)
    best: tuple[float, int, np.ndarray, np.ndarray] = (-1.0, 0, np.zeros(0), np.zeros(0))
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(len(users), generator=gen)
        for s in range(0, len(users), batch_size):
            idx = order[s:s + batch_size]
            u, i = users[idx], items[idx]
            j = pool[torch.randint(len(pool), (len(idx),), generator=gen)]
            pu, qi, qj = p[u], q[i], q[j]
            diff = (pu * (qi - qj)).sum(-1) + bias[i] - bias[j]
            reg = l2 * (pu.pow(2).sum() + qi.pow(2).sum() + qj.pow(2).sum()) / len(idx)
            loss = -F.logsigmoid(diff).mean() + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % eval_every == 0 or epoch == max_epochs:
            valid = _bpr_scores(p, q, bias, split.valid)
            nd = float(score_metrics(valid)["ndcg@10"])  # type: ignore[arg-type]
            if nd > best[0]:
                best = (nd, epoch, valid, _bpr_scores(p, q, bias, split.test))
            elif epoch - best[1] >= patience * eval_every:
                break
    return BPRResult(dim=dim, l2=l2, epochs=best[1], valid_ndcg=best[0],
                     valid_scores=best[2], test_scores=best[3])


BPR_GRID: tuple[tuple[int, float], ...] = ((64, 0.0), (64, 1e-2))


def tune_bpr_mf(split: MarketSplit, n_items: int, seed: int,
                grid: Sequence[tuple[int, float]] = BPR_GRID,
                max_epochs: int = 30) -> BPRResult:
    """The grid point (dim, l2) and epoch count with the best validation nDCG@10."""
    results = [train_bpr_mf(split, n_items, dim=d, l2=l2, max_epochs=max_epochs, seed=seed)
               for d, l2 in grid]
    return max(results, key=lambda r: r.valid_ndcg)


# --------------------------------------------------------------------------- per-market runners
def run_popularity(splits: Mapping[str, MarketSplit], n_items: int,
                   which: str = "test") -> dict[str, dict[str, object]]:
    out = {}
    for m, s in splits.items():
        ev = s.eval_set(which)
        out[m] = score_metrics(popularity_scores(s, n_items, ev))
    return out


def pooled_scores(scorer: ItemKNN | Ease, split: MarketSplit, n_items: int,
                  which: str = "test") -> np.ndarray:
    """U x C scores of a pooled model on one market's ``which`` candidates, ties broken by the
    market's popularity (as every classical baseline here)."""
    ev = split.eval_set(which)
    return scorer.scores(ev.histories, ev.candidates) + _tie_break(market_counts(split, n_items),
                                                                    ev.candidates)


def run_itemknn_pooled(splits: Mapping[str, MarketSplit], n_items: int,
                       which: str = "test") -> dict[str, dict[str, object]]:
    knn = fit_itemknn(list(splits.values()), n_items)
    return {m: score_metrics(pooled_scores(knn, s, n_items, which)) for m, s in splits.items()}


def fit_ease_pooled(splits: Mapping[str, MarketSplit], n_items: int,
                    knn: ItemKNN | None = None) -> tuple[Ease, float]:
    """EASE over all markets pooled, ``lambda`` (from ``EASE_LAMBDAS``) chosen on the markets'
    average validation nDCG@10 -> (the model, its lambda). ``knn``: the pooled item-kNN of the
    same ``splits`` when already fitted (its co-occurrence is EASE's Gram matrix)."""
    knn = knn or fit_itemknn(list(splits.values()), n_items)
    best: tuple[float, float, Ease] | None = None
    for lam in EASE_LAMBDAS:
        b = fit_ease(knn, lam)
        avg = float(np.mean([float(str(score_metrics(pooled_scores(b, s, n_items, "valid"))
                                       ["ndcg@10"])) for s in splits.values()]))
        if best is None or avg > best[0]:
            best = (avg, lam, b)
    assert best is not None
    return best[2], best[1]


def run_ease_pooled(splits: Mapping[str, MarketSplit], n_items: int,
                    which: str = "test") -> dict[str, dict[str, object]]:
    """EASE over all markets pooled (``fit_ease_pooled``); each market's metrics on ``which``
    (the chosen ``lambda`` is in every entry)."""
    ease, lam = fit_ease_pooled(splits, n_items)
    out = {}
    for m, s in splits.items():
        out[m] = score_metrics(pooled_scores(ease, s, n_items, which))
        out[m]["ease_lambda"] = lam
    return out


def run_bpr_mf_local(splits: Mapping[str, MarketSplit], n_items: int, seed: int,
                     grid: Sequence[tuple[int, float]] = BPR_GRID,
                     max_epochs: int = 30) -> dict[str, dict[str, object]]:
    out = {}
    for m, s in splits.items():
        res = tune_bpr_mf(s, n_items, seed, grid=grid, max_epochs=max_epochs)
        summary = score_metrics(res.test_scores)
        summary["tuned"] = {"dim": res.dim, "l2": res.l2, "epochs": res.epochs,
                            "valid_ndcg@10": res.valid_ndcg}
        out[m] = summary
    return out


def run_lightgcn_pooled(splits: Mapping[str, MarketSplit], n_items: int, seed: int,
                        grid: Sequence[tuple[int, float]] = LIGHTGCN_GRID,
                        max_epochs: int = 60) -> dict[str, dict[str, object]]:
    """LightGCN over all markets pooled, tuned on their average validation nDCG@10; each
    market's test metrics (the chosen setting in every entry)."""
    res = tune_lightgcn(splits, n_items, seed, grid=grid, max_epochs=max_epochs)
    out = {}
    for m, s in splits.items():
        scores = res.test_scores[m] + _tie_break(market_counts(s, n_items), s.test.candidates)
        summary = score_metrics(scores)
        summary["tuned"] = {"layers": res.layers, "l2": res.l2, "epochs": res.epochs,
                            "valid_ndcg@10": res.valid_ndcg}
        out[m] = summary
    return out
