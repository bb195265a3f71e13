"""Tests for shared.data: readers, catalog, leave-one-out split, synthetic generator."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storefed.shared import data as D
from storefed.shared.errors import DataError, StorefedError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data"


def real(sub: str) -> Path:
    path = REAL / sub
    if not path.is_dir():
        pytest.skip(f"../shared/data not present: {path}")
    return path


def write(path: Path, text: str, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def canon(rows: list[tuple[str, str, float, int]], market: str = "m") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "market": market,
            "user": [r[0] for r in rows],
            "item": [r[1] for r in rows],
            "category": "c",
            "rating": np.asarray([r[2] for r in rows], np.float32),
            "timestamp": np.asarray([r[3] for r in rows], np.int64),
        }
    )


def catalog_of(items: list[str]) -> D.Catalog:
    return D.build_catalog(pd.DataFrame({"item": items, "category": "c"}))


XM_HEADER = "userId itemId rate date\n"


# --------------------------------------------------------------------------- xmarket


def test_xmarket_reads_both_forms(tmp_path: Path) -> None:
    write(
        tmp_path / "ca_5core.txt", XM_HEADER + "u1 A 5.0 2020-01-02\nu1 B 4 2020-01-01\n", gz=True
    )
    write(tmp_path / "de_5core.txt", XM_HEADER + "u2 A 3.0 2019-05-05\n")
    write(tmp_path / "ratings_de_Home_and_Kitchen.txt", "u2 K 1.0 2019-05-06\n")  # no header
    (tmp_path / "variant").mkdir()
    write(tmp_path / "variant" / "fr_5core.txt", XM_HEADER + "u A 1 2020-01-01\n")
    assert D.available_markets("xmarket", tmp_path) == ["ca", "de"]
    df = D.read_xmarket(tmp_path)
    assert tuple(df.columns) == D.CANONICAL_COLUMNS
    assert df["rating"].dtype == np.float32 and df["timestamp"].dtype == np.int64
    assert df["timestamp"].iloc[0] == int(pd.Timestamp("2020-01-02").timestamp())
    cats = dict(zip(df["item"], df["category"], strict=True))
    assert cats == {"A": "Electronics", "B": "Electronics", "K": "Home_and_Kitchen"}
    only = D.read_xmarket(tmp_path, ["de"])
    assert set(only["market"]) == {"de"} and len(only) == 2


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ("u1 A 5.0 2020-01-02\nu1 B 2020-01-01\n", 3, "expected 4 columns"),
        ("u1 A 5.0 2020-01-02\nu1 B 4.0 2020-01-01 x\n", 3, "got 5"),
        ("u1 A 5.0 2020-01-02\nu1 A 5.0 2020-01-02\nu1 B five 2020-01-01\n", 4, "'five'"),
        ("u1 A 5.0 2020-13-02\n", 2, "date"),
        ("u1 A 5.0 2020-01-02\n\nu1 A\n", 4, "expected 4 columns"),
        ("u1 A nan 2020-01-02\n", 2, "not a number"),
    ],
)
def test_xmarket_malformed_line(tmp_path: Path, body: str, line: int, needle: str) -> None:
    path = write(tmp_path / "in_5core.txt", XM_HEADER + body)
    with pytest.raises(DataError) as err:
        D.read_xmarket(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and f"line {line}:" in msg and needle in msg


def test_xmarket_bad_dir_market_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        D.read_xmarket(tmp_path / "nope")
    write(tmp_path / "ca_5core.txt", XM_HEADER + "u1 A 5.0 2020-01-02\n")
    with pytest.raises(DataError, match="unknown market 'zz'; known markets: ca"):
        D.read_xmarket(tmp_path, ["zz"])
    write(tmp_path / "de_5core.txt", XM_HEADER)
    with pytest.raises(DataError, match="de_5core.txt: market 'de' has no interaction rows"):
        D.read_xmarket(tmp_path, ["de"])
    write(tmp_path / "fr_5core.txt.gz", "not gzip")
    with pytest.raises(DataError, match="fr_5core.txt.gz: cannot read"):
        D.read_xmarket(tmp_path, ["fr"])


def test_xmarket_real() -> None:
    d = real("xmarket_forec_electronics")
    assert D.available_markets("xmarket", d) == ["ca", "de", "fr", "in", "jp", "mx", "uk"]
    df = D.read_xmarket(d, ["in"])
    assert len(df) == 2015 and df["user"].nunique() == 239 and df["item"].nunique() == 470
    assert df["timestamp"].min() == int(pd.Timestamp("2014-01-02").timestamp())
    catalog, split = D.load_market("xmarket", d, "ca")
    assert catalog.n_items == 8304 and split.n_users == 4668
    assert split.test.candidates.shape == (4668, 100)
    # every user has >= 7 ratings; 888 duplicate rows are dropped
    assert split.n_train == 44779 - 888 - 2 * 4668
    assert D.load_market("xmarket", str(d), "ca")[1] is split  # memoised


def test_clear_caches_makes_the_next_load_cold() -> None:
    catalog, split = D.load_market("synthetic", None, "m0")
    assert D.load_market("synthetic", None, "m0")[1] is split
    D.clear_caches()
    catalog2, split2 = D.load_market("synthetic", None, "m0")
    assert split2 is not split and catalog2 is not catalog
    np.testing.assert_array_equal(split2.train_items, split.train_items)  # same data, re-read


# --------------------------------------------------------------------------- xmrec


def make_xmrec(root: Path) -> Path:
    write(
        root / "s1" / "train_5core.tsv",
        "userId\titemId\trating\n"
        + "".join(f"u{u}\tP{i}\t1.0\n" for u in range(3) for i in range(u, u + 3)),
    )
    write(root / "s1" / "valid_qrel.tsv", "userId\titemId\trating\nu0\tP9\t1\nu1\tP8\t1\n")
    run = ",".join(["P7", "P9", "P5", "P6"])
    write(root / "s1" / "valid_run.tsv", f"u0\t{run}\nu1\tP8,P5,P6,P7\n", gz=True)
    write(root / "s2" / "train_5core.tsv", "userId\titemId\trating\nv\tP1\t1.0\n")
    write(root / "s2" / "valid_qrel.tsv", "userId\titemId\trating\nv\tP2\t1\n")
    (root / "t1t2").mkdir()
    return root


def test_xmrec_reader_and_split(tmp_path: Path) -> None:
    root = make_xmrec(tmp_path)
    assert D.available_markets("xmrec", root) == ["s1", "s2"]
    train, qrels, runs = D.read_xmrec(root)
    assert len(train) == 10 and set(train["category"]) == {"all"}
    assert list(train["timestamp"][:3]) == [0, 1, 2]
    assert list(qrels["s1"]["item"]) == ["P9", "P8"] and set(runs) == {"s1"}
    assert runs["s1"]["u0"] == ["P7", "P9", "P5", "P6"]
    catalog, split = D.load_market("xmrec", root, "s1", n_neg=3)
    idx = catalog.index_of()
    u0 = split.user_ids.index("u0")
    r = list(split.test.users).index(u0)
    assert [catalog.item_ids[i] for i in split.test.candidates[r]] == ["P9", "P7", "P5", "P6"]
    assert split.valid.candidates[r, 0] == idx["P2"]  # last train_5core row in file order
    assert list(split.test.histories[r, :3]) == [idx["P0"], idx["P1"], idx["P2"]]
    u2 = list(split.test.users).index(split.user_ids.index("u2"))  # no qrel: plain LOO
    assert split.test.candidates[u2, 0] == idx["P4"]


def test_xmrec_errors(tmp_path: Path) -> None:
    root = make_xmrec(tmp_path)
    bad = write(root / "s2" / "train_5core.tsv", "userId\titemId\trating\nv\tP1\tyes\n")
    with pytest.raises(DataError, match=rf"{bad} line 2: rating 'yes' is not a number"):
        D.read_xmrec(root, ["s2"])
    with pytest.raises(DataError, match="unknown market 's9'; known markets: s1, s2"):
        D.read_xmrec(root, ["s9"])
    write(root / "s2" / "train_5core.tsv", "userId\titemId\trating\nv\tP1\n")
    with pytest.raises(DataError, match="line 2: expected 3 columns"):
        D.read_xmrec(root, ["s2"])


def test_xmrec_real() -> None:
    d = real("xmrec_wsdm22_cup")
    assert D.available_markets("xmrec", d) == ["s1", "s2", "s3"]
    _, _, runs = D.read_xmrec(d, ["s3"])
    catalog, split = D.load_market("xmrec", d, "s3")
    qrel = D.read_xmrec(d, ["s3"])[1]["s3"]
    assert split.test.candidates.shape == (3328, 100)
    pos = dict(zip(qrel["user"], qrel["item"], strict=True))
    for r in range(0, 3328, 97):
        user = split.user_ids[split.test.users[r]]
        cands = [catalog.item_ids[i] for i in split.test.candidates[r]]
        assert cands[0] == pos[user] and sorted(cands) == sorted(runs["s3"][user])


# --------------------------------------------------------------------------- movielens


GENRES = "unknown|0\nAction|1\nDrama|2\n\n"


def make_ml(root: Path, data: str) -> Path:
    write(root / "u.genre", GENRES)
    write(root / "u.user", "1|24|M|x|85711\n2|53|F|y|T8H1N\n3|30|M|z|02139\n")
    items = ["1|A|d||u|0|1|1", "2|B|d||u|0|0|1", "3|C|d||u|0|0|1", "4|D|d||u|0|0|0"]
    write(root / "u.item", "\n".join(items) + "\n")
    write(root / "u.data", data, gz=True)
    return root


ML_DATA = "1\t1\t5\t100\n1\t2\t4\t90\n2\t3\t3\t80\n3\t1\t2\t70\n3\t4\t1\t60\n"


def test_movielens_reader(tmp_path: Path) -> None:
    root = make_ml(tmp_path, ML_DATA)
    df = D.read_movielens(root, min_category_items=2)
    assert tuple(df.columns) == D.CANONICAL_COLUMNS and len(df) == 5
    assert dict(zip(df["user"], df["market"], strict=True)) == {
        "1": "zip8",
        "2": "intl",
        "3": "zip0",
    }
    # first genres: 1->Action, 2,3->Drama, 4->unknown; Action/unknown have < 2 items
    assert dict(zip(df["item"], df["category"], strict=True)) == {
        "1": "other",
        "2": "Drama",
        "3": "Drama",
        "4": "other",
    }
    assert list(D.read_movielens(root, ["intl"])["user"]) == ["2"]
    assert D.available_markets("movielens", root) == ["intl", "zip0", "zip8"]
    with pytest.raises(DataError, match="unknown market 'zip5'; known markets: intl, zip0, zip8"):
        D.read_movielens(root, ["zip5"])


@pytest.mark.parametrize(
    ("data", "line", "needle"),
    [
        (ML_DATA + "1\t3\tx\t5\n", 6, "rating 'x' is not a number"),
        ("1\t3\t4\n", 1, "expected 4 columns"),
        ("1\t3\t4\t5\n9\t1\t4\t5\n", 2, "not listed in u.user"),
        ("1\t3\t4\t5\n1\t1\t4\t5.5\n", 2, "timestamp '5.5' is not an integer"),
    ],
)
def test_movielens_malformed(tmp_path: Path, data: str, line: int, needle: str) -> None:
    make_ml(tmp_path, data)
    with pytest.raises(DataError) as err:
        D.read_movielens(tmp_path)
    assert "u.data.gz" in str(err.value) and f"line {line}:" in str(err.value)
    assert needle in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        D.read_movielens(tmp_path / "missing")


def test_movielens_real() -> None:
    d = real("movielens_100k")
    df = D.read_movielens(d)
    assert len(df) == 100_000 and df["user"].nunique() == 943 and df["item"].nunique() == 1682
    assert df["market"].nunique() == 11
    assert df.groupby("market")["user"].nunique()["intl"] == 18
    assert {"Drama", "Action", "Comedy", "other"} <= set(df["category"])


# --------------------------------------------------------------------------- amazon pairs


def test_amazon_pairs(tmp_path: Path) -> None:
    write(tmp_path / "b_a" / "train.txt", "0\t0\t1\n0\t1\t1\n1\t0\t1\n4\t2\t1\n", gz=True)
    write(tmp_path / "b_a" / "test.txt", "0\t2\t1\n")
    write(tmp_path / "a_b" / "train.txt", "0\t0\t1\n4\t1\t1\n1\t1\t1\n")
    write(tmp_path / "a_b" / "test.txt", "0\t1\t1\n")
    assert D.available_markets("amazon-pairs", tmp_path) == [f"a_b-{k}" for k in range(4)]
    df = D.read_amazon_pairs(tmp_path, ["a_b-0"])
    assert set(df["market"]) == {"a_b-0"} and set(df["user"]) == {"0", "4"}
    u0 = df[df["user"] == "0"].sort_values("timestamp", kind="mergesort")
    assert list(u0["item"]) == ["a_b:0", "b_a:0", "b_a:1", "a_b:1", "b_a:2"]
    assert dict(zip(df["item"], df["category"], strict=True))["b_a:0"] == "b"
    with pytest.raises(DataError, match="unknown market 'b_a-0'"):
        D.read_amazon_pairs(tmp_path, ["b_a-0"])
    write(tmp_path / "a_b" / "test.txt", "0\tx\t1\n")
    with pytest.raises(DataError, match=r"test.txt line 1: item id 'x' is not an integer"):
        D.read_amazon_pairs(tmp_path, ["a_b-1"])


def test_amazon_real() -> None:
    d = real("amazon_cdr_pairs_disencdr")
    df = D.read_amazon_pairs(d, ["phone_sport-1"])
    assert set(df["category"]) == {"phone", "sport"}
    users = df["user"].astype(int)
    assert (users % 4 == 1).all() and users.nunique() == len(range(1, 4998, 4))


# --------------------------------------------------------------------------- split


def test_split_chronological_stable_dedup() -> None:
    rows = [
        ("u", "a", 1, 10),
        ("u", "b", 1, 20),
        ("u", "c", 1, 20),  # tie with b: file order kept, c after b
        ("u", "a", 1, 30),  # duplicate of a: the later one is kept
        ("u", "d", 1, 5),
        ("v", "a", 1, 1),
        ("v", "b", 1, 2),  # < 3 interactions: all train
        ("w", "e", 1, 0),
    ]
    cat = catalog_of(list("abcdefgh"))
    s = D.split_market(canon(rows), cat, n_neg=2, max_history=3)
    assert s.user_ids == ("u", "v", "w") and s.n_users == 3
    ix = cat.index_of()
    # u's sequence after dedup: d(5) b(20) c(20) a(30)
    assert list(s.test.users) == [0] and s.test.candidates[0, 0] == ix["a"]
    assert s.valid.candidates[0, 0] == ix["c"]
    assert s.test.candidates[0, 1:].tolist() == [ix["e"], ix["e"]]  # only untouched item
    assert list(s.valid.histories[0]) == [ix["d"], ix["b"], cat.pad_index]
    assert list(s.test.histories[0]) == [ix["d"], ix["b"], ix["c"]]
    assert list(zip(s.train_users, s.train_items, strict=True)) == [
        (0, ix["d"]),
        (0, ix["b"]),
        (1, ix["a"]),
        (1, ix["b"]),
        (2, ix["e"]),
    ]
    assert list(s.train_histories[1]) == [ix["a"], ix["b"], cat.pad_index]
    assert list(s.items) == sorted(ix[x] for x in "abcde") and s.n_train == 5


def test_split_negatives() -> None:
    rng = np.random.default_rng(3)
    items = [f"i{j:03d}" for j in range(300)]
    rows = []
    for u in range(40):
        for t, j in enumerate(rng.choice(300, size=int(rng.integers(1, 30)), replace=False)):
            rows.append((f"u{u}", items[j], 1.0, t))
    df = canon(rows, market="mk")
    cat = catalog_of(items + ["zzz"])
    s = D.split_market(df, cat, n_neg=20, seed=1)
    u_items = df.groupby("user")["item"].apply(lambda x: {cat.index_of()[i] for i in x})
    for ev in (s.valid, s.test):
        assert ev.candidates.shape == (len(ev.users), 21) and ev.histories.shape[1] == 50
        assert ev.candidates.dtype == np.int64
        for r, u in enumerate(ev.users):
            neg = ev.candidates[r, 1:]
            assert len(set(neg.tolist())) == 20
            assert not set(neg.tolist()) & u_items[s.user_ids[u]]
            assert set(neg.tolist()) <= set(s.items.tolist())
    assert cat.index_of()["zzz"] not in s.items
    again = D.split_market(df, cat, n_neg=20, seed=1)
    other = D.split_market(df, cat, n_neg=20, seed=2)
    assert np.array_equal(s.test.candidates, again.test.candidates)
    assert not np.array_equal(s.test.candidates, other.test.candidates)
    assert not np.array_equal(s.valid.candidates[:, 1:], s.test.candidates[:, 1:])


def test_split_few_untouched_and_errors() -> None:
    rows = [("u", x, 1.0, t) for t, x in enumerate("abcd")] + [("v", "e", 1.0, 0)]
    cat = catalog_of(list("abcdef"))
    s = D.split_market(canon(rows), cat, n_neg=5)
    assert set(s.test.candidates[0, 1:].tolist()) == {cat.index_of()["e"]}  # with replacement
    with pytest.raises(DataError, match="touched all"):
        D.split_market(canon(rows[:4]), cat, n_neg=5)
    with pytest.raises(DataError, match="empty market"):
        D.split_market(canon([]), cat)
    with pytest.raises(DataError, match="market mk: 1 item.*'q'"):
        D.split_market(canon(rows + [("v", "q", 1.0, 1)], market="mk"), cat)
    with pytest.raises(DataError, match="none of its 2 items is in the catalog"):
        D.split_market(canon([("v", "x", 1.0, 1), ("v", "y", 1.0, 2)]), cat)


def test_pad_histories_and_catalog() -> None:
    out = D.pad_histories([np.array([1, 2, 3]), np.array([], np.int64), np.array([7])], 2, 9)
    assert out.tolist() == [[2, 3], [9, 9], [7, 9]] and out.dtype == np.int64
    cat = D.build_catalog(pd.DataFrame({"item": ["b", "a", "b"], "category": ["y", "x", "y"]}))
    assert cat.item_ids == ("a", "b") and cat.categories == ("x", "y")
    assert cat.item_category.tolist() == [0, 1] and cat.pad_index == cat.n_items == 2
    assert cat.index_of() == {"a": 0, "b": 1} and cat.index_of() is cat.index_of()
    same = D.build_catalog(pd.DataFrame({"item": ["a", "b"], "category": ["x", "y"]}))
    diff = D.build_catalog(pd.DataFrame({"item": ["a", "b"], "category": ["x", "x"]}))
    assert cat.fingerprint() == same.fingerprint() != diff.fingerprint()
    assert len(cat.fingerprint()) == 64


# --------------------------------------------------------------------------- synthetic / dataset


def test_synthetic() -> None:
    a = D.generate_synthetic(seed=5)
    pd.testing.assert_frame_equal(a, D.generate_synthetic(seed=5))
    assert not a.equals(D.generate_synthetic(seed=6))
    assert tuple(a.columns) == D.CANONICAL_COLUMNS
    assert sorted(a["market"].unique()) == ["m0", "m1", "m2", "m3"]
    assert a["category"].nunique() == 4 and a["item"].iloc[0].startswith("i")
    counts = a["item"].value_counts().to_numpy()
    assert counts[:60].sum() / counts.sum() > 0.3  # top 10% of 600 items
    assert (a.groupby("user")["timestamp"].apply(lambda t: t.is_monotonic_increasing)).all()
    assert not a.duplicated(["user", "item"]).any()
    shares = a.groupby("market")["category"].value_counts(normalize=True).unstack(fill_value=0)
    assert (shares.max() - shares.min()).max() > 0.1  # markets prefer different categories


def test_load_dataset_synthetic_and_errors() -> None:
    ds = D.load_dataset("synthetic", None, ["m1", "m0"], n_neg=10, max_history=5)
    assert list(ds.markets) == ["m1", "m0"] and ds.catalog.n_items == 600
    s = ds.markets["m0"]
    assert s.test.candidates.shape == (150, 11) and s.train_histories.shape == (150, 5)
    assert D.load_catalog("synthetic", None) == ds.catalog
    cat, m0 = D.load_market("synthetic", None, "m0", n_neg=10, max_history=5)
    assert cat.fingerprint() == ds.catalog.fingerprint()
    assert np.array_equal(m0.test.candidates, s.test.candidates)
    with pytest.raises(DataError, match="unknown dataset 'nope'; known datasets: synthetic"):
        D.load_dataset("nope", None)
    with pytest.raises(DataError, match="unknown market 'x'; known markets: m0, m1, m2, m3"):
        D.load_market("synthetic", None, "x")
    with pytest.raises(DataError, match="needs a data_dir"):
        D.load_catalog("xmarket", None)
    assert issubclass(DataError, StorefedError)


# --------------------------------------------------------------------------- fuzz


_FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_TOKEN = st.sampled_from(["u1", "B0", "5.0", "x", "2020-01-02", "2020-02-31", "", "1e999", "-3"])


@_FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.lists(st.lists(_TOKEN, max_size=6), max_size=6).map(
            lambda rows: "\n".join(" ".join(r) for r in rows).encode()
        ),
    ),
    gz=st.booleans(),
)
def test_fuzz_xmarket_only_data_error(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes, gz: bool
) -> None:
    d = tmp_path_factory.mktemp("xm")
    name = "ca_5core.txt.gz" if gz else "ca_5core.txt"
    (d / name).write_bytes(gzip.compress(raw) if gz and raw[:1] != b"x" else raw)
    try:
        df = D.read_xmarket(d)
    except DataError:
        return
    assert tuple(df.columns) == D.CANONICAL_COLUMNS and len(df) > 0


_ML_TOKEN = st.sampled_from(["1", "2", "3", "4", "x", "", "5.5", "-1", "99999999999999999999"])


@_FUZZ
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.lists(st.lists(_ML_TOKEN, max_size=5), max_size=6).map(
            lambda rows: "\n".join("\t".join(r) for r in rows).encode()
        ),
    )
)
def test_fuzz_movielens_only_data_error(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    d = make_ml(tmp_path_factory.mktemp("ml"), "")
    (d / "u.data.gz").unlink()
    (d / "u.data").write_bytes(raw)
    try:
        df = D.read_movielens(d)
    except DataError:
        return
    assert tuple(df.columns) == D.CANONICAL_COLUMNS and len(df) > 0
