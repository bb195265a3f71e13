"""Dataset level: the markets a dataset has, its public catalog, the split of one market or of
many, and the caches behind them.

Why everything here is memoised: every ClientApp of every market calls :func:`load_market` each
round, and a simulation runs many of them in one process; parsing and splitting once per
(dataset, directory, market, seed, n_neg, max_history) makes a warm round cost no I/O. The
returned objects are shared, so callers must not mutate their arrays. :func:`clear_caches`
forgets every cache of the package at once (benchmarks time cold starts that way).

Why the catalog is built over ALL markets of a dataset, whichever markets a party loads: every
party must index items identically (the shared encoder's item rows), so the catalog depends on
the dataset alone (and on the seed only for a generated dataset, ``Reader.seeded``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pandas as pd

from storefed.shared.data.registry import reader
from storefed.shared.data.split import build_catalog, split_market
from storefed.shared.data.textio import as_list
from storefed.shared.data.types import (
    Catalog,
    Dataset,
    MarketExtras,
    MarketSplit,
    ReaderOptions,
    ReadResult,
)
from storefed.shared.errors import DataError

_PACKAGE = __name__.rpartition(".")[0]  # "storefed.shared.data"


def check_dataset(dataset: str) -> None:
    """DataError unless ``dataset`` is registered."""
    reader(dataset)


def _dir_key(data_dir: str | Path | None) -> str | None:
    return None if data_dir is None else str(data_dir)


def available_markets(dataset: str, data_dir: str | Path | None) -> list[str]:
    """Markets of ``dataset`` found in ``data_dir``, sorted (file/folder names only)."""
    return reader(dataset).list_markets(data_dir)


def _read(
    dataset: str,
    data_dir: str | None,
    markets: Sequence[str] | None,
    seed: int,
    options: ReaderOptions,
) -> ReadResult:
    """Canonical table of the selected markets + their extras (official run, heldout, extra
    training rows)."""
    return reader(dataset).read(data_dir, markets, seed, options)


@functools.lru_cache(maxsize=16)
def _catalog_cached(
    dataset: str, data_dir: str | None, seed: int, options: ReaderOptions
) -> Catalog:
    found = reader(dataset)
    if found.catalog_items is not None:
        return build_catalog(found.catalog_items(data_dir, seed))
    res = _read(dataset, data_dir, None, seed, options)
    parts = [res.table[["item", "category"]]]
    for run, qrel, extra_train in res.extras.values():
        extra_items: list[str] = []
        if qrel is not None:
            extra_items.extend(qrel["item"].astype(str).tolist())
        if run is not None:
            extra_items.extend(i for cands in run.values() for i in cands)
        if extra_train is not None:
            extra_items.extend(extra_train["item"].astype(str).tolist())
        parts.append(pd.DataFrame({"item": extra_items, "category": "all"}))
    return build_catalog(pd.concat(parts, ignore_index=True))


def load_catalog(
    dataset: str,
    data_dir: str | Path | None,
    *,
    seed: int = 0,
    options: ReaderOptions | None = None,
) -> Catalog:
    """The public catalog over ALL markets of the dataset (memoised), so every party indexes
    items identically. For xmrec it also covers the valid_qrel and official valid_run items, and
    the items of the extra training rows when ``options`` reads them (the default)."""
    seeded = reader(dataset).seeded
    opts = options or ReaderOptions()
    return _catalog_cached(dataset, _dir_key(data_dir), seed if seeded else 0, opts)


def _split_all(
    catalog: Catalog,
    res: ReadResult,
    markets: list[str],
    *,
    seed: int,
    n_neg: int,
    max_history: int,
) -> dict[str, MarketSplit]:
    out: dict[str, MarketSplit] = {}
    groups = {str(k): g for k, g in res.table.groupby("market", sort=False)}
    for m in markets:
        g = groups.get(m)
        if g is None or len(g) == 0:
            raise DataError(f"market {m!r}: no interaction rows")
        extras = res.extras.get(m, MarketExtras(None, None))
        run, heldout = extras.official_run, extras.heldout
        if run is not None and any(len(c) != n_neg + 1 for c in run.values()):
            run = None  # official candidate lists only fit n_neg = (their length - 1)
        out[m] = split_market(
            g,
            catalog,
            n_neg=n_neg,
            seed=seed,
            max_history=max_history,
            official_run=run,
            heldout=heldout,
            extra_train=extras.extra_train,
        )
    return out


def load_dataset(
    dataset: str,
    data_dir: str | Path | None,
    markets: Sequence[str] | None = None,
    *,
    seed: int = 0,
    n_neg: int = 99,
    max_history: int = 50,
    options: ReaderOptions | None = None,
) -> Dataset:
    """Read, index and split the selected markets (all when ``markets`` is None).

    For xmrec the valid_qrel rows are the test items and the official valid_run (when present
    and of length 1 + n_neg) gives the test candidates. ``options``: the readers' options
    (None = the defaults, :class:`ReaderOptions`).
    """
    opts = options or ReaderOptions()
    catalog = load_catalog(dataset, data_dir, seed=seed, options=opts)
    res = _read(dataset, _dir_key(data_dir), markets, seed, opts)
    names = as_list(markets) or sorted(res.table["market"].unique().tolist())
    splits = _split_all(
        catalog,
        res,
        list(dict.fromkeys(names)),
        seed=seed,
        n_neg=n_neg,
        max_history=max_history,
    )
    return Dataset(catalog=catalog, markets=splits)


@functools.lru_cache(maxsize=64)
def _load_market_cached(
    dataset: str,
    data_dir: str | None,
    market: str,
    seed: int,
    n_neg: int,
    max_history: int,
    options: ReaderOptions,
) -> tuple[Catalog, MarketSplit]:
    catalog = load_catalog(dataset, data_dir, seed=seed, options=options)
    res = _read(dataset, data_dir, [market], seed, options)
    splits = _split_all(catalog, res, [market], seed=seed, n_neg=n_neg, max_history=max_history)
    return catalog, splits[market]


def load_market(
    dataset: str,
    data_dir: str | Path | None,
    market: str,
    *,
    seed: int = 0,
    n_neg: int = 99,
    max_history: int = 50,
    options: ReaderOptions | None = None,
) -> tuple[Catalog, MarketSplit]:
    """What one client calls: the public catalog plus its own market's split (memoised; the
    returned objects are shared between calls, do not mutate their arrays). ``options``: the
    readers' options (None = the defaults); the server's catalog must use the same."""
    check_dataset(dataset)
    opts = options or ReaderOptions()
    return _load_market_cached(
        dataset, _dir_key(data_dir), str(market), seed, n_neg, max_history, opts
    )


def clear_caches(*modules: ModuleType) -> None:
    """Forget what every memoised (``functools.lru_cache``) function of ``modules`` holds in
    this process (default: this package's parsed files, catalogs and splits), so the next load
    starts cold, as a fresh ClientApp process does (benchmarks time both arms that way). A
    package stands for all of its loaded modules. The functions are found, not listed, so a new
    cache cannot be missed."""
    chosen: list[ModuleType] = []
    for module in modules or (sys.modules[_PACKAGE],):
        name = module.__name__
        chosen.append(module)
        if hasattr(module, "__path__"):  # a package: every loaded module under it
            chosen += [m for k, m in list(sys.modules.items()) if k.startswith(name + ".")]
    for module in chosen:
        for obj in list(vars(module).values()):
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()
