"""Data loading for storefed: readers for the public datasets, the global catalog and the split.

Every reader returns the *canonical table*: columns exactly :data:`CANONICAL_COLUMNS`, with
``market``/``user``/``item``/``category`` as strings, ``rating`` float32 and ``timestamp`` int64
(unix seconds; for files without time the row order within the file, so order is preserved).

Every bad input raises :class:`shared.errors.DataError` with a message naming the file and the
1-based line number (the header line counts as line 1), or the key/directory that is wrong.

The evaluation protocol (:func:`split_market`) is chronological leave-one-out per user: the last
interaction is the test item, the second-to-last the validation item, the rest is training data;
each held-out positive is ranked against ``n_neg`` sampled negatives (or official candidates).
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import re
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from shared.errors import DataError

CANONICAL_COLUMNS = ("market", "user", "item", "category", "rating", "timestamp")
DATASETS = ("synthetic", "xmarket", "xmrec", "movielens", "amazon-pairs")

_XMARKET_COLUMNS = "userId itemId rate date"
_XMARKET_CORE_RE = re.compile(r"^([^_]+)_5core\.txt$")
_XMARKET_CAT_RE = re.compile(r"^ratings_([^_]+)_(.+)\.txt$")
_INT_RE = re.compile(r"-?[0-9]{1,18}")
_AMAZON_SHARDS = 4


# --------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class Catalog:
    """Global public item catalog shared by all markets.

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
    """One market's interactions after the leave-one-out split."""

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


# --------------------------------------------------------------------------- low-level parsing


def _resolve(path: Path) -> Path | None:
    """``path`` or ``path.gz``, whichever exists (plain preferred); None if neither."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gz
    return None


def _require_file(path: Path) -> Path:
    found = _resolve(path)
    if found is None:
        raise DataError(f"{path}[.gz]: file not found")
    return found


def _require_dir(data_dir: str | Path | None, dataset: str) -> Path:
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} needs a data_dir (got None)")
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: data directory for dataset {dataset!r} does not exist")
    return d


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from exc
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path} line {line}: not valid {encoding} text ({exc.reason})") from exc


class _Table:
    """Rows of a delimited text file, column-wise, with their 1-based line numbers."""

    def __init__(self, path: Path, cols: list[tuple[str, ...]], lines: np.ndarray) -> None:
        self.path = path
        self.cols = cols
        self.lines = lines

    def __len__(self) -> int:
        return int(self.lines.shape[0])

    def fail(self, row: int, msg: str) -> DataError:
        return DataError(f"{self.path} line {int(self.lines[row])}: {msg}")


_ODD_CHARS = re.compile("[\r\x00\t\x0b\x0c\x1c-\x1f]")


def _parse_fast(
    text: str, sep: str | None, columns: str, header_token: str | None
) -> tuple[list[tuple[str, ...]], int] | None:
    """pandas' C parser for the regular case (ASCII, exactly one separator between non-empty
    fields, no blank lines). Returns None whenever anything is irregular, so the slow exact
    parser can produce the error with its line number (or accept what this one declined)."""
    if not text.isascii():
        return None
    odd = _ODD_CHARS.search(text)
    if odd is not None and (sep is None or odd.group() != sep):
        return None
    n_cols = len(columns.split())
    delim = " " if sep is None else sep
    nl = text.find("\n")
    first_line = text if nl < 0 else text[:nl]
    first = 0
    if header_token is not None:
        tok = first_line.split(delim, 1)[0].strip().lower()
        if tok == header_token.lower():
            first = 1
            if first_line.count(delim) != n_cols - 1:
                return None
    body = text if first == 0 else ("" if nl < 0 else text[nl + 1 :])
    if not body:
        return None
    n_lines = body.count("\n") + (0 if body.endswith("\n") else 1)
    if body.count(delim) != (n_cols - 1) * n_lines:
        return None
    try:
        frame = pd.read_csv(
            io.StringIO(body),
            sep=delim,
            header=None,
            names=list(range(n_cols)),
            dtype=object,
            quoting=csv.QUOTE_NONE,
            na_filter=False,
            skip_blank_lines=False,
            engine="c",
        )
    except (ValueError, pd.errors.ParserError):
        return None
    if len(frame) != n_lines:
        return None
    out: list[Any] = []
    for c in range(n_cols):
        arr = frame[c].to_numpy(dtype=object)
        if (arr == "").any():
            return None
        out.append(arr)  # object array of str, used like a tuple
    return out, first


def _parse_table(
    path: Path,
    sep: str | None,
    columns: str,
    *,
    header_token: str | None = None,
    encoding: str = "utf-8",
) -> _Table:
    """Split a delimited file into columns.

    ``sep=None`` splits on runs of whitespace. ``columns`` is the space separated column
    description used in messages (its word count is the expected column count). If the first
    token of line 1 equals ``header_token`` (case-insensitively) line 1 is a header. Blank lines
    are skipped (they still count for line numbers).
    """
    text = _read_text(path, encoding)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    fast = _parse_fast(text, sep, columns, header_token)
    if fast is not None:
        cols, first = fast
        n = len(cols[0]) if cols else 0
        return _Table(path, cols, np.arange(first + 1, first + n + 1, dtype=np.int64))
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    n_cols = len(columns.split())
    rows = [ln.split() for ln in lines] if sep is None else [ln.split(sep) for ln in lines]
    first = 0
    if (
        header_token is not None
        and rows
        and rows[0]
        and (rows[0][0].strip().lower() == header_token.lower())
    ):
        if len(rows[0]) != n_cols:
            raise DataError(
                f"{path} line 1: header should have {n_cols} columns ({columns}), "
                f"got {len(rows[0])}"
            )
        first = 1
    bad = [i for i in range(first, len(rows)) if len(rows[i]) != n_cols]
    skip: list[int] = []
    for i in bad:
        if lines[i].strip() == "":
            skip.append(i)
            continue
        raise DataError(
            f"{path} line {i + 1}: expected {n_cols} columns ({columns}), got {len(rows[i])}"
        )
    if skip or first:
        skipset = set(skip)
        keep = [i for i in range(first, len(rows)) if i not in skipset]
        rows = [rows[i] for i in keep]
        line_no = np.asarray(keep, dtype=np.int64) + 1
    else:
        line_no = np.arange(1, len(rows) + 1, dtype=np.int64)
    columns_out: list[tuple[str, ...]] = (
        list(zip(*rows, strict=True)) if rows else [() for _ in range(n_cols)]
    )
    return _Table(path, columns_out, line_no)


def _floats(tab: _Table, col: int, what: str) -> np.ndarray:
    values = tab.cols[col]
    try:
        arr = np.asarray(values, dtype=str).astype(np.float64)
    except (ValueError, OverflowError):
        num = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
        arr = np.asarray(num, dtype=np.float64)
    ok = np.isfinite(arr)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise tab.fail(row, f"{what} {values[row]!r} is not a number")
    return arr


def _ints(tab: _Table, col: int, what: str) -> np.ndarray:
    values = tab.cols[col]
    try:
        text = np.asarray(values, dtype=str)
        if len(text) and not np.char.isdigit(np.char.lstrip(np.char.strip(text), "-")).all():
            raise ValueError("not all digits")
        return text.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    for row, v in enumerate(values):
        if _INT_RE.fullmatch(v.strip()) is None:
            raise tab.fail(row, f"{what} {v!r} is not an integer")
    raise tab.fail(0, f"{what}: cannot convert to int64")


def _dates(tab: _Table, col: int, what: str) -> np.ndarray:
    values = tab.cols[col]
    dt = pd.to_datetime(pd.Series(values, dtype=object), format="%Y-%m-%d", errors="coerce")
    bad = dt.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise tab.fail(row, f"{what} {values[row]!r} is not a YYYY-MM-DD date")
    return dt.to_numpy().astype("datetime64[s]").astype(np.int64)


def _ids(tab: _Table, col: int, what: str) -> np.ndarray:
    values = np.asarray(tab.cols[col], dtype=object)
    if len(values):
        empty = np.strings.str_len(np.strings.strip(values.astype(str))) == 0
        if empty.any():
            raise tab.fail(int(np.flatnonzero(empty)[0]), f"empty {what}")
    return values


def _canonical(
    market: object, user: object, item: object, category: object, rating: object, ts: object
) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "market": market,
            "user": user,
            "item": item,
            "category": category,
            "rating": rating,
            "timestamp": ts,
        }
    )
    return _coerce(df)


def _coerce(df: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(
        {
            "market": df["market"].astype(str),
            "user": df["user"].astype(str),
            "item": df["item"].astype(str),
            "category": df["category"].astype(str),
            "rating": df["rating"].astype(np.float32),
            "timestamp": df["timestamp"].astype(np.int64),
        }
    )
    return out.reset_index(drop=True)


def _empty_table() -> pd.DataFrame:
    return _canonical([], [], [], [], np.zeros(0, np.float32), np.zeros(0, np.int64))


def _as_list(markets: Sequence[str] | None) -> list[str] | None:
    if markets is None:
        return None
    if isinstance(markets, str):
        return [markets]
    return [str(m) for m in markets]


def _check_markets(wanted: list[str] | None, known: Sequence[str], where: str) -> list[str]:
    known_sorted = sorted(known)
    if not known_sorted:
        raise DataError(f"{where}: no markets found")
    if wanted is None:
        return known_sorted
    unknown = [m for m in wanted if m not in set(known_sorted)]
    if unknown:
        raise DataError(
            f"{where}: unknown market {unknown[0]!r}; known markets: {', '.join(known_sorted)}"
        )
    return list(dict.fromkeys(wanted))


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------- xmarket


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
    tab = _parse_table(path, None, _XMARKET_COLUMNS, header_token="userId")
    if len(tab) == 0:
        raise DataError(f"{path}: market {market!r} has no interaction rows")
    users = _ids(tab, 0, "userId")
    items = _ids(tab, 1, "itemId")
    rating = _floats(tab, 2, "rating")
    ts = _dates(tab, 3, "date")
    return _canonical(market, users, items, category, rating, ts)


def read_xmarket(data_dir: str | Path, markets: Sequence[str] | None = None) -> pd.DataFrame:
    """Read XMarket ``{market}_5core.txt[.gz]`` (category "Electronics") and/or the official
    per-category ``ratings_{market}_{Category}.txt[.gz]`` files (category from the file name).

    Columns ``userId itemId rate date`` (whitespace separated, date YYYY-MM-DD); the header line
    is optional. Sub-folders are ignored. Duplicates are kept (the split deduplicates).
    """
    d = _require_dir(data_dir, "xmarket")
    files = _xmarket_files(d)
    chosen = _check_markets(_as_list(markets), list(files), f"xmarket {d}")
    frames = [_read_xmarket_file(_file_key(p), m, cat) for m in chosen for p, cat in files[m]]
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- xmrec (WSDM Cup)


def _xmrec_markets(d: Path) -> list[str]:
    return sorted(
        p.name for p in d.iterdir() if p.is_dir() and _resolve(p / "train_5core.tsv") is not None
    )


@functools.lru_cache(maxsize=64)
def _read_xmrec_train(key: tuple[str, int, int], market: str) -> pd.DataFrame:
    path = Path(key[0])
    tab = _parse_table(path, "\t", "userId itemId rating", header_token="userId")
    if len(tab) == 0:
        raise DataError(f"{path}: market {market!r} has no interaction rows")
    users = _ids(tab, 0, "userId")
    items = _ids(tab, 1, "itemId")
    rating = _floats(tab, 2, "rating")
    ts = np.arange(len(tab), dtype=np.int64)
    return _canonical(market, users, items, "all", rating, ts)


@functools.lru_cache(maxsize=64)
def _read_xmrec_qrel(key: tuple[str, int, int]) -> pd.DataFrame:
    path = Path(key[0])
    tab = _parse_table(path, "\t", "userId itemId rating", header_token="userId")
    users = _ids(tab, 0, "userId")
    items = _ids(tab, 1, "itemId")
    _floats(tab, 2, "rating")
    return pd.DataFrame({"user": pd.Series(users, dtype=str), "item": pd.Series(items, dtype=str)})


@functools.lru_cache(maxsize=64)
def _read_xmrec_run(key: tuple[str, int, int]) -> dict[str, list[str]]:
    path = Path(key[0])
    tab = _parse_table(path, "\t", "userId items")
    users = _ids(tab, 0, "userId")
    run: dict[str, list[str]] = {}
    for row, (user, cands) in enumerate(zip(users, tab.cols[1], strict=True)):
        items = [c.strip() for c in cands.split(",")]
        if not all(items):
            raise tab.fail(row, "empty item id in the comma-separated candidate list")
        if user in run:
            raise tab.fail(row, f"user {user!r} listed twice")
        run[user] = items
    return run


def read_xmrec(
    data_dir: str | Path, markets: Sequence[str] | None = None
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, dict[str, list[str]]]]:
    """Read the WSDM Cup 2022 XMRec markets ``data_dir/<market>/``.

    Returns ``(train, qrels, runs)``: the canonical table of ``train_5core.tsv[.gz]``
    (category "all", timestamp = row order in the file), ``valid_qrel.tsv[.gz]`` per market as
    ``DataFrame(user, item)``, and the official ``valid_run.tsv[.gz]`` candidates
    (user -> list of item ids) for the markets that have one.
    """
    d = _require_dir(data_dir, "xmrec")
    chosen = _check_markets(_as_list(markets), _xmrec_markets(d), f"xmrec {d}")
    frames: list[pd.DataFrame] = []
    qrels: dict[str, pd.DataFrame] = {}
    runs: dict[str, dict[str, list[str]]] = {}
    for m in chosen:
        md = d / m
        frames.append(_read_xmrec_train(_file_key(_require_file(md / "train_5core.tsv")), m))
        qrels[m] = _read_xmrec_qrel(_file_key(_require_file(md / "valid_qrel.tsv"))).copy()
        run_path = _resolve(md / "valid_run.tsv")
        if run_path is not None:
            runs[m] = _read_xmrec_run(_file_key(run_path))
    return pd.concat(frames, ignore_index=True), qrels, runs


# --------------------------------------------------------------------------- movielens


def _zip_market(zipcode: str) -> str:
    z = zipcode.strip()
    return f"zip{z[0]}" if z and z[0] in "0123456789" else "intl"


def _movielens_meta(d: Path, min_category_items: int) -> tuple[dict[str, str], dict[str, str]]:
    """(user -> market, item -> category)."""
    gtab = _parse_table(_require_file(d / "u.genre"), "|", "name index", encoding="latin-1")
    gidx = _ints(gtab, 1, "genre index")
    genres = [name for _, name in sorted(zip(gidx.tolist(), gtab.cols[0], strict=True))]
    if not genres:
        raise DataError(f"{d / 'u.genre'}: no genres listed")

    utab = _parse_table(
        _require_file(d / "u.user"), "|", "user age gender occupation zip", encoding="latin-1"
    )
    _ints(utab, 0, "user id")
    user_market = {
        u.strip(): _zip_market(z) for u, z in zip(utab.cols[0], utab.cols[4], strict=True)
    }

    n_g = len(genres)
    item_cols = "item title release video url " + " ".join(f"g{i}" for i in range(n_g))
    itab = _parse_table(_require_file(d / "u.item"), "|", item_cols, encoding="latin-1")
    _ints(itab, 0, "item id")
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
    data_dir: str | Path, markets: Sequence[str] | None = None, min_category_items: int = 50
) -> pd.DataFrame:
    """Read MovieLens 100K (``u.data[.gz]``, ``u.user``, ``u.item``, ``u.genre``).

    Market = ZIP zone of the user: "zip0".."zip9" when the ZIP code starts with a digit, else
    "intl". Category = the first flagged genre of the movie in ``u.genre`` order ("unknown" if
    none); genres that are the first genre of fewer than ``min_category_items`` movies (counted
    over all of ``u.item``) are merged into "other". Item id = the movie id as str.
    """
    d = _require_dir(data_dir, "movielens")
    user_market, item_cat = _movielens_meta(d, min_category_items)
    tab = _parse_table(_require_file(d / "u.data"), "\t", "user item rating timestamp")
    _ints(tab, 0, "user id")
    _ints(tab, 1, "item id")
    users = np.asarray([u.strip() for u in tab.cols[0]], dtype=object)
    items = np.asarray([i.strip() for i in tab.cols[1]], dtype=object)
    rating = _floats(tab, 2, "rating")
    ts = _ints(tab, 3, "timestamp")
    mk = pd.Series(users, dtype=object).map(user_market)
    if mk.isna().any():
        row = int(np.flatnonzero(mk.isna().to_numpy())[0])
        raise tab.fail(row, f"user {users[row]!r} is not listed in u.user")
    cat = pd.Series(items, dtype=object).map(item_cat)
    if cat.isna().any():
        row = int(np.flatnonzero(cat.isna().to_numpy())[0])
        raise tab.fail(row, f"item {items[row]!r} is not listed in u.item")
    df = _canonical(mk.to_numpy(), users, items, cat.to_numpy(), rating, ts)
    if len(df) == 0:
        raise DataError(f"{tab.path}: no rating rows")
    chosen = _check_markets(
        _as_list(markets), sorted(df["market"].unique().tolist()), f"movielens {d}"
    )
    if markets is not None:
        df = df[df["market"].isin(chosen)].reset_index(drop=True)
    return df


# --------------------------------------------------------------------------- amazon pairs


def _amazon_pairs(d: Path) -> dict[str, list[tuple[str, str]]]:
    """canonical pair "A_B" (A < B) -> [(folder, domain)] for the folders that exist."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    for p in sorted(d.iterdir()):
        if not p.is_dir() or p.name.count("_") != 1:
            continue
        a, b = p.name.split("_")
        if not a or not b or a == b or _resolve(p / "train.txt") is None:
            continue
        pairs.setdefault("_".join(sorted((a, b))), []).append((p.name, a))
    return pairs


@functools.lru_cache(maxsize=16)
def _read_amazon_folder(
    train_key: tuple[str, int, int], test_key: tuple[str, int, int] | None, folder: str
) -> pd.DataFrame:
    """Columns user (int64), item (namespaced str), category, order (int64)."""
    domain = folder.split("_")[0]
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    for key in (train_key, test_key):
        if key is None:
            continue
        tab = _parse_table(Path(key[0]), "\t", "user item rating")
        users.append(_ints(tab, 0, "user id"))
        _ints(tab, 1, "item id")
        items.append(np.asarray(tab.cols[1], dtype=object))
        _floats(tab, 2, "rating")
    u = np.concatenate(users)
    it = pd.Series(np.concatenate(items), dtype=object).str.strip()
    return pd.DataFrame(
        {
            "user": u,
            "item": (folder + ":") + it,
            "category": domain,
            "order": np.arange(len(u), dtype=np.int64),
            "is_test": np.repeat([False, True][: len(users)], [len(x) for x in users]),
        }
    )


def read_amazon_pairs(data_dir: str | Path, markets: Sequence[str] | None = None) -> pd.DataFrame:
    """Read the DisenCDR Amazon pair folders ``<A>_<B>/train.txt[.gz]`` (+ ``test.txt``).

    Each unordered pair {A, B} (A < B) defines 4 markets ``f"{A}_{B}-{k}"``, k = int(user) % 4.
    Folder ``<A>_<B>`` gives category A's rows, ``<B>_<A>`` category B's rows for the same users.
    Item ids are remapped per folder, so they are namespaced by the folder: ``"sport_cloth:17"``.
    Timestamps: train rows of the first folder, then the second's, then the test rows (so the
    test items are each user's last interactions). Rating is 1.
    """
    d = _require_dir(data_dir, "amazon-pairs")
    pairs = _amazon_pairs(d)
    known = [f"{p}-{k}" for p in pairs for k in range(_AMAZON_SHARDS)]
    chosen = _check_markets(_as_list(markets), known, f"amazon-pairs {d}")
    by_pair: dict[str, list[int]] = {}
    for m in chosen:
        pair, k = m.rsplit("-", 1)
        by_pair.setdefault(pair, []).append(int(k))
    frames: list[pd.DataFrame] = []
    for pair in sorted(by_pair):
        parts = []
        for folder, _domain in pairs[pair]:
            train = _require_file(d / folder / "train.txt")
            test = _resolve(d / folder / "test.txt")
            parts.append(
                _read_amazon_folder(
                    _file_key(train), None if test is None else _file_key(test), folder
                )
            )
        df = pd.concat(parts, ignore_index=True)
        # order: all train rows (folder order), then all test rows (folder order)
        df["timestamp"] = np.lexsort((np.arange(len(df)), df["is_test"].to_numpy())).argsort()
        shard = df["user"].to_numpy() % _AMAZON_SHARDS
        keep = np.isin(shard, by_pair[pair])
        df = df[keep]
        frames.append(
            _canonical(
                [f"{pair}-{s}" for s in shard[keep]],
                df["user"].astype(str).to_numpy(),
                df["item"].to_numpy(),
                df["category"].to_numpy(),
                np.ones(len(df), np.float32),
                df["timestamp"].to_numpy(),
            )
        )
    out = pd.concat(frames, ignore_index=True)
    for m in chosen:
        if not (out["market"] == m).any():
            raise DataError(f"amazon-pairs {d}: market {m!r} has no interaction rows")
    return out


# --------------------------------------------------------------------------- synthetic


def generate_synthetic(
    n_markets: int = 4,
    n_categories: int = 4,
    n_items: int = 600,
    users_per_market: int = 150,
    interactions_per_user: int = 14,
    seed: int = 0,
) -> pd.DataFrame:
    """A deterministic synthetic multi-market table with a shared catalog.

    Items have latent vectors clustered by category and a power-law (Zipf) popularity; each
    market ("m0".."m{n-1}") has its own Dirichlet category preference and its own users with
    latent tastes. A user's items are drawn without replacement from
    softmax(user . item + log popularity + log market category preference) (Gumbel top-k), in
    increasing timestamps.
    """
    return _synthetic(
        n_markets, n_categories, n_items, users_per_market, interactions_per_user, seed
    )[0]


def _synthetic(
    n_markets: int,
    n_categories: int,
    n_items: int,
    users_per_market: int,
    interactions_per_user: int,
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(interactions, all items with their category)."""
    if min(n_markets, n_categories, n_items, users_per_market, interactions_per_user) < 1:
        raise DataError("generate_synthetic: all sizes must be >= 1")
    if interactions_per_user > n_items:
        raise DataError(
            f"generate_synthetic: interactions_per_user={interactions_per_user} "
            f"exceeds n_items={n_items}"
        )
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
        user_names = np.asarray([f"m{m}_u{u:04d}" for u in range(users_per_market)], dtype=object)
        frames.append(
            _canonical(
                f"m{m}",
                np.repeat(user_names, k),
                item_ids[flat],
                cat_names[item_cat[flat]],
                np.ones(flat.shape[0], np.float32),
                ts.reshape(-1),
            )
        )
    items = pd.DataFrame({"item": item_ids, "category": cat_names[item_cat]})
    return pd.concat(frames, ignore_index=True), items


# --------------------------------------------------------------------------- catalog and split


def build_catalog(df: pd.DataFrame) -> Catalog:
    """Catalog of the items in ``df``: items sorted by raw id, categories sorted by name.

    An item seen with several categories gets the alphabetically first one.
    """
    missing = [c for c in ("item", "category") if c not in df.columns]
    if missing:
        raise DataError(f"build_catalog: table lacks column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise DataError("build_catalog: empty table, no items")
    pairs = (
        pd.DataFrame({"item": df["item"].astype(str), "category": df["category"].astype(str)})
        .drop_duplicates()
        .sort_values(["item", "category"], kind="mergesort")
        .drop_duplicates("item", keep="first")
    )
    categories = tuple(sorted(set(pairs["category"].tolist())))
    cat_index = {c: i for i, c in enumerate(categories)}
    return Catalog(
        item_ids=tuple(pairs["item"].tolist()),
        item_category=np.asarray([cat_index[c] for c in pairs["category"]], dtype=np.int64),
        categories=categories,
    )


def _tail_matrix(
    values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, max_len: int, pad: int
) -> np.ndarray:
    """Row r = the last ``max_len`` of values[starts[r]: starts[r]+lengths[r]], right-padded."""
    n = int(lengths.shape[0])
    out = np.full((n, max_len), pad, dtype=np.int64)
    take = np.minimum(lengths, max_len).astype(np.int64)
    total = int(take.sum())
    if total == 0:
        return out
    rows = np.repeat(np.arange(n), take)
    offs = np.repeat(np.cumsum(take) - take, take)
    cols = np.arange(total) - offs
    src = np.repeat(starts + lengths - take, take) + cols
    out[rows, cols] = values[src]
    return out


def pad_histories(seqs: Sequence[np.ndarray], max_len: int, pad: int) -> np.ndarray:
    """Stack sequences into (len(seqs), max_len) int64: keep the most recent ``max_len`` of
    each (its tail), in order, right-padded with ``pad``."""
    if max_len < 1:
        raise DataError(f"max_history must be >= 1, got {max_len}")
    arrs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    lengths = np.asarray([a.shape[0] for a in arrs], dtype=np.int64)
    values = np.concatenate(arrs) if arrs else np.zeros(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    return _tail_matrix(values, starts, lengths, max_len, pad)


def _official_negatives(
    run: list[str], positive: int, catalog: Catalog, n_neg: int, market: str, user: str
) -> list[int]:
    index = catalog.index_of()
    ridx = []
    for c in run:
        if c not in index:
            raise DataError(
                f"market {market}: official run item {c!r} (user {user!r}) is not in the catalog"
            )
        ridx.append(index[c])
    if positive not in ridx:
        raise DataError(
            f"market {market}: official run of user {user!r} lacks the held-out item "
            f"{catalog.item_ids[positive]!r}"
        )
    others = [c for c in ridx if c != positive]
    if len(others) != n_neg:
        raise DataError(
            f"market {market}: official run of user {user!r} has {len(others)} negatives, "
            f"n_neg is {n_neg}"
        )
    return others


def _sample_negatives(
    rng: np.random.Generator,
    market_items: np.ndarray,
    local: np.ndarray,
    starts: np.ndarray,
    counts: np.ndarray,
    users: np.ndarray,
    n_neg: int,
    market: str,
    user_ids: np.ndarray,
) -> np.ndarray:
    """(len(users), n_neg) global item indices: per user, uniform without replacement over the
    market items the user never touched (``local[starts[u]: starts[u]+counts[u]]``, distinct).

    Sequential sampling: uniform draws in a fixed-width batch per user, dropping touched items
    and repeats; the first n_neg survivors are a uniform sample without replacement. Users whose
    batch falls short are redrawn one by one (with replacement when fewer than n_neg are free).
    """
    n_m = len(market_items)
    n_u = len(users)
    out = np.empty((n_u, n_neg), dtype=np.int64)
    if n_u == 0:
        return out
    ucount = counts[users]
    n_free = n_m - ucount
    if (n_free <= 0).any():
        u = int(users[int(np.flatnonzero(n_free <= 0)[0])])
        raise DataError(
            f"market {market}: user {user_ids[u]!r} touched all {n_m} items of the market; "
            "no negatives can be sampled"
        )
    width = int(np.ceil(1.3 * n_neg * n_m / max(1.0, float(np.median(n_free))))) + 16
    draw = rng.integers(0, n_m, size=(n_u, width), dtype=np.int64)
    row_of = np.arange(n_u, dtype=np.int64)
    total = int(ucount.sum())
    offs = np.arange(total) - np.repeat(np.cumsum(ucount) - ucount, ucount)
    pos = np.repeat(starts[users], ucount) + offs
    touched_keys = np.repeat(row_of, ucount) * n_m + local[pos]
    keys = (row_of[:, None] * n_m + draw).ravel()
    valid = ~np.isin(keys, touched_keys)
    first = np.zeros(keys.shape[0], dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    valid = (valid & first).reshape(n_u, width)
    csum = np.cumsum(valid, axis=1)
    ok = csum[:, -1] >= n_neg
    take = valid & (csum <= n_neg) & ok[:, None]
    out[ok] = draw[take].reshape(-1, n_neg)
    mask = np.zeros(n_m, dtype=bool)
    for r in np.flatnonzero(~ok).tolist():
        u = int(users[r])
        touched = local[starts[u] : starts[u] + counts[u]]
        mask[touched] = True
        if n_free[r] >= n_neg:
            pick = rng.choice(n_m, size=min(n_m, n_neg + len(touched)), replace=False)
            out[r] = pick[~mask[pick]][:n_neg]
        else:
            out[r] = rng.choice(np.flatnonzero(~mask), size=n_neg, replace=True)
        mask[touched] = False
    return market_items[out]


def split_market(
    df_market: pd.DataFrame,
    catalog: Catalog,
    *,
    n_neg: int = 99,
    seed: int = 0,
    max_history: int = 50,
    official_run: dict[str, list[str]] | None = None,
    heldout: pd.DataFrame | None = None,
) -> MarketSplit:
    """Chronological leave-one-out split of one market.

    Rows are stably sorted by timestamp within user; duplicate (user, item) rows keep the last
    occurrence. Per user with >= 3 interactions: last = test, second-to-last = valid, rest =
    train; users with fewer go entirely to train. ``heldout`` (columns user, item; at most one
    row per user) are explicit test rows appended after all of the user's rows, so the test item
    is the heldout row and valid is the last remaining row. ``official_run`` (user -> candidate
    ids containing the positive, 1 + n_neg of them) replaces sampled test negatives for the
    users it lists; the positive is moved to column 0, the other candidates keep their order.
    Negatives are drawn uniformly without replacement from the market's items the user never
    touched (with replacement if fewer than n_neg are left), with
    ``np.random.default_rng([seed, zlib.crc32(market.encode())])``; valid first, then test.
    """
    missing = [c for c in ("market", "user", "item", "timestamp") if c not in df_market.columns]
    if missing:
        raise DataError(f"split_market: table lacks column(s) {', '.join(missing)}")
    if n_neg < 1:
        raise DataError(f"split_market: n_neg must be >= 1, got {n_neg}")
    if max_history < 1:
        raise DataError(f"split_market: max_history must be >= 1, got {max_history}")
    if len(df_market) == 0:
        raise DataError("split_market: empty market (no interaction rows)")
    names = pd.unique(df_market["market"].astype(str))
    if len(names) != 1:
        raise DataError(f"split_market: expected one market, got {', '.join(sorted(names))}")
    market = str(names[0])

    users = df_market["user"].astype(str).to_numpy(dtype=object)
    items = df_market["item"].astype(str).to_numpy(dtype=object)
    ts = df_market["timestamp"].to_numpy(dtype=np.int64)
    if heldout is not None and len(heldout):
        hmiss = [c for c in ("user", "item") if c not in heldout.columns]
        if hmiss:
            raise DataError(f"market {market}: heldout table lacks column(s) {', '.join(hmiss)}")
        h_users = heldout["user"].astype(str).to_numpy(dtype=object)
        dup = pd.Series(h_users).duplicated()
        if dup.any():
            u = h_users[int(np.flatnonzero(dup.to_numpy())[0])]
            raise DataError(f"market {market}: heldout lists user {u!r} more than once")
        users = np.concatenate([users, h_users])
        items = np.concatenate([items, heldout["item"].astype(str).to_numpy(dtype=object)])
        ts = np.concatenate([ts, np.full(len(h_users), ts.max() + 1, dtype=np.int64)])

    index = catalog.index_of()
    mapped = pd.Series(items, dtype=object).map(index)
    if mapped.isna().any():
        bad = pd.unique(items[mapped.isna().to_numpy()])
        if len(bad) == len(pd.unique(items)):
            raise DataError(
                f"market {market}: none of its {len(bad)} items is in the catalog "
                f"(e.g. {bad[0]!r}); catalog and data come from different datasets?"
            )
        raise DataError(f"market {market}: {len(bad)} item(s) not in the catalog, e.g. {bad[0]!r}")
    item_idx = mapped.to_numpy(dtype=np.int64)

    user_ids, ucode = np.unique(users, return_inverse=True)
    ucode = ucode.astype(np.int64)
    order = np.lexsort((ts, ucode))
    u, it = ucode[order], item_idx[order]
    keep = ~pd.DataFrame({"u": u, "i": it}).duplicated(keep="last").to_numpy()
    u, it = u[keep], it[keep]
    n_users = len(user_ids)
    counts = np.bincount(u, minlength=n_users).astype(np.int64)
    starts = np.cumsum(counts) - counts
    eligible = counts >= 3
    pos = np.arange(len(u)) - starts[u]
    from_end = counts[u] - 1 - pos
    is_test = eligible[u] & (from_end == 0)
    is_valid = eligible[u] & (from_end == 1)
    is_train = ~(is_test | is_valid)
    pad = catalog.pad_index
    n_train_per_user = counts - 2 * eligible.astype(np.int64)
    train_hist = _tail_matrix(it, starts, n_train_per_user, max_history, pad)

    eval_users = np.flatnonzero(eligible).astype(np.int64)
    e_starts, e_counts = starts[eval_users], counts[eval_users]
    valid_pos, test_pos = it[is_valid], it[is_test]
    valid_hist = _tail_matrix(it, e_starts, e_counts - 2, max_history, pad)
    test_hist = _tail_matrix(it, e_starts, e_counts - 1, max_history, pad)

    market_items = np.unique(it)
    local = np.searchsorted(market_items, it)
    rng = np.random.default_rng([seed, zlib.crc32(market.encode())])

    def sample(rows: np.ndarray) -> np.ndarray:
        return _sample_negatives(
            rng, market_items, local, starts, counts, rows, n_neg, market, user_ids
        )

    valid_cand = np.empty((len(eval_users), 1 + n_neg), dtype=np.int64)
    test_cand = np.empty((len(eval_users), 1 + n_neg), dtype=np.int64)
    valid_cand[:, 0] = valid_pos
    test_cand[:, 0] = test_pos
    valid_cand[:, 1:] = sample(eval_users)
    official = np.zeros(len(eval_users), dtype=bool)
    if official_run:
        for r, user in enumerate(eval_users.tolist()):
            run = official_run.get(str(user_ids[user]))
            if run is None:
                continue
            official[r] = True
            test_cand[r, 1:] = _official_negatives(
                run, int(test_pos[r]), catalog, n_neg, market, str(user_ids[user])
            )
    test_cand[~official, 1:] = sample(eval_users[~official])

    return MarketSplit(
        market=market,
        user_ids=tuple(str(x) for x in user_ids),
        train_users=u[is_train].astype(np.int64),
        train_items=it[is_train].astype(np.int64),
        train_histories=train_hist,
        valid=EvalSet(users=eval_users, candidates=valid_cand, histories=valid_hist),
        test=EvalSet(users=eval_users.copy(), candidates=test_cand, histories=test_hist),
        items=market_items.astype(np.int64),
    )


# --------------------------------------------------------------------------- dataset level


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")


def _dir_key(data_dir: str | Path | None) -> str | None:
    return None if data_dir is None else str(data_dir)


def available_markets(dataset: str, data_dir: str | Path | None) -> list[str]:
    """Markets of ``dataset`` found in ``data_dir``, sorted (file/folder names only)."""
    _check_dataset(dataset)
    if dataset == "synthetic":
        return [f"m{m}" for m in range(4)]
    d = _require_dir(data_dir, dataset)
    if dataset == "xmarket":
        return sorted(_xmarket_files(d))
    if dataset == "xmrec":
        return _xmrec_markets(d)
    if dataset == "movielens":
        user_market, _ = _movielens_meta(d, 50)
        return sorted(set(user_market.values()))
    return sorted(f"{p}-{k}" for p in _amazon_pairs(d) for k in range(_AMAZON_SHARDS))


_Extras = dict[str, tuple[dict[str, list[str]] | None, pd.DataFrame | None]]


def _read(
    dataset: str, data_dir: str | None, markets: Sequence[str] | None, seed: int
) -> tuple[pd.DataFrame, _Extras]:
    """Canonical table of the selected markets + per-market (official_run, heldout)."""
    _check_dataset(dataset)
    if dataset == "synthetic":
        df = generate_synthetic(seed=seed)
        known = sorted(df["market"].unique().tolist())
        chosen = _check_markets(_as_list(markets), known, "synthetic")
        return df[df["market"].isin(chosen)].reset_index(drop=True), {}
    if dataset == "xmarket":
        return read_xmarket(_require_dir(data_dir, dataset), markets), {}
    if dataset == "movielens":
        return read_movielens(_require_dir(data_dir, dataset), markets), {}
    if dataset == "amazon-pairs":
        return read_amazon_pairs(_require_dir(data_dir, dataset), markets), {}
    train, qrels, runs = read_xmrec(_require_dir(data_dir, dataset), markets)
    extras: _Extras = {m: (runs.get(m), q) for m, q in qrels.items()}
    return train, extras


@functools.lru_cache(maxsize=16)
def _catalog_cached(dataset: str, data_dir: str | None, seed: int) -> Catalog:
    if dataset == "synthetic":
        return build_catalog(_synthetic(4, 4, 600, 150, 14, seed)[1])
    df, extras = _read(dataset, data_dir, None, seed)
    parts = [df[["item", "category"]]]
    for run, qrel in extras.values():
        extra_items: list[str] = []
        if qrel is not None:
            extra_items.extend(qrel["item"].astype(str).tolist())
        if run is not None:
            extra_items.extend(i for cands in run.values() for i in cands)
        parts.append(pd.DataFrame({"item": extra_items, "category": "all"}))
    return build_catalog(pd.concat(parts, ignore_index=True))


def load_catalog(dataset: str, data_dir: str | Path | None, *, seed: int = 0) -> Catalog:
    """The public catalog over ALL markets of the dataset (memoised), so every party indexes
    items identically. For xmrec it also covers the valid_qrel and official valid_run items."""
    _check_dataset(dataset)
    return _catalog_cached(dataset, _dir_key(data_dir), seed if dataset == "synthetic" else 0)


def _split_all(
    catalog: Catalog,
    df: pd.DataFrame,
    extras: _Extras,
    markets: list[str],
    *,
    seed: int,
    n_neg: int,
    max_history: int,
) -> dict[str, MarketSplit]:
    out: dict[str, MarketSplit] = {}
    groups = {str(k): g for k, g in df.groupby("market", sort=False)}
    for m in markets:
        g = groups.get(m)
        if g is None or len(g) == 0:
            raise DataError(f"market {m!r}: no interaction rows")
        run, heldout = extras.get(m, (None, None))
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
) -> Dataset:
    """Read, index and split the selected markets (all when ``markets`` is None).

    For xmrec the valid_qrel rows are the test items and the official valid_run (when present
    and of length 1 + n_neg) gives the test candidates.
    """
    catalog = load_catalog(dataset, data_dir, seed=seed)
    df, extras = _read(dataset, _dir_key(data_dir), markets, seed)
    names = _as_list(markets) or sorted(df["market"].unique().tolist())
    splits = _split_all(
        catalog,
        df,
        extras,
        list(dict.fromkeys(names)),
        seed=seed,
        n_neg=n_neg,
        max_history=max_history,
    )
    return Dataset(catalog=catalog, markets=splits)


@functools.lru_cache(maxsize=64)
def _load_market_cached(
    dataset: str, data_dir: str | None, market: str, seed: int, n_neg: int, max_history: int
) -> tuple[Catalog, MarketSplit]:
    catalog = load_catalog(dataset, data_dir, seed=seed)
    df, extras = _read(dataset, data_dir, [market], seed)
    splits = _split_all(
        catalog, df, extras, [market], seed=seed, n_neg=n_neg, max_history=max_history
    )
    return catalog, splits[market]


def load_market(
    dataset: str,
    data_dir: str | Path | None,
    market: str,
    *,
    seed: int = 0,
    n_neg: int = 99,
    max_history: int = 50,
) -> tuple[Catalog, MarketSplit]:
    """What one client calls: the public catalog plus its own market's split (memoised; the
    returned objects are shared between calls, do not mutate their arrays)."""
    _check_dataset(dataset)
    return _load_market_cached(dataset, _dir_key(data_dir), str(market), seed, n_neg, max_history)


def clear_caches(*modules: ModuleType) -> None:
    """Forget what every memoised (``functools.lru_cache``) function of ``modules`` holds in
    this process (default: this module's parsed files, catalogs and splits), so the next load
    starts cold, as a fresh ClientApp process does (benchmarks time both arms that way). The
    functions are found, not listed, so a new cache cannot be missed."""
    for module in modules or (sys.modules[__name__],):
        for obj in list(vars(module).values()):
            if callable(getattr(obj, "cache_clear", None)):
                obj.cache_clear()
