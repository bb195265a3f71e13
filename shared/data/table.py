"""Your own data: ``--dataset table``, one CSV of interactions with a column mapping.

Decision record
---------------
* **One file, any column names.** ``DIR/interactions.csv`` (or ``.csv.gz``): one row per
  interaction, a header line, comma separated (quotes as in any CSV). Its columns are mapped onto
  storefed's by ``DIR/columns.toml`` (``user = "customer_id"`` ...); without that file the
  columns are expected under storefed's own names. A mapping lives beside the data it describes,
  so a market's node reads it with the data and no run config has to carry it.
* **Columns.** ``user``, ``item``, ``market`` and ``timestamp`` are required; ``category``
  (default: one category, ``all``) and ``rating`` (read and checked; every row counts as one
  interaction) are optional. ``timestamp`` is a number (unix seconds) or any date/time pandas
  parses (``2024-03-01``, ``2024-03-01T10:15:00``); it orders a user's interactions for the
  split. Ids are strings, the same item id in every market (the public catalog).
* **Errors** name the file and line (or the mapping key), as every reader's do.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from storefed.shared.data.textio import (
    as_list,
    canonical,
    check_markets,
    file_key,
    require_dir,
    require_file,
    table_reader,
)
from storefed.shared.errors import DataError

FILE = "interactions.csv"
MAPPING = "columns.toml"
REQUIRED = ("user", "item", "market", "timestamp")
OPTIONAL = {"category": "all", "rating": "1"}


def column_mapping(data_dir: Path) -> dict[str, str]:
    """storefed column -> the file's column, from ``columns.toml`` (identity without it)."""
    names = {c: c for c in (*REQUIRED, *OPTIONAL)}
    path = data_dir / MAPPING
    if not path.is_file():
        return names
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise DataError(f"{path}: cannot read the column mapping: {exc}") from exc
    for key, value in raw.items():
        if key not in names:
            raise DataError(f"{path}: unknown column {key!r}; storefed's columns are "
                            f"{', '.join(names)}")
        if not isinstance(value, str) or not value:
            raise DataError(f"{path}: {key} must name a column of {FILE}, got {value!r}")
        names[key] = value
    return names


@functools.cache
def _read(path: Path, key: tuple[str, int, int], mapping: tuple[tuple[str, str], ...]
          ) -> pd.DataFrame:
    del key  # part of the cache key only: a changed file is read again
    names = dict(mapping)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a readable CSV: {exc}") from exc
    missing = [f"{c} ({names[c]!r})" for c in REQUIRED if names[c] not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the file has "
                        f"{', '.join(map(repr, raw.columns))} (map them in {MAPPING})")
    col = {c: (raw[names[c]] if names[c] in raw.columns else
               pd.Series([OPTIONAL[c]] * len(raw), dtype=str))
           for c in (*REQUIRED, *OPTIONAL)}
    for c in ("user", "item", "market", "category"):
        empty = col[c].str.strip() == ""
        if empty.any():
            raise DataError(f"{path} line {int(np.flatnonzero(empty)[0]) + 2}: empty {c}")
    rating = pd.to_numeric(col["rating"], errors="coerce")
    if rating.isna().any():
        row = int(np.flatnonzero(rating.isna())[0])
        raise DataError(f"{path} line {row + 2}: rating {col['rating'][row]!r} is not a number")
    return canonical(col["market"], col["user"], col["item"], col["category"],
                     rating.to_numpy(np.float32), _seconds(col["timestamp"], path))


def _seconds(values: pd.Series, path: Path) -> np.ndarray:
    """Unix seconds (N,) int64 from numbers or date/time strings."""
    numeric = pd.to_numeric(values, errors="coerce")
    if not numeric.isna().any():
        return numeric.to_numpy(np.float64).astype(np.int64)
    parsed = pd.to_datetime(values, errors="coerce", format="mixed", utc=True)
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path} line {row + 2}: timestamp {values[row]!r} is neither a number "
                        f"nor a date/time")
    return parsed.dt.tz_localize(None).to_numpy().astype("datetime64[s]").astype(np.int64)


def read_table(data_dir: Path, markets: Sequence[str] | None) -> pd.DataFrame:
    """The canonical table of the selected markets (all when None)."""
    path = require_file(data_dir / FILE)
    df = _read(path, file_key(path), tuple(sorted(column_mapping(data_dir).items())))
    known = sorted(df["market"].unique().tolist())
    chosen = check_markets(as_list(markets), known, f"table {data_dir}")
    return df[df["market"].isin(chosen)].reset_index(drop=True)


def list_markets(data_dir: str | Path | None) -> list[str]:
    """The markets named in the file, sorted."""
    d = require_dir(data_dir, "table")
    path = require_file(d / FILE)
    df = _read(path, file_key(path), tuple(sorted(column_mapping(d).items())))
    return sorted(df["market"].unique().tolist())


READER = table_reader("table", list_markets, read_table)
