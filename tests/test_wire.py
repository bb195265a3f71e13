import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from storefed.server.strategy import check_update
from storefed.shared.wire import (
    LAYOUT_KEY,
    PACKED_KEY,
    WEIGHT_PREFIX,
    apply_summed_update,
    expected_update_shapes,
    from_record,
    make_update,
    pack,
    state_from_record,
    sum_updates,
    to_record,
    unpack,
)


def states():
    g = {"encoder.item_emb.weight": torch.zeros(4, 2), "encoder.w": torch.ones(3)}
    a = {"encoder.item_emb.weight": torch.tensor([[1.0, 1], [2, 2], [0, 0], [0, 0]]),
         "encoder.w": torch.full((3,), 3.0)}
    b = {"encoder.item_emb.weight": torch.tensor([[3.0, 3], [0, 0], [0, 0], [5, 5]]),
         "encoder.w": torch.full((3,), 5.0)}
    return g, a, b


def test_scalar_weights_equal_fedavg():
    g, a, b = states()
    ua, ub = make_update(a, g, 1, None), make_update(b, g, 3, None)
    new = apply_summed_update(g, sum_updates([ua, ub]))
    for k in g:
        assert torch.allclose(new[k], (1 * a[k] + 3 * b[k]) / 4)


def test_rowwise_weights_average_only_markets_holding_the_row():
    g, a, b = states()
    ua = make_update(a, g, 10, np.array([1, 1, 0, 0]))
    ub = make_update(b, g, 10, np.array([1, 0, 0, 2]))
    new = apply_summed_update(g, sum_updates([ua, ub]))
    emb = new["encoder.item_emb.weight"]
    assert torch.allclose(emb[0], torch.tensor([2.0, 2]))  # mean of 1 and 3
    assert torch.allclose(emb[1], torch.tensor([2.0, 2]))  # only a holds row 1: not diluted
    assert torch.allclose(emb[2], torch.zeros(2))  # nobody: global kept
    assert torch.allclose(emb[3], torch.tensor([5.0, 5]))


def test_check_update_rejects_bad_updates():
    g, a, _ = states()
    shapes = expected_update_shapes(g, rowwise=True)
    good = make_update(a, g, 2, np.ones(4))
    assert check_update(good, shapes) is None
    nan = dict(good, **{"encoder.w": np.array([np.nan, 0, 0], np.float32)})
    assert "non-finite" in check_update(nan, shapes)
    assert "shape" in check_update(dict(good, **{"encoder.w": np.zeros(2, np.float32)}), shapes)
    assert "keys" in check_update({k: v for k, v in good.items() if k != "encoder.w"}, shapes)
    neg = dict(good, **{WEIGHT_PREFIX + "encoder.w": np.array([-1.0], np.float32)})
    assert "negative" in check_update(neg, shapes)


def test_mismatched_keys_raise():
    g, a, _ = states()
    with pytest.raises(KeyError):
        make_update({"encoder.w": a["encoder.w"]}, g, 1, None)


# ------------------------------------------------------------------------ packed wire form
def test_pack_roundtrip_keeps_names_dtypes_shapes_and_values():
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(5, 3)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
              "c": np.array(2.5), "d": np.zeros((0, 4), np.float32),
              "e": torch.ones(2, 2, dtype=torch.float64).t()}
    out = unpack(pack(arrays))
    assert set(out) == set(arrays)
    for k, v in arrays.items():
        want = v.numpy() if isinstance(v, torch.Tensor) else v
        assert out[k].dtype == want.dtype and out[k].shape == want.shape
        assert np.array_equal(out[k], want)


def test_record_is_two_arrays_and_reads_back_packed_or_plain():
    g, a, _ = states()
    update = make_update(a, g, 3, np.array([1, 0, 2, 0]))
    record = to_record(update)
    assert sorted(record) == sorted([PACKED_KEY, LAYOUT_KEY])  # 2 objects, not 2 x tensors
    back = from_record(record)
    assert set(back) == set(update)
    for k in update:
        assert np.array_equal(back[k], update[k])
    plain = ArrayRecord({k: Array(v) for k, v in update.items()})
    assert all(np.array_equal(from_record(plain)[k], update[k]) for k in update)
    state = state_from_record(to_record(g))
    assert all(torch.equal(state[k], g[k]) for k in g)


@pytest.mark.parametrize("layout", [
    b"not json", b'{"a": 1}', b'[["a", "object", [1], 0]]', b'[["a", "float32", [4], 0]]',
    b'[["a", "float32", [1], -4]]', b'[["a", "float32", [1], 0], ["a", "float32", [1], 0]]',
    b'[["a", "float32", [-1], 0]]', b'[["a", "float32"]]'])
def test_unpack_rejects_malformed_layouts(layout):
    packed = {PACKED_KEY: np.zeros(8, np.uint8), LAYOUT_KEY: np.frombuffer(layout, np.uint8)}
    with pytest.raises(ValueError):
        unpack(packed)
