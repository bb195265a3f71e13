"""The synthetic dataset: a deterministic multi-market table with a shared catalog, for tests,
demos and load tests (no files needed).

Why one :class:`SyntheticSpec`: the dataset's sizes are named once, in the spec's defaults
(:data:`SPEC`); the generator's keyword defaults, the market list and the catalog all read them
from there, so a change of size cannot leave the catalog and the markets disagreeing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from storefed.shared.data.textio import as_list, canonical, check_markets
from storefed.shared.data.types import Reader, ReaderOptions, ReadResult
from storefed.shared.errors import DataError


@dataclass(frozen=True)
class SyntheticSpec:
    """The sizes of a synthetic dataset."""

    n_markets: int = 4
    n_categories: int = 4
    n_items: int = 600
    users_per_market: int = 150
    interactions_per_user: int = 14

    def check(self) -> None:
        """DataError unless every size is >= 1 and a user can draw its items without repeats."""
        if min(astuple(self)) < 1:
            raise DataError("generate_synthetic: all sizes must be >= 1")
        if self.interactions_per_user > self.n_items:
            raise DataError(
                f"generate_synthetic: interactions_per_user={self.interactions_per_user} "
                f"exceeds n_items={self.n_items}"
            )


SPEC = SyntheticSpec()  # the ``synthetic`` dataset of the registry


def market_name(m: int) -> str:
    """The name of synthetic market number ``m``: "m0", "m1", ..."""
    return f"m{m}"


def generate_synthetic(
    n_markets: int = SPEC.n_markets,
    n_categories: int = SPEC.n_categories,
    n_items: int = SPEC.n_items,
    users_per_market: int = SPEC.users_per_market,
    interactions_per_user: int = SPEC.interactions_per_user,
    seed: int = 0,
) -> pd.DataFrame:
    """A deterministic synthetic multi-market table with a shared catalog.

    Items have latent vectors clustered by category and a power-law (Zipf) popularity; each
    market ("m0".."m{n-1}") has its own Dirichlet category preference and its own users with
    latent tastes. A user's items are drawn without replacement from
    softmax(user . item + log popularity + log market category preference) (Gumbel top-k), in
    increasing timestamps.
    """
    spec = SyntheticSpec(n_markets, n_categories, n_items, users_per_market, interactions_per_user)
    return synthesize(spec, seed)[0]


def synthesize(spec: SyntheticSpec, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions as the canonical table, DataFrame(item, category) of ALL items: the
    catalog, which also holds the items no user drew)."""
    spec.check()
    n_markets, n_categories, n_items = spec.n_markets, spec.n_categories, spec.n_items
    users_per_market, interactions_per_user = spec.users_per_market, spec.interactions_per_user
    rng = np.random.default_rng(seed)
    dim = 16
    centers = rng.normal(0.0, 1.0, size=(n_categories, dim))
    item_cat = rng.permutation(np.arange(n_items) % n_categories)
    item_vec = centers[item_cat] + 0.7 * rng.normal(size=(n_items, dim))
    rank = rng.permutation(n_items) + 1
    pop = rank.astype(np.float64) ** -1.1
    log_pop = np.log(pop / pop.sum())
    width = max(4, len(str(n_items - 1)))
    item_ids = np.asarray([f"i{i:0{width}d}" for i in range(n_items)], dtype=object)
    cat_names = np.asarray([f"c{c}" for c in range(n_categories)], dtype=object)

    frames: list[pd.DataFrame] = []
    k = interactions_per_user
    for m in range(n_markets):
        pref = rng.dirichlet(np.full(n_categories, 0.8))
        log_pref = np.log(pref * n_categories + 1e-9)
        main = rng.choice(n_categories, size=users_per_market, p=pref)
        taste = 1.2 * centers[main] + 0.8 * rng.normal(size=(users_per_market, dim))
        logits = 1.5 * taste @ item_vec.T / np.sqrt(dim) + log_pop + log_pref[item_cat]
        gumbel = -np.log(-np.log(rng.uniform(1e-12, 1.0, size=logits.shape)))
        picked = np.argsort(-(logits + gumbel), axis=1, kind="stable")[:, :k]
        start = 1_600_000_000 + rng.integers(0, 30 * 86400, size=(users_per_market, 1))
        steps = rng.integers(60, 3 * 86400, size=(users_per_market, k))
        ts = start + np.cumsum(steps, axis=1)
        flat = picked.reshape(-1)
        user_names = np.asarray(
            [f"{market_name(m)}_u{u:04d}" for u in range(users_per_market)], dtype=object
        )
        frames.append(
            canonical(
                market_name(m),
                np.repeat(user_names, k),
                item_ids[flat],
                cat_names[item_cat[flat]],
                np.ones(flat.shape[0], np.float32),
                ts.reshape(-1),
            )
        )
    items = pd.DataFrame({"item": item_ids, "category": cat_names[item_cat]})
    return pd.concat(frames, ignore_index=True), items


def list_markets(data_dir: str | Path | None) -> list[str]:
    """The markets of :data:`SPEC` (``data_dir`` is unused)."""
    return [market_name(m) for m in range(SPEC.n_markets)]


def read(
    data_dir: str | Path | None,
    markets: Sequence[str] | None,
    seed: int,
    options: ReaderOptions,
) -> ReadResult:
    """The selected markets of :data:`SPEC`'s table for ``seed``."""
    df = synthesize(SPEC, seed)[0]
    known = sorted(df["market"].unique().tolist())
    chosen = check_markets(as_list(markets), known, "synthetic")
    return ReadResult(df[df["market"].isin(chosen)].reset_index(drop=True))


def catalog_items(data_dir: str | Path | None, seed: int) -> pd.DataFrame:
    """Every item of :data:`SPEC`'s catalog for ``seed``, drawn by a user or not."""
    return synthesize(SPEC, seed)[1]


READER = Reader(
    name="synthetic",
    list_markets=list_markets,
    read=read,
    catalog_items=catalog_items,
    seeded=True,
)
