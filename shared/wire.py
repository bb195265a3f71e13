"""The wire format of an encoder update, and its aggregation as sums.

A client sends, for every encoder tensor ``k`` (and nothing else):

* ``k``            -> ``w_k * (x_local_k - x_global_k)``  (weighted delta, float32)
* ``weight/k``     -> ``w_k``: shape (1,) for dense tensors (the number of training examples),
  or (rows,) for the item-embedding table when ``aggregation = "rowwise"`` (how many training
  interactions of this market touch each item row).

The server only needs the *sums* over clients: ``new_k = global_k + sum(w*delta) / sum(w)``
(rows whose summed weight is 0 keep their global value). With scalar weights this is exactly
FedAvg. Rowwise weighting stops FedAvg diluting an item row that only a few markets hold with
the zeros of every market that never saw it; it is for plain FedAvg only: under secure
aggregation a row weight of an item only one market sells *is* that market's interaction count,
so there every tensor has one scalar weight per market (``shared/secagg.py``). Because only sums
are needed, the same update goes through secure aggregation unchanged.

On the wire (``to_record`` / ``from_record``) the named arrays of an update or of the global
encoder travel *packed*: one ``uint8`` buffer holding all their bytes plus a small JSON layout
(name, dtype, shape, offset). Flower 1.42 moves every ``Array`` of a message as its own object
(one HTTP request per object and hop in deployment), so a dozen small tensors cost a dozen
round trips per hop; packed they cost two. ``from_record`` also reads the plain one-``Array``-
per-tensor form, so either side can be older.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from storefed.shared.model import ITEM_EMB_KEY

if TYPE_CHECKING:  # Flower is imported where records are built: the maths runs without it
    from flwr.app import ArrayRecord

WEIGHT_PREFIX = "weight/"
ROWWISE_KEY = ITEM_EMB_KEY  # row-wise weights: one per item row
PACKED_KEY = "packed"
LAYOUT_KEY = "packed.layout"
_WIRE_DTYPES = frozenset({"float16", "float32", "float64", "int32", "int64", "uint8", "bool"})


def pack(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray]:
    """Named arrays -> ``{PACKED_KEY: uint8 buffer, LAYOUT_KEY: uint8 JSON layout}``."""
    layout: list[list[object]] = []
    parts: list[bytes] = []
    offset = 0
    for name in sorted(arrays):
        v = arrays[name]
        a = np.require(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v,
                       requirements="C")
        if a.dtype.name not in _WIRE_DTYPES:
            raise TypeError(f"array {name!r} has dtype {a.dtype}, not one the wire carries")
        raw = a.tobytes()
        layout.append([name, a.dtype.name, list(a.shape), offset])
        parts.append(raw)
        offset += len(raw)
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8) if parts else np.zeros(0, np.uint8)
    meta = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return {PACKED_KEY: buf, LAYOUT_KEY: meta}


def unpack(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``pack``; a malformed buffer or layout raises ``ValueError`` naming why
    (an update from a client is untrusted input)."""
    try:
        buf = np.asarray(packed[PACKED_KEY], dtype=np.uint8).reshape(-1)
        layout = json.loads(np.asarray(packed[LAYOUT_KEY], dtype=np.uint8).tobytes())
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"packed arrays unreadable: {exc}") from exc
    if not isinstance(layout, list):
        raise ValueError("packed layout is not a list")
    out: dict[str, np.ndarray] = {}
    for entry in layout:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ValueError(f"packed layout entry {entry!r} is not [name, dtype, shape, offset]")
        name, dtype, shape, offset = entry
        if (not isinstance(name, str) or dtype not in _WIRE_DTYPES or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offset, int) or offset < 0 or name in out):
            raise ValueError(f"packed layout entry {entry!r} is invalid")
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if offset + count * dt.itemsize > buf.size:
            raise ValueError(f"packed array {name!r} runs past the end of the buffer")
        out[name] = np.frombuffer(buf.data, dtype=dt, count=count,
                                  offset=offset).reshape(shape).copy()
    return out


def to_record(arrays: Mapping[str, np.ndarray | torch.Tensor]) -> ArrayRecord:
    """The ``ArrayRecord`` that carries ``arrays`` packed (see module doc)."""
    from flwr.app import Array, ArrayRecord  # noqa: PLC0415

    return ArrayRecord({k: Array(v) for k, v in pack(arrays).items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays from a packed or a plain ``ArrayRecord``."""
    if PACKED_KEY in record and LAYOUT_KEY in record:
        return unpack({k: record[k].numpy() for k in (PACKED_KEY, LAYOUT_KEY)})
    return {k: v.numpy() for k, v in record.items()}


def state_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A torch state dict from a packed or a plain ``ArrayRecord``."""
    return {k: torch.from_numpy(v) for k, v in from_record(record).items()}


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
