"""MovieLens 100K reader: the original GroupLens files ``u.data``, ``u.user``, ``u.item``,
``u.genre`` (``u.data`` may be gzipped).

Why these markets and categories: MovieLens has no storefronts, so a market is the user's ZIP
zone ("zip0".."zip9", or "intl" for a code that does not start with a digit): real geography,
uneven sizes. A movie's category (its head) is its first flagged genre in ``u.genre`` order, with
rare genres merged into "other" so no head trains on a handful of items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from storefed.shared.data.textio import (
    as_list,
    canonical,
    check_markets,
    floats,
    ints,
    parse_table,
    require_dir,
    require_file,
    table_reader,
)
from storefed.shared.errors import DataError

MIN_CATEGORY_ITEMS = 50  # a genre first-flagged on fewer movies is merged into "other"


def _zip_market(zipcode: str) -> str:
    z = zipcode.strip()
    return f"zip{z[0]}" if z and z[0] in "0123456789" else "intl"


def _movielens_meta(d: Path, min_category_items: int) -> tuple[dict[str, str], dict[str, str]]:
    """(user -> market, item -> category)."""
    gtab = parse_table(require_file(d / "u.genre"), "|", "name index", encoding="latin-1")
    gidx = ints(gtab, 1, "genre index")
    genres = [name for _, name in sorted(zip(gidx.tolist(), gtab.cols[0], strict=True))]
    if not genres:
        raise DataError(f"{d / 'u.genre'}: no genres listed")

    utab = parse_table(
        require_file(d / "u.user"), "|", "user age gender occupation zip", encoding="latin-1"
    )
    ints(utab, 0, "user id")
    user_market = {
        u.strip(): _zip_market(z) for u, z in zip(utab.cols[0], utab.cols[4], strict=True)
    }

    n_g = len(genres)
    item_cols = "item title release video url " + " ".join(f"g{i}" for i in range(n_g))
    itab = parse_table(require_file(d / "u.item"), "|", item_cols, encoding="latin-1")
    ints(itab, 0, "item id")
    if len(itab):
        flags = np.stack([np.asarray(itab.cols[5 + g], dtype=object) for g in range(n_g)], axis=1)
        valid = (flags == "0") | (flags == "1")
        if not valid.all():
            row, g = (int(x[0]) for x in np.nonzero(~valid))
            raise itab.fail(row, f"genre flag {genres[g]} is {flags[row, g]!r}, expected 0 or 1")
        is_set = flags == "1"
        first = np.where(is_set.any(axis=1), is_set.argmax(axis=1), -1)
    else:
        first = np.zeros(0, dtype=np.int64)
    first_name = ["unknown" if g < 0 else genres[g] for g in first.tolist()]
    counts: dict[str, int] = {}
    for name in first_name:
        counts[name] = counts.get(name, 0) + 1
    item_cat = {
        i.strip(): (name if counts[name] >= min_category_items else "other")
        for i, name in zip(itab.cols[0], first_name, strict=True)
    }
    return user_market, item_cat


def read_movielens(
    data_dir: str | Path,
    markets: Sequence[str] | None = None,
    min_category_items: int = MIN_CATEGORY_ITEMS,
) -> pd.DataFrame:
    """Read MovieLens 100K (``u.data[.gz]``, ``u.user``, ``u.item``, ``u.genre``).

    Market = ZIP zone of the user: "zip0".."zip9" when the ZIP code starts with a digit, else
    "intl". Category = the first flagged genre of the movie in ``u.genre`` order ("unknown" if
    none); genres that are the first genre of fewer than ``min_category_items`` movies (counted
    over all of ``u.item``) are merged into "other". Item id = the movie id as str.
    """
    d = require_dir(data_dir, "movielens")
    user_market, item_cat = _movielens_meta(d, min_category_items)
    tab = parse_table(require_file(d / "u.data"), "\t", "user item rating timestamp")
    ints(tab, 0, "user id")
    ints(tab, 1, "item id")
    users = np.asarray([u.strip() for u in tab.cols[0]], dtype=object)
    items = np.asarray([i.strip() for i in tab.cols[1]], dtype=object)
    rating = floats(tab, 2, "rating")
    ts = ints(tab, 3, "timestamp")
    mk = pd.Series(users, dtype=object).map(user_market)
    if mk.isna().any():
        row = int(np.flatnonzero(mk.isna().to_numpy())[0])
        raise tab.fail(row, f"user {users[row]!r} is not listed in u.user")
    cat = pd.Series(items, dtype=object).map(item_cat)
    if cat.isna().any():
        row = int(np.flatnonzero(cat.isna().to_numpy())[0])
        raise tab.fail(row, f"item {items[row]!r} is not listed in u.item")
    df = canonical(mk.to_numpy(), users, items, cat.to_numpy(), rating, ts)
    if len(df) == 0:
        raise DataError(f"{tab.path}: no rating rows")
    chosen = check_markets(
        as_list(markets), sorted(df["market"].unique().tolist()), f"movielens {d}"
    )
    if markets is not None:
        df = df[df["market"].isin(chosen)].reset_index(drop=True)
    return df


def list_markets(data_dir: str | Path | None) -> list[str]:
    """The ZIP-zone markets of the users listed in ``u.user``, sorted."""
    user_market, _ = _movielens_meta(require_dir(data_dir, "movielens"), MIN_CATEGORY_ITEMS)
    return sorted(set(user_market.values()))


READER = table_reader("movielens", list_markets, read_movielens)
