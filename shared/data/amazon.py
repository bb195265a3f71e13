"""Amazon cross-domain pairs reader: the DisenCDR folders ``<A>_<B>/train.txt[.gz]`` (and
``test.txt``), two product categories with shared users.

Why shards as markets: a pair has no countries, so its users are split into ``SHARDS`` markets
by ``int(user) % SHARDS`` (``f"{A}_{B}-{k}"``); each market then holds both categories (two
heads) for its own users. The test rows come last in time, so the leave-one-out split holds out
the published test items.
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
    ints,
    parse_table,
    require_dir,
    require_file,
    resolve,
    table_reader,
)
from storefed.shared.errors import DataError

SHARDS = 4  # markets per pair: user id modulo SHARDS


def _amazon_pairs(d: Path) -> dict[str, list[tuple[str, str]]]:
    """canonical pair "A_B" (A < B) -> [(folder, domain)] for the folders that exist."""
    pairs: dict[str, list[tuple[str, str]]] = {}
    for p in sorted(d.iterdir()):
        if not p.is_dir() or p.name.count("_") != 1:
            continue
        a, b = p.name.split("_")
        if not a or not b or a == b or resolve(p / "train.txt") is None:
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
        tab = parse_table(Path(key[0]), "\t", "user item rating")
        users.append(ints(tab, 0, "user id"))
        ints(tab, 1, "item id")
        items.append(np.asarray(tab.cols[1], dtype=object))
        floats(tab, 2, "rating")
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
    d = require_dir(data_dir, "amazon-pairs")
    pairs = _amazon_pairs(d)
    known = [f"{p}-{k}" for p in pairs for k in range(SHARDS)]
    chosen = check_markets(as_list(markets), known, f"amazon-pairs {d}")
    by_pair: dict[str, list[int]] = {}
    for m in chosen:
        pair, k = m.rsplit("-", 1)
        by_pair.setdefault(pair, []).append(int(k))
    frames: list[pd.DataFrame] = []
    for pair in sorted(by_pair):
        parts = []
        for folder, _domain in pairs[pair]:
            train = require_file(d / folder / "train.txt")
            test = resolve(d / folder / "test.txt")
            parts.append(
                _read_amazon_folder(
                    file_key(train), None if test is None else file_key(test), folder
                )
            )
        df = pd.concat(parts, ignore_index=True)
        # order: all train rows (folder order), then all test rows (folder order)
        df["timestamp"] = np.lexsort((np.arange(len(df)), df["is_test"].to_numpy())).argsort()
        shard = df["user"].to_numpy() % SHARDS
        keep = np.isin(shard, by_pair[pair])
        df = df[keep]
        frames.append(
            canonical(
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


def list_markets(data_dir: str | Path | None) -> list[str]:
    """``f"{pair}-{k}"`` for every pair folder found and every shard k, sorted."""
    d = require_dir(data_dir, "amazon-pairs")
    return sorted(f"{p}-{k}" for p in _amazon_pairs(d) for k in range(SHARDS))


READER = table_reader("amazon-pairs", list_markets, read_amazon_pairs)
