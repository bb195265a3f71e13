"""The public catalog and the evaluation protocol: chronological leave-one-out per user.

Per user, rows are stably sorted by timestamp and deduplicated by (user, item), keeping the last
occurrence; the last interaction is the test item, the second-to-last the validation item, the
rest is training data (users with fewer than 3 interactions go entirely to training). Each
held-out positive is ranked against ``n_neg`` negatives: official candidates where the dataset
ships them, else sampled uniformly without replacement from the market's items the user never
touched.

Why the split is deterministic per market and not per dataset: negatives are drawn with
``np.random.default_rng([seed, zlib.crc32(market)])``, valid first, then test, so a client that
loads only its own market gets exactly the split the benchmark computes over all markets.
:func:`split_market` is a chain of small steps (:func:`_market_of` -> :func:`_rows` ->
:func:`_item_indices` -> :func:`_user_rows` -> histories -> :func:`_negatives`) whose order of
random draws is part of the contract: reordering them changes every sampled negative.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from storefed.shared.data.types import Catalog, EvalSet, MarketSplit
from storefed.shared.errors import DataError


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
    """The n_neg catalog indices of ``run`` other than ``positive``, in the run's order;
    DataError when the run lacks the positive, names an unknown item or has another length."""
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


@dataclass(frozen=True, eq=False)
class _UserRows:
    """A market's rows grouped by user (users in sorted id order), time-ordered, deduplicated.

    ``u``/``it``: (N,) int64 user code and global item index per row; ``counts``/``starts``:
    (n_users,) int64, user k's rows are ``[starts[k], starts[k] + counts[k])``.
    """

    user_ids: np.ndarray
    u: np.ndarray
    it: np.ndarray
    counts: np.ndarray
    starts: np.ndarray


def _market_of(df_market: pd.DataFrame, n_neg: int, max_history: int) -> str:
    """The one market ``df_market`` holds; DataError for a table or argument the split refuses."""
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
    return str(names[0])


def _rows(
    df_market: pd.DataFrame, heldout: pd.DataFrame | None, market: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, timestamps), each (N,): the market's rows, then the ``heldout`` rows
    stamped after every other row (so each is its user's last interaction)."""
    users = df_market["user"].astype(str).to_numpy(dtype=object)
    items = df_market["item"].astype(str).to_numpy(dtype=object)
    ts = df_market["timestamp"].to_numpy(dtype=np.int64)
    if heldout is None or not len(heldout):
        return users, items, ts
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
    return users, items, ts


def _item_indices(items: np.ndarray, catalog: Catalog, market: str) -> np.ndarray:
    """(N,) int64 catalog index of each raw item id; DataError naming one that is missing."""
    mapped = pd.Series(items, dtype=object).map(catalog.index_of())
    if mapped.isna().any():
        bad = pd.unique(items[mapped.isna().to_numpy()])
        if len(bad) == len(pd.unique(items)):
            raise DataError(
                f"market {market}: none of its {len(bad)} items is in the catalog "
                f"(e.g. {bad[0]!r}); catalog and data come from different datasets?"
            )
        raise DataError(f"market {market}: {len(bad)} item(s) not in the catalog, e.g. {bad[0]!r}")
    return mapped.to_numpy(dtype=np.int64)


def _user_rows(users: np.ndarray, item_idx: np.ndarray, ts: np.ndarray) -> _UserRows:
    """Group by user, stable-sort by time, drop repeated (user, item) rows but their last."""
    user_ids, ucode = np.unique(users, return_inverse=True)
    ucode = ucode.astype(np.int64)
    order = np.lexsort((ts, ucode))
    u, it = ucode[order], item_idx[order]
    keep = ~pd.DataFrame({"u": u, "i": it}).duplicated(keep="last").to_numpy()
    u, it = u[keep], it[keep]
    counts = np.bincount(u, minlength=len(user_ids)).astype(np.int64)
    return _UserRows(user_ids, u, it, counts, np.cumsum(counts) - counts)


def _with_extra_rows(
    rows: _UserRows, extra_train: pd.DataFrame, catalog: Catalog, market: str
) -> tuple[_UserRows, np.ndarray, np.ndarray]:
    """``rows`` with the training-only rows put first in each user's sequence (in their given
    order; users with only extra rows added). Returns (rows, is_extra (N,) bool per row,
    main_counts (n_users,) int64: each user's rows that are not extra)."""
    e_users = extra_train["user"].astype(str).to_numpy(dtype=object)
    e_items = _item_indices(extra_train["item"].astype(str).to_numpy(dtype=object), catalog, market)
    user_ids = np.unique(np.concatenate([rows.user_ids, e_users]))
    main_code = np.searchsorted(user_ids, rows.user_ids)[rows.u]
    u = np.concatenate([np.searchsorted(user_ids, e_users), main_code]).astype(np.int64)
    it = np.concatenate([e_items, rows.it])
    is_extra = np.arange(len(u)) < len(e_users)
    order = np.lexsort((np.arange(len(u)), u))  # per user: extra rows, then the others in order
    counts = np.bincount(u, minlength=len(user_ids)).astype(np.int64)
    main_counts = np.bincount(main_code, minlength=len(user_ids)).astype(np.int64)
    merged = _UserRows(user_ids, u[order], it[order], counts, np.cumsum(counts) - counts)
    return merged, is_extra[order], main_counts


def _refuse_leaks(
    rows: _UserRows, is_extra: np.ndarray, held: np.ndarray, held_items: np.ndarray, market: str
) -> None:
    """DataError if an extra training row repeats a held-out (user, item) pair: the reader
    must remove those (``held``/``held_items``: (K,) int64 user codes and their positives)."""
    n = np.int64(max(int(rows.it.max(initial=0)), int(held_items.max(initial=0))) + 1)
    leak = np.isin(rows.u[is_extra] * n + rows.it[is_extra], held * n + held_items)
    if leak.any():
        raise DataError(
            f"market {market}: {int(leak.sum())} extra training row(s) repeat a held-out "
            "(user, item) pair; the reader must remove them"
        )


def _negatives(
    rows: _UserRows,
    is_extra: np.ndarray,
    eval_users: np.ndarray,
    test_pos: np.ndarray,
    catalog: Catalog,
    *,
    n_neg: int,
    seed: int,
    market: str,
    official_run: dict[str, list[str]] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(valid, test) negatives, each (len(eval_users), n_neg) int64 global item indices: sampled
    for valid, official for the test users ``official_run`` lists, sampled for the others.

    The pool is the items of the market's own rows, never items only extra training rows hold
    (``is_extra``): extra rows add training data, not candidates, so the benchmark's negatives
    are what they are without them (XMRec's official runs draw theirs from the 5-core items
    too). A user's extra rows still count as touched where their item is in the pool."""
    market_items = np.unique(rows.it[~is_extra])
    keep = np.isin(rows.it, market_items)  # every row when there are no extra rows
    counts = np.bincount(rows.u[keep], minlength=len(rows.counts)).astype(np.int64)
    starts = np.cumsum(counts) - counts
    local = np.searchsorted(market_items, rows.it[keep])
    rng = np.random.default_rng([seed, zlib.crc32(market.encode())])

    def sample(users: np.ndarray) -> np.ndarray:
        return _sample_negatives(
            rng,
            market_items,
            local,
            starts,
            counts,
            users,
            n_neg,
            market,
            rows.user_ids,
        )

    valid_neg = sample(eval_users)
    test_neg = np.empty((len(eval_users), n_neg), dtype=np.int64)
    official = np.zeros(len(eval_users), dtype=bool)
    for r, user in enumerate(eval_users.tolist()):
        user_id = str(rows.user_ids[user])
        run = None if official_run is None else official_run.get(user_id)
        if run is not None:
            official[r] = True
            test_neg[r] = _official_negatives(
                run, int(test_pos[r]), catalog, n_neg, market, user_id
            )
    test_neg[~official] = sample(eval_users[~official])
    return valid_neg, test_neg


def split_market(
    df_market: pd.DataFrame,
    catalog: Catalog,
    *,
    n_neg: int = 99,
    seed: int = 0,
    max_history: int = 50,
    official_run: dict[str, list[str]] | None = None,
    heldout: pd.DataFrame | None = None,
    extra_train: pd.DataFrame | None = None,
) -> MarketSplit:
    """Chronological leave-one-out split of one market.

    Rows are stably sorted by timestamp within user; duplicate (user, item) rows keep the last
    occurrence. Per user with >= 3 interactions: last = test, second-to-last = valid, rest =
    train; users with fewer go entirely to train. ``heldout`` (columns user, item; at most one
    row per user) are explicit test rows appended after all of the user's rows, so the test item
    is the heldout row and valid is the last remaining row. ``official_run`` (user -> candidate
    ids containing the positive, 1 + n_neg of them) replaces sampled test negatives for the
    users it lists; the positive is moved to column 0, the other candidates keep their order.
    Negatives are drawn uniformly without replacement from the market's items (those of
    ``df_market``'s rows, not of ``extra_train``) the user never touched (with replacement if
    fewer than n_neg are left), with
    ``np.random.default_rng([seed, zlib.crc32(market.encode())])``; valid first, then test.
    ``extra_train`` (columns user, item) are training-only rows, first in each user's sequence:
    never held out, and a user with only such rows is never evaluated.
    """
    market = _market_of(df_market, n_neg, max_history)
    users, items, ts = _rows(df_market, heldout, market)
    rows = _user_rows(users, _item_indices(items, catalog, market), ts)
    main_counts, is_extra = rows.counts, np.zeros(len(rows.u), dtype=bool)
    if extra_train is not None and len(extra_train):
        rows, is_extra, main_counts = _with_extra_rows(rows, extra_train, catalog, market)
    u, it, counts, starts = rows.u, rows.it, rows.counts, rows.starts
    eligible = main_counts >= 3
    from_end = counts[u] - 1 - (np.arange(len(u)) - starts[u])
    is_test = eligible[u] & (from_end == 0)
    is_valid = eligible[u] & (from_end == 1)
    is_train = ~(is_test | is_valid)
    pad = catalog.pad_index

    eval_users = np.flatnonzero(eligible).astype(np.int64)
    e_starts, e_counts = starts[eval_users], counts[eval_users]
    valid_pos, test_pos = it[is_valid], it[is_test]
    _refuse_leaks(rows, is_extra, np.tile(eval_users, 2), np.r_[valid_pos, test_pos], market)
    valid_neg, test_neg = _negatives(
        rows,
        is_extra,
        eval_users,
        test_pos,
        catalog,
        n_neg=n_neg,
        seed=seed,
        market=market,
        official_run=official_run,
    )
    return MarketSplit(
        market=market,
        user_ids=tuple(str(x) for x in rows.user_ids),
        train_users=u[is_train].astype(np.int64),
        train_items=it[is_train].astype(np.int64),
        train_histories=_tail_matrix(
            it, starts, counts - 2 * eligible.astype(np.int64), max_history, pad
        ),
        valid=EvalSet(
            users=eval_users,
            candidates=np.column_stack([valid_pos, valid_neg]).astype(np.int64),
            histories=_tail_matrix(it, e_starts, e_counts - 2, max_history, pad),
        ),
        test=EvalSet(
            users=eval_users.copy(),
            candidates=np.column_stack([test_pos, test_neg]).astype(np.int64),
            histories=_tail_matrix(it, e_starts, e_counts - 1, max_history, pad),
        ),
        items=np.unique(it).astype(np.int64),
    )
