"""XMRec's ``train.tsv`` as extra training rows: read by default, behind ``ReaderOptions``, and
never leaking a held-out pair (the validation positive, each user's last ``train_5core`` row;
the test positive, its ``valid_qrel`` row) into training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from storefed.shared import data as D
from storefed.shared.errors import DataError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "xmrec_wsdm22_cup"
OFF = D.ReaderOptions(xmrec_extra_train=False)


def _tsv(path: Path, rows: list[tuple[str, str, str]], header: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "userId\titemId\trating\n" if header else ""
    path.write_text(head + "".join("\t".join(r) + "\n" for r in rows))


def make_market(root: Path) -> Path:
    """One market ``s9``: 5-core users a, b (4 rows each, last rows P4 / P8); qrels P5 / P9;
    train.tsv repeats both held-out pairs, a 5-core pair, itself, and adds user c and item P99."""
    core = [("a", f"P{i}", "1.0") for i in (1, 2, 3, 4)]
    core += [("b", f"P{i}", "1.0") for i in (5, 6, 7, 8)]
    _tsv(root / "s9" / "train_5core.tsv", core)
    _tsv(root / "s9" / "valid_qrel.tsv", [("a", "P5", "1"), ("b", "P9", "1")])
    extra = [
        ("a", "P4", "5.0"),  # a's validation positive (last 5-core row): must not train
        ("a", "P5", "4.0"),  # a's test positive (qrel): must not train
        ("b", "P9", "2.0"),  # b's test positive
        ("b", "P8", "1.0"),  # b's validation positive
        ("a", "P1", "3.0"),  # a 5-core duplicate
        ("a", "P99", "5.0"),  # new item, trains
        ("a", "P99", "4.0"),  # repeated extra pair
        ("c", "P1", "5.0"),  # a user only train.tsv has: trains, never evaluated
        ("c", "P2", "5.0"),
        ("c", "P3", "5.0"),
    ]
    _tsv(root / "s9" / "train.tsv", extra)
    return root


def _pairs(catalog: D.Catalog, split: D.MarketSplit) -> set[tuple[str, str]]:
    return {(split.user_ids[u], catalog.item_ids[i])
            for u, i in zip(split.train_users.tolist(), split.train_items.tolist(), strict=True)}


def _held(catalog: D.Catalog, split: D.MarketSplit, which: str) -> set[tuple[str, str]]:
    ev = split.eval_set(which)
    return {(split.user_ids[u], catalog.item_ids[i])
            for u, i in zip(ev.users.tolist(), ev.candidates[:, 0].tolist(), strict=True)}


def test_extra_rows_train_but_never_a_held_out_pair(tmp_path):
    root = make_market(tmp_path)
    catalog, split = D.load_market("xmrec", root, "s9", n_neg=2)
    train = _pairs(catalog, split)
    assert _held(catalog, split, "valid") == {("a", "P4"), ("b", "P8")}  # unchanged benchmark
    assert _held(catalog, split, "test") == {("a", "P5"), ("b", "P9")}
    assert not train & _held(catalog, split, "valid"), "a validation positive trains"
    assert not train & _held(catalog, split, "test"), "a test positive trains"
    assert {("a", "P99"), ("c", "P1"), ("c", "P2"), ("c", "P3")} <= train
    assert "P99" in catalog.item_ids and "c" in split.user_ids
    assert [split.user_ids[u] for u in split.test.users] == ["a", "b"]  # c never evaluated
    # a's history: the extra row first, then its 5-core rows
    a = split.user_ids.index("a")
    hist = [catalog.item_ids[i] for i in split.test.histories[a] if i != catalog.pad_index]
    assert hist == ["P99", "P1", "P2", "P3", "P4"]
    # each kept pair once
    assert len(train) == split.n_train


def test_the_reader_removes_both_held_out_pairs_and_duplicates(tmp_path):
    root = make_market(tmp_path)
    extra = D.read_xmrec_extra(root)["s9"]
    assert list(map(tuple, extra.to_numpy())) == [("a", "P99"), ("c", "P1"), ("c", "P2"),
                                                  ("c", "P3")]


def test_option_off_reads_only_the_5core_files(tmp_path):
    root = make_market(tmp_path)
    catalog, split = D.load_market("xmrec", root, "s9", n_neg=2, options=OFF)
    assert "P99" not in catalog.item_ids and "c" not in split.user_ids
    assert split.n_train == 6  # 4 + 4 core rows + 2 qrels, minus 2 valid and 2 test
    assert D.load_catalog("xmrec", root, options=OFF) == catalog
    assert D.load_catalog("xmrec", root) != catalog


def test_the_split_refuses_extra_rows_that_repeat_a_held_out_pair(tmp_path):
    root = make_market(tmp_path)
    catalog = D.load_catalog("xmrec", root)
    train, qrels, _ = D.read_xmrec(root)
    leaking = pd.DataFrame({"user": ["a"], "item": ["P4"]})  # a's validation positive
    with pytest.raises(DataError, match="repeat a held-out"):
        D.split_market(train, catalog, n_neg=2, heldout=qrels["s9"], extra_train=leaking)
    leaking = pd.DataFrame({"user": ["b"], "item": ["P9"]})  # b's test positive
    with pytest.raises(DataError, match="repeat a held-out"):
        D.split_market(train, catalog, n_neg=2, heldout=qrels["s9"], extra_train=leaking)


def test_extra_rows_add_training_data_not_candidates(tmp_path):
    """Sampled negatives come from the items of the market's own rows: ``P99``, which only
    train.tsv holds, is never a candidate (b never touched it, so it could be drawn for b if
    the pool took the extra rows in)."""
    root = make_market(tmp_path)
    for seed in range(20):
        catalog, split = D.load_market("xmrec", root, "s9", n_neg=2, seed=seed)
        for which in ("valid", "test"):
            negs = {catalog.item_ids[i] for i in split.eval_set(which).candidates[:, 1:].ravel()}
            assert "P99" not in negs, (seed, which, negs)


@pytest.fixture(scope="module")
def s3() -> Path:
    if not (REAL / "s3" / "train.tsv.gz").is_file():
        pytest.skip(f"../shared/data not present: {REAL}")
    return REAL


def test_real_s3_no_held_out_pair_trains_and_the_benchmark_is_unchanged(s3):
    catalog, split = D.load_market("xmrec", s3, "s3")
    train = _pairs(catalog, split)
    valid, test = _held(catalog, split, "valid"), _held(catalog, split, "test")
    assert len(valid) == len(test) == 3328
    assert not train & valid and not train & test
    # train.tsv holds most users' validation positive: the removal is what keeps it out
    raw = pd.read_csv(s3 / "s3" / "train.tsv.gz", sep="\t", dtype=str)
    assert len(set(zip(raw["userId"], raw["itemId"], strict=True)) & valid) > 3000
    assert split.n_train > 2 * 19908  # the 5-core training rows alone: 19,908
    catalog0, split0 = D.load_market("xmrec", s3, "s3", options=OFF)
    assert split0.n_train == 19908
    assert _held(catalog0, split0, "valid") == valid and _held(catalog0, split0, "test") == test
    ids = np.asarray(catalog.item_ids, dtype=object)
    ids0 = np.asarray(catalog0.item_ids, dtype=object)
    np.testing.assert_array_equal(ids[split.test.candidates], ids0[split0.test.candidates])
    # the validation negatives come from the same pool as without the extra rows (the 5-core
    # and qrel items, the pool the official run draws from), not from train.tsv's other items
    pool0 = set(ids0[split0.items].tolist())
    negs = set(ids[split.valid.candidates[:, 1:]].ravel().tolist())
    assert negs <= pool0 and len(set(ids[split.items].tolist()) - pool0) > 1000


@pytest.mark.parametrize("extra", [True, False])
def test_the_run_config_key_reaches_the_server_and_every_market(tmp_path, extra):
    """``xmrec-extra-train`` in the run config: the server's catalog and each market's node
    read the same rows (their catalogs agree), with train.tsv or without it."""
    from storefed.server.rounds import prepare_run
    from storefed.shared.config import RunConfig
    from storefed.shared.node import MarketNode

    root = make_market(tmp_path / "xmrec")
    D.clear_caches(D)
    cfg = RunConfig.from_mapping({"dataset": "xmrec", "data-dir": str(root), "markets": "s9",
                                  "xmrec-extra-train": extra, "eval-negatives": 2,
                                  "secagg": False, "out-dir": str(tmp_path / "out")})
    server = prepare_run(cfg).catalog
    node = MarketNode(cfg, "s9", tmp_path / "state")
    assert ("P99" in server.item_ids) is extra
    assert node.catalog.fingerprint() == server.fingerprint()
    assert ("c" in node.split.user_ids) is extra
    with pytest.raises(Exception, match="xmrec-extra-train"):
        RunConfig.from_mapping({"xmrec-extra-train": "yes"})
