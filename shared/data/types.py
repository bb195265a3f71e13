"""What the data layer hands out, and what a dataset reader hands in.

Out: :class:`Catalog` (the public item catalog every party indexes items by), :class:`EvalSet`,
:class:`MarketSplit` (one market after the leave-one-out split) and :class:`Dataset`.

In: a reader returns a :class:`ReadResult`: the *canonical table* (columns exactly
:data:`CANONICAL_COLUMNS`: ``market``/``user``/``item``/``category`` as str, ``rating`` float32,
``timestamp`` int64 unix seconds, or the row order within the file when the file has no time,
so order is preserved) plus, per market, the :class:`MarketExtras` some datasets ship (official
held-out positives and candidate lists). A :class:`Reader` is the one record the registry
(``shared/data/registry.py``) holds per dataset name.

Why a reader is a record of functions and not a class hierarchy: a reader has three jobs (list
markets, read a table, name the catalog's items) and no state; the record keeps each reader
module flat (plain functions, its own caches) and the registry a plain dict. The decisions that
are the same for every dataset (the catalog over all markets, the split, the caches keyed by
directory) live once in ``shared/data/load.py``, not in each reader.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

CANONICAL_COLUMNS = ("market", "user", "item", "category", "rating", "timestamp")


@dataclass(frozen=True, eq=False)
class Catalog:
    """Global public item catalog shared by all markets.

    ``item_category``: (n_items,) int64, the index into ``categories`` of each item.
    Equality and hashing go by :meth:`fingerprint` (item ids, categories and the mapping).
    """

    item_ids: tuple[str, ...]
    item_category: np.ndarray
    categories: tuple[str, ...]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def pad_index(self) -> int:
        """Index used to right-pad history matrices (one past the last item)."""
        return len(self.item_ids)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    def index_of(self) -> dict[str, int]:
        """Raw item id -> global item index (computed once, then cached; do not mutate)."""
        return self._index

    @functools.cached_property
    def _fingerprint(self) -> str:
        payload = json.dumps(
            [list(self.item_ids), list(self.categories), self.item_category.tolist()],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def fingerprint(self) -> str:
        """sha256 hex digest over item ids, categories and item->category map."""
        return self._fingerprint

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Catalog):
            return NotImplemented
        return self is other or self.fingerprint() == other.fingerprint()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __repr__(self) -> str:
        return (
            f"Catalog(n_items={self.n_items}, categories={self.categories!r}, "
            f"fingerprint={self.fingerprint()[:12]}...)"
        )


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Held-out positives of one split, ranked against negatives."""

    users: np.ndarray  # (U,) int64 market-local user index
    candidates: np.ndarray  # (U, 1 + n_neg) int64 global item idx; column 0 = held-out positive
    histories: np.ndarray  # (U, L) int64 known items before the held-out one, right-padded


@dataclass(frozen=True, eq=False)
class MarketSplit:
    """One market's interactions after the leave-one-out split.

    ``train_users`` / ``train_items``: (N,) int64, market-local user and global item index of
    each training row; ``train_histories``: (n_users, L) int64, each user's last L training
    items, right-padded with ``catalog.pad_index``; ``items``: (M,) int64 sorted global indices
    of the items the market holds.
    """

    market: str
    user_ids: tuple[str, ...]
    train_users: np.ndarray
    train_items: np.ndarray
    train_histories: np.ndarray
    valid: EvalSet
    test: EvalSet
    items: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_train(self) -> int:
        return int(self.train_users.shape[0])

    def eval_set(self, which: str) -> EvalSet:
        """The held-out set ``which`` names: ``"test"``, else the validation set."""
        return self.test if which == "test" else self.valid

    def __repr__(self) -> str:
        return (
            f"MarketSplit(market={self.market!r}, n_users={self.n_users}, n_train={self.n_train}, "
            f"n_valid={len(self.valid.users)}, n_test={len(self.test.users)}, "
            f"n_items={len(self.items)})"
        )


@dataclass(frozen=True, eq=False)
class Dataset:
    catalog: Catalog
    markets: dict[str, MarketSplit]


# --------------------------------------------------------------------------- reader interface


class MarketExtras(NamedTuple):
    """What a dataset ships beside one market's interactions.

    ``official_run``: user id -> official candidate item ids (the positive among them), or None;
    ``heldout``: DataFrame(user, item), at most one row per user, the official test positives;
    ``extra_train``: DataFrame(user, item) of training-only rows (never held out, never a
    held-out pair: the reader removes those), first in each user's history, or None.
    """

    official_run: dict[str, list[str]] | None
    heldout: pd.DataFrame | None
    extra_train: pd.DataFrame | None = None


@dataclass(frozen=True)
class ReaderOptions:
    """Options of the readers (hashable: part of every cache key). The defaults are what a run
    uses unless its run config says otherwise.

    ``xmrec_extra_train``: XMRec markets also train on ``train.tsv`` (explicit ratings read as
    implicit feedback) beside ``train_5core.tsv``, minus duplicates and held-out pairs.
    """

    xmrec_extra_train: bool = True

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> ReaderOptions:
        """The options a run config (``RunConfig.to_mapping()``, or the ``config`` a checkpoint
        keeps) asks for; a key it lacks keeps the default."""
        return cls(xmrec_extra_train=bool(config.get("xmrec-extra-train", True)))


@dataclass(frozen=True, eq=False)
class ReadResult:
    """A reader's output: the canonical table of the markets read, and their extras."""

    table: pd.DataFrame
    extras: dict[str, MarketExtras] = field(default_factory=dict)


@dataclass(frozen=True)
class Reader:
    """One dataset's reader, as the registry holds it.

    ``list_markets(dir)``: the markets found (sorted). ``read(dir, markets, seed, options)``: the
    selected markets (all when None; unknown ones raise ``DataError``). ``catalog_items(dir,
    seed)``: DataFrame(item, category) of every item the public catalog must index, or None to
    build it from ``read`` over all markets plus the items of their extras. ``dir`` is the
    data directory as the caller gave it (None for a generated dataset); a reader that needs
    one checks it (``textio.require_dir``). ``seeded``: whether the data depends on the seed
    (else every seed shares one catalog).
    """

    name: str
    list_markets: Callable[[str | Path | None], list[str]]
    read: Callable[[str | Path | None, Sequence[str] | None, int, ReaderOptions], ReadResult]
    catalog_items: Callable[[str | Path | None, int], pd.DataFrame] | None = None
    seeded: bool = False
