"""Data for storefed: readers for the public datasets, the global catalog and the split.

The package, by layer (imports point down only; no module uses another's private names):

* ``types``     - the containers (:class:`Catalog`, :class:`EvalSet`, :class:`MarketSplit`,
  :class:`Dataset`) and the reader interface (:class:`Reader`, :class:`ReadResult`).
* ``textio``    - parsing shared by the readers (plain or gzipped files, typed columns, errors
  with file and line number, the canonical table).
* ``table`` (your own CSV), ``xmarket``, ``xmrec``, ``movielens``, ``amazon``, ``synthetic`` -
  one reader per dataset, each exporting ``READER``.
* ``registry``  - dataset name -> reader; :data:`DATASETS` is its keys. A new dataset is a new
  reader module plus one entry there.
* ``split``     - the public catalog and the chronological leave-one-out split.
* ``load``      - markets, catalog, dataset and market loading, memoised; :func:`clear_caches`.

This module only re-exports the public names importers use
(``from storefed.shared.data import ...``).
"""

from __future__ import annotations

from storefed.shared.data.amazon import read_amazon_pairs
from storefed.shared.data.load import (
    available_markets,
    clear_caches,
    load_catalog,
    load_dataset,
    load_market,
)
from storefed.shared.data.movielens import read_movielens
from storefed.shared.data.registry import DATASETS, READERS
from storefed.shared.data.split import build_catalog, pad_histories, split_market
from storefed.shared.data.synthetic import SPEC as SYNTHETIC_SPEC
from storefed.shared.data.synthetic import SyntheticSpec, generate_synthetic
from storefed.shared.data.types import (
    CANONICAL_COLUMNS,
    Catalog,
    Dataset,
    EvalSet,
    MarketExtras,
    MarketSplit,
    Reader,
    ReaderOptions,
    ReadResult,
)
from storefed.shared.data.xmarket import read_xmarket
from storefed.shared.data.xmrec import extra_rows as xmrec_extra_rows
from storefed.shared.data.xmrec import read_xmrec, read_xmrec_extra

__all__ = [
    "CANONICAL_COLUMNS",
    "DATASETS",
    "READERS",
    "SYNTHETIC_SPEC",
    "Catalog",
    "Dataset",
    "EvalSet",
    "MarketExtras",
    "MarketSplit",
    "ReadResult",
    "Reader",
    "ReaderOptions",
    "SyntheticSpec",
    "available_markets",
    "build_catalog",
    "clear_caches",
    "generate_synthetic",
    "load_catalog",
    "load_dataset",
    "load_market",
    "pad_histories",
    "read_amazon_pairs",
    "read_movielens",
    "read_xmarket",
    "read_xmrec",
    "read_xmrec_extra",
    "split_market",
    "xmrec_extra_rows",
]
