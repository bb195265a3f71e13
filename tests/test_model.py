"""One test per model part, the split/merge round trip, and the PEFT-style freeze test."""

import numpy as np
import pytest
import torch

from storefed.shared.model import (
    CategoryHeads,
    Encoder,
    MarketModel,
    ModelConfig,
    encoder_state,
    load_parts,
    private_state,
    set_encoder_trainable,
)
from storefed.shared.train import TrainSettings, train_local

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


def test_fused_training_scores_equal_the_plain_ones():
    """The training fast paths compute what the readable definitions say: the pooled user is
    the recency-weighted, sqrt-normalised sum of history embeddings, and the full-softmax
    logits (user tower run once) equal forward(pos) next to score_items(pool)."""
    m = make_model(3)
    with torch.no_grad():
        m.encoder.recency.copy_(torch.linspace(0.5, -0.5, len(m.encoder.recency)))
        m.heads.item_bias.normal_()
    hist = torch.tensor([[1, 2, 5, 30, 30], [7, 30, 30, 30, 30], [30, 30, 30, 30, 30]])
    mask = (hist != 30).float()
    back = (mask.flip(1).cumsum(1).flip(1) - 1).clamp(min=0).long()
    w = torch.exp(m.encoder.recency[back]) * mask
    want = (m.encoder.item_emb(hist) * w.unsqueeze(-1)).sum(1) / \
        w.sum(1, keepdim=True).clamp(min=1e-6).sqrt()
    assert torch.allclose(m.encoder.pool(hist), want, atol=1e-6)
    pos, pool = torch.tensor([4, 9, 11]), torch.tensor([0, 3, 4, 8, 9, 20])
    fused = m.score_positive_and_items(hist, pos, pool)
    plain = torch.cat([m(hist, pos.unsqueeze(1)), m.score_items(hist, pool)], dim=1)
    own = torch.tensor([[False, False, False, True, False, False, False],  # 4 is pool[2]
                        [False, False, False, False, False, True, False],  # 9 is pool[4]
                        [False] * 7])  # 11 is not in the pool
    assert fused.shape == (3, 7)
    assert torch.all(fused[own] == float("-inf"))
    assert torch.allclose(fused[~own], plain[~own], atol=1e-6)


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


# --------------------------------------------------------------------- newer model parts
def _split(users, items, n_items=30):
    from storefed.shared.data import EvalSet, MarketSplit

    empty = EvalSet(users=np.zeros(0, np.int64), candidates=np.zeros((0, 2), np.int64),
                    histories=np.zeros((0, 3), np.int64))
    return MarketSplit(market="m", user_ids=tuple(str(u) for u in sorted(set(users))),
                       train_users=np.asarray(users, np.int64),
                       train_items=np.asarray(items, np.int64),
                       train_histories=np.zeros((len(set(users)), 3), np.int64) + n_items,
                       valid=empty, test=empty, items=np.arange(n_items))


def test_item_similarity_is_private_eval_only_and_keeps_the_metric_protocol():
    from storefed.shared.itemsim import ItemSimilarity, calibrate_weight
    from storefed.shared.metrics import ndcg_hr_at_k

    # users: {1,2,3}, {1,2}, {2,4}: cooc(1,2)=2, deg(1)=2, deg(2)=3 -> cos = 2/sqrt(6)
    sim = ItemSimilarity.from_split(_split([0, 0, 0, 1, 1, 2, 2], [1, 2, 3, 1, 2, 2, 4]), 30)
    hist = torch.tensor([[1, 4, 30], [30, 30, 30]])  # second user: empty history
    got = sim.scores(hist, torch.tensor([[2, 3, 5], [2, 3, 5]]))
    want = torch.tensor([[2 / 6**0.5 + 1 / 3**0.5, 1 / 2**0.5, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(sim.scores(hist, torch.tensor([2, 3, 5])), want, atol=1e-6)
    m = make_model()
    before = m(hist, torch.tensor([[2, 3, 5], [2, 3, 5]])).detach()
    m.attach_item_similarity(sim)
    with torch.no_grad():
        m.heads.knn_weight.fill_(2.0)
    cands = torch.tensor([[2, 3, 5], [2, 3, 5]])
    assert torch.allclose(m(hist, cands), before)  # training mode: the neural score only
    m.eval()
    assert torch.allclose(m(hist, cands), before + 2.0 * want, atol=1e-5)
    assert torch.allclose(m.score_items(hist, torch.tensor([2, 3, 5])), m(hist, cands), atol=1e-5)
    # it is not a tensor of any state: nothing extra travels or is saved
    assert not any("item_sim" in k for k in m.state_dict())
    assert set(encoder_state(m)) == set(encoder_state(make_model()))
    # and the loss never moves its weight
    m.train()
    rng = np.random.default_rng(0)
    train_local(m, rng.integers(0, 10, 64), rng.integers(0, 30, 64), rng.integers(0, 30, (10, 6)),
                np.arange(30), TrainSettings(batch_size=16, loss="full-softmax"),
                torch.device("cpu"))
    assert torch.all(m.heads.knn_weight == 2.0)
    # metric protocol: a constant scorer plus an all-zero kNN term is still constant, and ties
    # do not count for the positive (random value ~0.0454 for 1 + 99 candidates)
    const = torch.zeros(500, 100)
    nd0 = float(ndcg_hr_at_k(const, 10)[0].mean())
    assert abs(nd0 - 0.0454) < 5e-4
    assert float(ndcg_hr_at_k(const + 3.0 * torch.zeros(500, 100), 10)[0].mean()) == nd0
    # the weight picked on validation: kNN that ranks the positive first wins over none
    neural = torch.zeros(50, 5)
    knn = torch.zeros(50, 5)
    knn[:, 0] = 1.0
    assert calibrate_weight(neural, knn) > 0
    assert calibrate_weight(neural, -knn) == 0.0


def test_history_block_starts_as_identity_and_then_mixes_items():
    cfg = ModelConfig(n_items=30, n_categories=3, dim=8, history_layers=1)
    torch.manual_seed(0)
    enc = Encoder(cfg)
    plain = Encoder(ModelConfig(n_items=30, n_categories=3, dim=8))
    plain.load_state_dict({k: v for k, v in enc.state_dict().items()
                           if not k.startswith(("blocks.", "position"))})
    hist = torch.tensor([[1, 2, 3, 30], [30, 30, 30, 30]])
    assert torch.allclose(enc.pool(hist), plain.pool(hist), atol=1e-6)  # identity at init
    with torch.no_grad():
        for p in enc.blocks.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = enc.pool(hist)
    assert torch.isfinite(out).all() and torch.all(out[1] == 0)  # empty history: zero, no NaN
    # the items now interact: changing one item changes more than its own additive share
    alt = enc.pool(torch.tensor([[1, 2, 4, 30]]))
    lin = plain.pool(torch.tensor([[1, 2, 4, 30]])) - plain.pool(hist[:1])
    assert not torch.allclose(alt - out[:1], lin, atol=1e-4)
    # padding beyond the batch's longest history changes nothing
    assert torch.allclose(enc.pool(torch.tensor([[1, 2, 3, 30, 30, 30]])), out[:1], atol=1e-6)


def test_history_dropout_only_blanks_entries():
    from storefed.shared.train import drop_history

    gen = torch.Generator().manual_seed(0)
    hist = torch.randint(0, 30, (64, 10))
    assert drop_history(hist, 30, 0.0, gen) is hist
    out = drop_history(hist, 30, 0.3, gen)
    kept = out != 30
    assert torch.equal(out[kept], hist[kept]) and 0.15 < 1 - kept.float().mean() < 0.45


def test_node_evaluation_with_cached_knn_equals_scoring_through_the_model():
    """MarketNode.evaluate adds the item-kNN term from scores cached once per split; the result
    is what scoring every candidate through the model (forward adds the same term) gives."""
    from storefed.shared.config import RunConfig
    from storefed.shared.node import MarketNode
    from storefed.shared.train import evaluate, score_candidates

    node = MarketNode(RunConfig(dataset="synthetic", markets="m0", embedding_dim=16,
                                device="cpu", local_epochs=1), "m0")
    node.train_round({k: v.clone() for k, v in node.model.state_dict().items()
                      if k.startswith("encoder.")}, 1)
    fast = node.evaluate(None, "test")
    w = float(node.model.heads.knn_weight[0])
    assert w > 0  # the kNN term is really in play
    ev, cat = node.split.test, node.catalog
    slow = evaluate(node.model, ev.histories, ev.candidates, cat.item_category, cat.categories,
                    node.device)
    assert fast["ndcg@10"] == pytest.approx(slow["ndcg@10"], abs=1e-9)
    assert fast["hr@10"] == pytest.approx(slow["hr@10"], abs=1e-9)
    with_knn = score_candidates(node.model, ev.histories, ev.candidates, node.device)
    with torch.no_grad():
        node.model.heads.knn_weight.zero_()
    without = score_candidates(node.model, ev.histories, ev.candidates, node.device)
    assert not torch.allclose(with_knn, without)  # so the equality above is not vacuous
