"""Text parsing shared by the dataset readers: files found plain or gzipped, delimited tables
split into columns with their line numbers, typed columns, the canonical table.

Every bad input raises :class:`shared.errors.DataError` with a message naming the file and the
1-based line number (the header line counts as line 1), or the key/directory that is wrong.

Why two parsers: pandas' C parser reads the regular case (ASCII, one separator between
non-empty fields) about ten times faster than splitting lines in Python, but its errors name no
line. So :func:`parse_table` tries it first and, on anything irregular, falls back to the exact
line-by-line parser, which accepts what the fast one declined or raises with the line number.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storefed.shared.data.types import Reader, ReaderOptions, ReadResult
from storefed.shared.errors import DataError

_INT_RE = re.compile(r"-?[0-9]{1,18}")


def resolve(path: Path) -> Path | None:
    """``path`` or ``path.gz``, whichever exists (plain preferred); None if neither."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    if gz.is_file():
        return gz
    return None


def require_file(path: Path) -> Path:
    """``path`` or ``path.gz``; DataError naming the path when neither exists."""
    found = resolve(path)
    if found is None:
        raise DataError(f"{path}[.gz]: file not found")
    return found


def require_dir(data_dir: str | Path | None, dataset: str) -> Path:
    """``data_dir`` as a Path; DataError when it is None or not a directory."""
    if data_dir is None:
        raise DataError(f"dataset {dataset!r} needs a data_dir (got None)")
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: data directory for dataset {dataset!r} does not exist")
    return d


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The decoded text of a plain or gzipped file; DataError with the line of a bad byte."""
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


class Table:
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


def parse_table(
    path: Path,
    sep: str | None,
    columns: str,
    *,
    header_token: str | None = None,
    encoding: str = "utf-8",
) -> Table:
    """Split a delimited file into columns.

    ``sep=None`` splits on runs of whitespace. ``columns`` is the space separated column
    description used in messages (its word count is the expected column count). If the first
    token of line 1 equals ``header_token`` (case-insensitively) line 1 is a header. Blank lines
    are skipped (they still count for line numbers).
    """
    text = read_text(path, encoding)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    fast = _parse_fast(text, sep, columns, header_token)
    if fast is not None:
        cols, first = fast
        n = len(cols[0]) if cols else 0
        return Table(path, cols, np.arange(first + 1, first + n + 1, dtype=np.int64))
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
    return Table(path, columns_out, line_no)


def floats(tab: Table, col: int, what: str) -> np.ndarray:
    """Column ``col`` as (len(tab),) float64; DataError at the first non-finite value."""
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


def ints(tab: Table, col: int, what: str) -> np.ndarray:
    """Column ``col`` as (len(tab),) int64; DataError at the first non-integer."""
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


def dates(tab: Table, col: int, what: str) -> np.ndarray:
    """Column ``col`` (YYYY-MM-DD) as (len(tab),) int64 unix seconds."""
    values = tab.cols[col]
    dt = pd.to_datetime(pd.Series(values, dtype=object), format="%Y-%m-%d", errors="coerce")
    bad = dt.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise tab.fail(row, f"{what} {values[row]!r} is not a YYYY-MM-DD date")
    return dt.to_numpy().astype("datetime64[s]").astype(np.int64)


def ids(tab: Table, col: int, what: str) -> np.ndarray:
    """Column ``col`` as a (len(tab),) object array of str; DataError at an empty id."""
    values = np.asarray(tab.cols[col], dtype=object)
    if len(values):
        empty = np.strings.str_len(np.strings.strip(values.astype(str))) == 0
        if empty.any():
            raise tab.fail(int(np.flatnonzero(empty)[0]), f"empty {what}")
    return values


def canonical(
    market: object, user: object, item: object, category: object, rating: object, ts: object
) -> pd.DataFrame:
    """The canonical table (``types.CANONICAL_COLUMNS``, their dtypes) of these columns."""
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


def as_list(markets: Sequence[str] | None) -> list[str] | None:
    """A market selection as a list (one name given as a str is one market); None = all."""
    if markets is None:
        return None
    if isinstance(markets, str):
        return [markets]
    return [str(m) for m in markets]


def check_markets(wanted: list[str] | None, known: Sequence[str], where: str) -> list[str]:
    """The markets ``wanted`` (all ``known``, sorted, when None), without repeats; DataError
    naming ``where`` for an unknown one or when none is known."""
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


def file_key(path: Path) -> tuple[str, int, int]:
    """(path, mtime_ns, size): the cache key of a parsed file, so an edited file is re-read."""
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def table_reader(name: str, list_markets: Callable[[str | Path | None], list[str]],
                 read_table: Callable[[Path, Sequence[str] | None], pd.DataFrame]) -> Reader:
    """A registry :class:`Reader` for a dataset read from a directory as one canonical table:
    no extras, and neither the seed nor the reader options change what is read."""

    def read(data_dir: str | Path | None, markets: Sequence[str] | None, seed: int,
             options: ReaderOptions) -> ReadResult:
        return ReadResult(read_table(require_dir(data_dir, name), markets))

    return Reader(name=name, list_markets=list_markets, read=read)

