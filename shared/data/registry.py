"""The one registry of dataset readers: dataset name -> :class:`~shared.data.types.Reader`.

Why a registry: which reader serves a dataset used to be chosen by if-chains in two places (the
market listing and the read), and a third place special-cased the synthetic catalog; each new
dataset had to find all three. Now a dataset is one module exporting ``READER`` plus one line
here; :data:`DATASETS` (the CLI's choices, in this order) is derived from it, never written.
"""

from __future__ import annotations

from storefed.shared.data.amazon import READER as AMAZON_PAIRS
from storefed.shared.data.movielens import READER as MOVIELENS
from storefed.shared.data.synthetic import READER as SYNTHETIC
from storefed.shared.data.table import READER as TABLE
from storefed.shared.data.types import Reader
from storefed.shared.data.xmarket import READER as XMARKET
from storefed.shared.data.xmrec import READER as XMREC
from storefed.shared.errors import DataError

READERS: dict[str, Reader] = {
    r.name: r for r in (SYNTHETIC, TABLE, XMARKET, XMREC, MOVIELENS, AMAZON_PAIRS)
}
DATASETS: tuple[str, ...] = tuple(READERS)


def reader(dataset: str) -> Reader:
    """The reader registered for ``dataset``; DataError listing the known datasets otherwise."""
    found = READERS.get(dataset)
    if found is None:
        raise DataError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return found
