import numpy as np
import pytest
import torch

from server.strategy import check_update
from shared.wire import (
    WEIGHT_PREFIX,
    apply_summed_update,
    expected_update_shapes,
    make_update,
    sum_updates,
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
