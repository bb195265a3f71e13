"""A market's private item-item similarity (item-kNN), added to the model's logits.

Built from the market's **own** training interactions only (``fit_itemknn`` of
``shared.baselines``: cosine of binary co-occurrence over the market's users), it never leaves
the market and is never part of any state that travels: it is a pure function of data the market
already holds, so it is recomputed whenever a node starts and is not even saved with the heads.
The heads hold the (private) weight that mixes it into the logits at scoring time; the neural
score is trained without it (training both jointly measured worse on XMarket validation).

Why the market's own data and not a federated sum: measured on XMarket validation (7 markets,
seed 0, neural score of the 5-round federated model: avg nDCG@10 0.519), adding the market's own
item-kNN lifted it to 0.538, as much as the pooled (all markets) item-kNN did (0.539),
so there is nothing to gain from shipping co-occurrence statistics and nothing to protect
beyond what the market keeps anyway.

Scoring a user with history ``h_1..h_L`` against an item ``j``: ``sum_l sim(h_l, j)``, computed
for a whole batch at once by scattering each history item's neighbour row (CSR) into a dense
B x (n_items + 1) block and gathering the candidates' columns. The mixing weight is picked per
market on its validation split (``calibrate_weight``), like the classical baselines' settings.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from storefed.shared.baselines import fit_itemknn
from storefed.shared.data import MarketSplit
from storefed.shared.metrics import ndcg_hr_at_k


class ItemSimilarity(nn.Module):
    """Sparse symmetric cosine similarity over ``n_rows = n_items + 1`` item rows (the last
    row, padding, is empty). Buffers only, none persistent: it moves with ``.to(device)`` and
    never appears in a ``state_dict`` (so never in what travels or in saved heads)."""

    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    inv_sqrt_degree: torch.Tensor

    def __init__(self, n_rows: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                 degree: np.ndarray) -> None:
        super().__init__()
        self.n_rows = n_rows
        order = np.lexsort((cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        crow = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=crow[1:])
        inv = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
        self.register_buffer("crow", torch.as_tensor(crow), persistent=False)
        self.register_buffer("col", torch.as_tensor(cols.astype(np.int64)), persistent=False)
        self.register_buffer("val", torch.as_tensor(values.astype(np.float32)),
                             persistent=False)
        self.register_buffer("inv_sqrt_degree", torch.as_tensor(inv.astype(np.float32)),
                             persistent=False)

    @classmethod
    def from_split(cls, split: MarketSplit, n_items: int) -> ItemSimilarity:
        """Cosine item-kNN over the market's own training interactions (binary, per user);
        cached per split object (a client builds a node per message, from the cached split)."""
        return _from_split_cached(split, n_items)

    @classmethod
    def _build(cls, split: MarketSplit, n_items: int) -> ItemSimilarity:
        knn = fit_itemknn([split], n_items)
        rows, cols = knn.keys // knn.n_rows, knn.keys % knn.n_rows
        denom = np.sqrt(knn.degree[rows] * knn.degree[cols])
        return cls(knn.n_rows, rows, cols, knn.cooc / np.maximum(denom, 1e-12), knn.degree)

    def dense(self, history: torch.Tensor) -> torch.Tensor:
        """history B x L (padding = ``n_rows - 1``) -> B x n_rows: each item's summed
        similarity to the history's items."""
        pad = self.n_rows - 1
        b, pos = (history != pad).nonzero(as_tuple=True)
        h = history[b, pos]
        start = self.crow[h]
        count = self.crow[h + 1] - start
        out = torch.zeros(history.shape[0], self.n_rows, dtype=self.val.dtype,
                          device=history.device)
        total = int(count.sum())
        if total:
            first = torch.cumsum(count, 0) - count
            offs = (torch.arange(total, device=history.device)
                    - torch.repeat_interleave(first - start, count))
            out.index_put_((torch.repeat_interleave(b, count), self.col[offs]), self.val[offs],
                           accumulate=True)
        return out

    def scores(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history B x L, items B x C (per-user candidates) or I (one list shared by the
        batch) -> B x C or B x I summed similarities (no gradient: a fixed feature)."""
        with torch.no_grad():
            full = self.dense(history)
            if items.dim() == 1:
                return full[:, items]
            return torch.gather(full, 1, items)


@functools.lru_cache(maxsize=64)
def _from_split_cached(split: MarketSplit, n_items: int) -> ItemSimilarity:
    return ItemSimilarity._build(split, n_items)


#: mixing weights tried on the validation split (0 = the neural score alone)
KNN_WEIGHT_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def calibrate_weight(neural: torch.Tensor, knn: torch.Tensor,
                     grid: tuple[float, ...] = KNN_WEIGHT_GRID) -> float:
    """The weight ``a`` of ``grid`` whose ``neural + a * knn`` (U x C validation scores,
    positive in column 0) has the best nDCG@10; ties go to the smaller weight."""
    best, best_w = -1.0, 0.0
    for w in grid:
        nd = float(ndcg_hr_at_k((neural + w * knn).double(), 10)[0].mean()) if len(neural) \
            else 0.0
        if nd > best + 1e-12:
            best, best_w = nd, w
    return best_w
