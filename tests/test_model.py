"""One test per model part, the split/merge round trip, and the PEFT-style freeze test."""

import numpy as np
import pytest
import torch

from shared.model import (
    CategoryHeads,
    Encoder,
    MarketModel,
    ModelConfig,
    encoder_state,
    load_parts,
    private_state,
    set_encoder_trainable,
)
from shared.train import TrainSettings, train_local

CFG = ModelConfig(n_items=30, n_categories=3, dim=8, n_experts=2)
ITEM_CAT = torch.arange(30) % 3


def make_model(seed=0):
    torch.manual_seed(seed)
    return MarketModel(CFG, ITEM_CAT)


def test_encoder_shapes_and_padding():
    enc = Encoder(CFG)
    hist = torch.tensor([[1, 2, 30, 30], [30, 30, 30, 30]])
    pooled, experts = enc.users(hist)
    assert pooled.shape == (2, 8) and experts.shape == (2, 2, 8)
    assert torch.all(pooled[1] == 0)  # empty history -> zero representation, no NaN
    # padding never contributes
    pooled2, _ = enc.users(torch.tensor([[1, 2, 30, 30, 30, 30]]))
    assert torch.allclose(pooled[0], pooled2[0])
    assert enc.items(torch.tensor([[1, 2, 3]])).shape == (1, 3, 8)


def test_heads_score_each_item_with_its_category_head():
    heads = CategoryHeads(CFG)
    pooled, experts = torch.randn(2, 8), torch.randn(2, 2, 8)
    vecs = torch.randn(2, 4, 8)
    items = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    logits = heads(pooled, experts, vecs, items, ITEM_CAT[items])
    assert logits.shape == (2, 4)
    with torch.no_grad():
        heads.cat_bias[1] += 5.0  # only candidates of category 1 move
    moved = heads(pooled, experts, vecs, items, ITEM_CAT[items]) - logits
    assert torch.allclose(moved, (ITEM_CAT[items] == 1).float() * 5.0)


def test_market_model_outputs_logits():
    m = make_model()
    out = m(torch.tensor([[1, 2, 30]]), torch.tensor([[3, 4, 5, 6]]))
    assert out.shape == (1, 4) and out.dtype == torch.float32


def test_split_merge_round_trip():
    a, b = make_model(0), make_model(1)
    enc, priv = encoder_state(a), private_state(a)
    assert enc and priv and not set(enc) & set(priv)
    assert set(enc) | set(priv) == set(a.state_dict())
    assert all(k.startswith("encoder.") for k in enc)
    assert any(k.startswith("heads.") for k in priv)
    load_parts(b, encoder=enc, private=priv)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])


def test_load_parts_rejects_wrong_keys_and_shapes():
    m = make_model()
    enc = encoder_state(m)
    with pytest.raises(KeyError):
        load_parts(m, encoder={k: v for k, v in list(enc.items())[1:]})
    bad = dict(enc)
    bad["encoder.item_emb.weight"] = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="shape"):
        load_parts(m, encoder=bad)


def test_only_heads_are_updated_when_encoder_frozen():
    m = make_model()
    set_encoder_trainable(m, False)
    before_enc, before_priv = encoder_state(m), private_state(m)
    rng = np.random.default_rng(0)
    users = rng.integers(0, 10, 200)
    items = rng.integers(0, 30, 200)
    hist = rng.integers(0, 30, (10, 6))
    res = train_local(m, users, items, hist, np.arange(30), TrainSettings(epochs=2, batch_size=32),
                      torch.device("cpu"))
    assert res.steps > 5
    for k, v in encoder_state(m).items():
        assert torch.equal(v, before_enc[k]), f"frozen {k} moved"
    moved = [k for k, v in private_state(m).items() if not torch.equal(v, before_priv[k])]
    assert "heads.proj" in moved and "heads.item_bias" in moved
    set_encoder_trainable(m, True)
    train_local(m, users, items, hist, np.arange(30), TrainSettings(epochs=1, batch_size=32),
                torch.device("cpu"))
    assert not torch.equal(encoder_state(m)["encoder.item_emb.weight"],
                           before_enc["encoder.item_emb.weight"])
