"""XMarket reader: the FOREC-processed ``{market}_5core.txt[.gz]`` files (category
"Electronics") and/or the official per-category ``ratings_{market}_{Category}.txt[.gz]`` files.

Why the directory listing is cached by mtime: every client of every market lists the directory,
and a directory of N markets holds O(N) files; a file added, removed or renamed changes the
directory's mtime, so the cache never serves a stale listing. Parsed files are cached by
(path, mtime, size) for the same reason. Duplicate (user, item) rows are kept here: the split
deduplicates, so every reader hands it the file as published.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from storefed.shared.data.textio import (
    as_list,
    canonical,
    check_markets,
    dates,
    file_key,
    floats,
    ids,
    parse_table,
    require_dir,
    table_reader,
)
from storefed.shared.errors import DataError

_XMARKET_COLUMNS = "userId itemId rate date"
_XMARKET_CORE_RE = re.compile(r"^([^_]+)_5core\.txt$")
_XMARKET_CAT_RE = re.compile(r"^ratings_([^_]+)_(.+)\.txt$")


def _xmarket_files(d: Path) -> dict[str, list[tuple[Path, str]]]:
    """market -> [(file, category)]; when both ``x.txt`` and ``x.txt.gz`` exist, ``x.txt``.

    Cached per directory until its mtime changes (a file added, removed or renamed): every
    client of every market calls this, and a directory of N markets holds O(N) files."""
    return _xmarket_files_cached(str(d), d.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _xmarket_files_cached(dir_name: str, mtime_ns: int) -> dict[str, list[tuple[Path, str]]]:
    d = Path(dir_name)
    by_base: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.is_file():
            base = p.name.removesuffix(".gz")
            if base not in by_base or not p.name.endswith(".gz"):
                by_base[base] = p
    out: dict[str, list[tuple[Path, str]]] = {}
    for base, p in sorted(by_base.items()):
        core = _XMARKET_CORE_RE.match(base)
        per_cat = _XMARKET_CAT_RE.match(base)
        if core:
            out.setdefault(core.group(1), []).append((p, "Electronics"))
        elif per_cat:
            out.setdefault(per_cat.group(1), []).append((p, per_cat.group(2)))
    return out


@functools.lru_cache(maxsize=64)
def _read_xmarket_file(key: tuple[str, int, int], market: str, category: str) -> pd.DataFrame:
    path = Path(key[0])
    tab = parse_table(path, None, _XMARKET_COLUMNS, header_token="userId")
    if len(tab) == 0:
        raise DataError(f"{path}: market {market!r} has no interaction rows")
    users = ids(tab, 0, "userId")
    items = ids(tab, 1, "itemId")
    rating = floats(tab, 2, "rating")
    ts = dates(tab, 3, "date")
    return canonical(market, users, items, category, rating, ts)


def read_xmarket(data_dir: str | Path, markets: Sequence[str] | None = None) -> pd.DataFrame:
    """Read XMarket ``{market}_5core.txt[.gz]`` (category "Electronics") and/or the official
    per-category ``ratings_{market}_{Category}.txt[.gz]`` files (category from the file name).

    Columns ``userId itemId rate date`` (whitespace separated, date YYYY-MM-DD); the header line
    is optional. Sub-folders are ignored. Duplicates are kept (the split deduplicates).
    """
    d = require_dir(data_dir, "xmarket")
    files = _xmarket_files(d)
    chosen = check_markets(as_list(markets), list(files), f"xmarket {d}")
    frames = [_read_xmarket_file(file_key(p), m, cat) for m in chosen for p, cat in files[m]]
    return pd.concat(frames, ignore_index=True)


def list_markets(data_dir: str | Path | None) -> list[str]:
    """The markets with at least one XMarket file in ``data_dir``, sorted."""
    return sorted(_xmarket_files(require_dir(data_dir, "xmarket")))


READER = table_reader("xmarket", list_markets, read_xmarket)
