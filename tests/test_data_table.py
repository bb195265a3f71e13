"""``--dataset table``: one CSV of interactions with any column names, mapped by columns.toml
(shared/data/table.py)."""

from __future__ import annotations

import numpy as np
import pytest

from storefed.shared.data import DATASETS, available_markets, load_market
from storefed.shared.errors import DataError


def _write(d, text, mapping=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "interactions.csv").write_text(text)
    if mapping is not None:
        (d / "columns.toml").write_text(mapping)
    return d


def _orders(n_users=6, per_user=5):
    lines = ["customer_id,sku,country,department,ordered_at,stars"]
    for c in ("de", "fr"):
        for u in range(n_users):
            for k in range(per_user):
                item = f"sku{(u * 3 + k) % 20:02d}"
                dept = "audio" if int(item[3:]) % 2 else "video"
                lines.append(f"{c}-u{u},{item},{c},{dept},2024-03-{k + 1:02d}T10:00:00,4")
    return "\n".join(lines) + "\n"


MAPPING = ('user = "customer_id"\nitem = "sku"\nmarket = "country"\n'
           'category = "department"\ntimestamp = "ordered_at"\nrating = "stars"\n')


def test_a_mapped_csv_is_a_dataset_with_markets_categories_and_a_split(tmp_path):
    d = _write(tmp_path / "mine", _orders(), MAPPING)
    assert "table" in DATASETS
    assert available_markets("table", str(d)) == ["de", "fr"]
    catalog, split = load_market("table", str(d), "de", seed=0, n_neg=5)
    assert sorted(catalog.categories) == ["audio", "video"]
    assert catalog.n_items == 20
    # chronological leave-one-out: each user's last order (day 5) is its test positive
    assert len(split.user_ids) == 6
    test = split.eval_set("test")
    assert test.candidates.shape[1] == 6  # the positive and 5 negatives
    last = {f"de-u{u}": f"sku{(u * 3 + 4) % 20:02d}" for u in range(6)}
    got = {split.user_ids[i]: catalog.item_ids[int(test.candidates[i, 0])]
           for i in range(len(split.user_ids))}
    assert got == last


def test_default_names_and_unix_seconds_need_no_mapping(tmp_path):
    rows = ["user,item,market,timestamp"] + [f"u{u},i{(u + k) % 9},m,{1000 + k}"
                                             for u in range(4) for k in range(4)]
    d = _write(tmp_path / "plain", "\n".join(rows) + "\n")
    catalog, split = load_market("table", str(d), "m", seed=0, n_neg=3)
    assert list(catalog.categories) == ["all"] and len(split.user_ids) == 4


@pytest.mark.parametrize("text,mapping,message", [
    ("customer_id,sku,country,ordered_at\nu1,i1,de,2024-01-01\n", None,
     "missing column(s) user ('user'), item ('item'), market ('market'), timestamp"),
    (_orders(), 'user = "customer_id"\nsku = "item"\n', "unknown column 'sku'"),
    (_orders().replace("2024-03-03T10:00:00", "yesterday", 1), MAPPING,
     "line 4: timestamp 'yesterday' is neither a number nor a date/time"),
    (_orders().replace(",4\n", ",four\n", 1), MAPPING, "line 2: rating 'four' is not a number"),
    (_orders().replace("de-u0,", ",", 1), MAPPING, "line 2: empty user"),
])
def test_bad_input_names_the_file_line_or_key(tmp_path, text, mapping, message):
    d = _write(tmp_path / "bad", text, mapping)
    with pytest.raises(DataError) as err:
        load_market("table", str(d), "de", seed=0, n_neg=5)
    assert message in str(err.value)
    assert str(d) in str(err.value)


def test_an_edited_file_is_read_again(tmp_path):
    d = _write(tmp_path / "edit", _orders(), MAPPING)
    assert available_markets("table", str(d)) == ["de", "fr"]
    (d / "interactions.csv").write_text(_orders().replace(",fr,", ",uk,"))
    assert available_markets("table", str(d)) == ["de", "uk"]
    assert np.all(np.asarray(available_markets("table", str(d))) != "fr")
