"""XMRec reader: the WSDM Cup 2022 cross-market challenge, ``data_dir/<market>/*.tsv[.gz]``.

A market is a sub-folder holding ``train_5core.tsv``. Its interactions are the 5-core file
(category "all", timestamp = row order in the file, which is the order the split keeps); its
extras are the official test positives (``valid_qrel.tsv``: the split appends them after each
user's rows, so they are the test items) and, where the market ships one, the official 100
candidates per user (``valid_run.tsv``: the test candidates). The challenge's ``valid_*`` files
are storefed's *test* split because the challenge's test positives were never released;
storefed's validation item is each user's last ``train_5core`` row.

Extra training rows (``ReaderOptions.xmrec_extra_train``, on by default): where a market ships
``train.tsv`` (explicit 1-5 ratings, more rows, other users and items; s1 ships none), its rows
are read as implicit feedback (every rating is a positive, as the challenge's winning team did)
and handed to the split as *training-only* rows (``MarketExtras.extra_train``): they come first
in each user's history, their users who are not 5-core users are never evaluated, and the
benchmark (5-core users, ``valid_qrel``, official runs) is unchanged. Why the removals are here
and nowhere else (:func:`extra_rows`): ``train.tsv`` repeats most 5-core pairs, including each
user's last 5-core row, which the split holds out as the validation positive, and often the
``valid_qrel`` pair, the test positive. A training row equal to a held-out pair is a leak, so
every pair of ``train_5core`` and of ``valid_qrel`` is removed from the extra rows (and
repeated extra pairs are kept once); the split refuses any extra row that still repeats a
held-out positive.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from storefed.shared.data.textio import (
    as_list,
    canonical,
    check_markets,
    file_key,
    floats,
    ids,
    parse_table,
    require_dir,
    require_file,
    resolve,
)
from storefed.shared.data.types import MarketExtras, Reader, ReaderOptions, ReadResult
from storefed.shared.errors import DataError


def _xmrec_markets(d: Path) -> list[str]:
    return sorted(
        p.name for p in d.iterdir() if p.is_dir() and resolve(p / "train_5core.tsv") is not None
    )


@functools.lru_cache(maxsize=64)
def _read_xmrec_train(key: tuple[str, int, int], market: str) -> pd.DataFrame:
    path = Path(key[0])
    tab = parse_table(path, "\t", "userId itemId rating", header_token="userId")
    if len(tab) == 0:
        raise DataError(f"{path}: market {market!r} has no interaction rows")
    users = ids(tab, 0, "userId")
    items = ids(tab, 1, "itemId")
    rating = floats(tab, 2, "rating")
    ts = np.arange(len(tab), dtype=np.int64)
    return canonical(market, users, items, "all", rating, ts)


@functools.lru_cache(maxsize=64)
def _read_pairs(key: tuple[str, int, int]) -> pd.DataFrame:
    """(user, item) of a ``userId itemId rating`` file (``valid_qrel.tsv``, ``train.tsv``);
    ratings are checked, then read as implicit feedback."""
    path = Path(key[0])
    tab = parse_table(path, "\t", "userId itemId rating", header_token="userId")
    users = ids(tab, 0, "userId")
    items = ids(tab, 1, "itemId")
    floats(tab, 2, "rating")
    return pd.DataFrame({"user": pd.Series(users, dtype=str), "item": pd.Series(items, dtype=str)})


@functools.lru_cache(maxsize=64)
def _read_xmrec_run(key: tuple[str, int, int]) -> dict[str, list[str]]:
    path = Path(key[0])
    tab = parse_table(path, "\t", "userId items")
    users = ids(tab, 0, "userId")
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
    d = require_dir(data_dir, "xmrec")
    chosen = check_markets(as_list(markets), _xmrec_markets(d), f"xmrec {d}")
    frames: list[pd.DataFrame] = []
    qrels: dict[str, pd.DataFrame] = {}
    runs: dict[str, dict[str, list[str]]] = {}
    for m in chosen:
        md = d / m
        frames.append(_read_xmrec_train(file_key(require_file(md / "train_5core.tsv")), m))
        qrels[m] = _read_pairs(file_key(require_file(md / "valid_qrel.tsv"))).copy()
        run_path = resolve(md / "valid_run.tsv")
        if run_path is not None:
            runs[m] = _read_xmrec_run(file_key(run_path))
    return pd.concat(frames, ignore_index=True), qrels, runs


def list_markets(data_dir: str | Path | None) -> list[str]:
    """The sub-folders of ``data_dir`` holding a ``train_5core.tsv[.gz]``, sorted."""
    return _xmrec_markets(require_dir(data_dir, "xmrec"))


def extra_rows(extra: pd.DataFrame, core: pd.DataFrame, qrel: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``extra`` (user, item) that may train: without any (user, item) pair of
    ``core`` (the 5-core rows: duplicates, and each user's last row, the validation positive)
    or of ``qrel`` (the test positives), each remaining pair once, in file order."""
    rows = extra[["user", "item"]].astype(str).drop_duplicates(keep="first")
    held = pd.concat([core[["user", "item"]], qrel[["user", "item"]]]).astype(str)
    keys = pd.MultiIndex.from_frame(rows)
    keep = ~keys.isin(pd.MultiIndex.from_frame(held))
    return rows[keep].reset_index(drop=True)


def read_xmrec_extra(
    data_dir: str | Path, markets: Sequence[str] | None = None
) -> dict[str, pd.DataFrame]:
    """Market -> DataFrame(user, item) of its ``train.tsv[.gz]`` rows that may train
    (:func:`extra_rows`), for the selected markets that ship one."""
    d = require_dir(data_dir, "xmrec")
    chosen = check_markets(as_list(markets), _xmrec_markets(d), f"xmrec {d}")
    train, qrels, _ = read_xmrec(d, chosen)
    out: dict[str, pd.DataFrame] = {}
    for m in chosen:
        path = resolve(d / m / "train.tsv")
        if path is not None:
            core = train[train["market"] == m]
            out[m] = extra_rows(_read_pairs(file_key(path)), core, qrels[m])
    return out


def read(
    data_dir: str | Path | None,
    markets: Sequence[str] | None,
    seed: int,
    options: ReaderOptions,
) -> ReadResult:
    """:func:`read_xmrec` for the registry: per market, the official run (when shipped), the
    ``valid_qrel`` rows as the held-out test positives and, with ``options.xmrec_extra_train``,
    the cleaned ``train.tsv`` rows as training-only rows (``seed`` is unused)."""
    d = require_dir(data_dir, "xmrec")
    train, qrels, runs = read_xmrec(d, markets)
    extra = read_xmrec_extra(d, markets) if options.xmrec_extra_train else {}
    return ReadResult(
        train, {m: MarketExtras(runs.get(m), q, extra.get(m)) for m, q in qrels.items()}
    )


READER = Reader(name="xmrec", list_markets=list_markets, read=read)
