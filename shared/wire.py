"""The wire format of an encoder update, and its aggregation as sums.

A client sends, for every encoder tensor ``k`` (and nothing else):

* ``k``            -> ``w_k * (x_local_k - x_global_k)``  (weighted delta, float32)
* ``weight/k``     -> ``w_k``: shape (1,) for dense tensors (the number of training examples),
  or (rows,) for the item-embedding table when ``aggregation = "rowwise"`` (how many training
  interactions of this market touch each item row).

The server only needs the *sums* over clients: ``new_k = global_k + sum(w*delta) / sum(w)``
(rows whose summed weight is 0 keep their global value). With scalar weights this is exactly
FedAvg. Rowwise weighting stops FedAvg diluting an item row that only a few markets hold with
the zeros of every market that never saw it. Because only sums are needed, the same update can
go through secure aggregation unchanged: the server then never sees one market's update.
"""

from __future__ import annotations

import numpy as np
import torch

WEIGHT_PREFIX = "weight/"
ROWWISE_KEY = "encoder.item_emb.weight"


def make_update(local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor],
                n_examples: int, row_counts: np.ndarray | None) -> dict[str, np.ndarray]:
    """Weighted deltas + weights for every encoder tensor (see module doc)."""
    if set(local) != set(global_):
        raise KeyError(f"encoder keys differ: {sorted(set(local) ^ set(global_))}")
    out: dict[str, np.ndarray] = {}
    for k in sorted(local):
        delta = (local[k].float() - global_[k].float()).cpu().numpy()
        if k == ROWWISE_KEY and row_counts is not None:
            w = np.asarray(row_counts, dtype=np.float32)
            if w.shape != (delta.shape[0],):
                raise ValueError(f"row_counts has shape {w.shape}, expected ({delta.shape[0]},)")
            out[k] = (delta * w[:, None]).astype(np.float32)
        else:
            w = np.asarray([float(n_examples)], dtype=np.float32)
            out[k] = (delta * w[0]).astype(np.float32)
        out[WEIGHT_PREFIX + k] = w
    return out


def expected_update_shapes(global_: dict[str, torch.Tensor],
                           rowwise: bool) -> dict[str, tuple[int, ...]]:
    """The exact keys and shapes a valid update must have."""
    shapes: dict[str, tuple[int, ...]] = {}
    for k, v in global_.items():
        shapes[k] = tuple(v.shape)
        shapes[WEIGHT_PREFIX + k] = (v.shape[0],) if (rowwise and k == ROWWISE_KEY) else (1,)
    return shapes


def sum_updates(updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise sum of updates (what secure aggregation would hand the server)."""
    if not updates:
        raise ValueError("no updates to sum")
    keys = set(updates[0])
    out = {k: np.zeros_like(updates[0][k], dtype=np.float64) for k in keys}
    for u in updates:
        if set(u) != keys:
            raise KeyError(f"update keys differ: {sorted(set(u) ^ keys)}")
        for k in keys:
            out[k] += u[k]
    return out


def apply_summed_update(global_: dict[str, torch.Tensor],
                        summed: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``global + sum(w*delta)/sum(w)``; zero-weight rows/tensors keep the global value."""
    new: dict[str, torch.Tensor] = {}
    for k, g in global_.items():
        num = np.asarray(summed[k], dtype=np.float64)
        w = np.asarray(summed[WEIGHT_PREFIX + k], dtype=np.float64)
        if w.size == 1:
            step = num / w[0] if w[0] > 0 else np.zeros_like(num)
        else:
            wr = w.reshape((-1,) + (1,) * (num.ndim - 1))
            step = np.where(wr > 0, num / np.where(wr > 0, wr, 1.0), 0.0)
        new[k] = (g.double() + torch.from_numpy(step)).to(g.dtype)
    return new
