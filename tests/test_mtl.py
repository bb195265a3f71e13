"""Multi-task modes: MMoE gates are per category and private; the single-task baseline really
isolates categories; per-category metrics flow client -> server -> metrics.json."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from storefed.client.client_app import make_app
from storefed.server.strategy import EncoderFedAvg, check_update
from storefed.shared.config import RunConfig
from storefed.shared.data import build_catalog, load_catalog, split_market
from storefed.shared.metrics import ndcg_hr_at_k
from storefed.shared.model import MarketModel, ModelConfig, encoder_state, private_state
from storefed.shared.mtl import (
    SingleTaskModel,
    category_histories,
    center_item_bias,
    single_task_update,
    train_single_task,
    within_category_scores,
)
from storefed.shared.node import MarketNode, build_model, initial_encoder, item_counts
from storefed.shared.report import write_metrics
from storefed.shared.train import TrainSettings, train_local
from storefed.shared.wire import (
    WEIGHT_PREFIX,
    apply_summed_update,
    expected_update_shapes,
    sum_updates,
)
from storefed.simulations.experiments.mtl_bench import compare, pooled_categories


# --------------------------------------------------------------------------- synthetic data
def interactions(seed, n_users=40, n_items=60, n_cat=3, per_user=12):
    """Users with a preferred category; items i has category i % n_cat."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        fav = u % n_cat
        for t in range(per_user):
            c = fav if rng.random() < 0.7 else int(rng.integers(n_cat))
            item = int(rng.integers(n_items // n_cat)) * n_cat + c
            rows.append(("mk", f"u{u}", f"i{item:03d}", f"c{c}", 1.0, t * 10))
    return pd.DataFrame(rows, columns=["market", "user", "item", "category", "rating",
                                       "timestamp"])


def full_catalog(n_items=60, n_cat=3):
    return build_catalog(pd.DataFrame({"item": [f"i{i:03d}" for i in range(n_items)],
                                       "category": [f"c{i % n_cat}" for i in range(n_items)]}))


def with_other_category_changed(df, category="c1", seed=7):
    """Same rows for every other category; category ``category`` gets extra, earlier rows
    (so no user's last two interactions, hence no train/valid/test split, change)."""
    rng = np.random.default_rng(seed)
    users = df["user"].unique()
    extra = [("mk", u, f"i{int(rng.integers(20)) * 3 + 1:03d}", category, 1.0, -5 - k)
             for k, u in enumerate(rng.choice(users, 25))]
    return pd.concat([df, pd.DataFrame(extra, columns=df.columns)], ignore_index=True)


MCFG = ModelConfig(n_items=60, n_categories=3, dim=8)


def single_task_round(split, catalog, seed=0, rounds=2, weight_decay=0.0, mu=0.0):
    torch.manual_seed(seed)
    model = SingleTaskModel(MCFG, torch.as_tensor(catalog.item_category))
    center_item_bias(model, split, item_counts(split, catalog.n_items))
    glob = encoder_state(model)
    update = None
    for rnd in range(1, rounds + 1):
        glob_before = {k: v.clone() for k, v in glob.items()}
        train_single_task(model, split, 10, lambda c, r=rnd: TrainSettings(
            batch_size=16, lr=0.01, negatives=3, seed=100 * r + c, weight_decay=weight_decay,
            proximal_mu=mu), torch.device("cpu"), glob_before)
        update = single_task_update(encoder_state(model), glob_before, split,
                                    catalog.item_category, item_counts(split, catalog.n_items))
        glob = apply_summed_update(glob_before, sum_updates([update]))
    return model, update


def owned(model, category, item_category):
    """Category ``category``'s parameters of a SingleTaskModel (flattened, named)."""
    rows = torch.as_tensor(item_category) == category
    state = model.state_dict()
    out = {"item_rows": state["encoder.item_emb.weight"][:-1][rows],
           "item_bias": state["heads.item_bias"][:-1][rows],
           "proj": state["heads.proj"][category], "cat_bias": state["heads.cat_bias"][category]}
    out.update({k: v for k, v in state.items()
                if k.startswith(f"encoder.experts.{category}.")
                or k == f"encoder.recencies.{category}"})
    return out


# --------------------------------------------------------------------------- single-task
@pytest.mark.parametrize("weight_decay,mu", [(0.0, 0.0), (0.01, 0.1)])
def test_single_task_category_unaffected_by_other_categories_data(weight_decay, mu):
    catalog = full_catalog()
    df = interactions(0)
    df2 = with_other_category_changed(df, "c1")
    s1 = split_market(df, catalog, n_neg=10, max_history=10)
    s2 = split_market(df2, catalog, n_neg=10, max_history=10)
    assert s2.n_train > s1.n_train  # the second market really has more category-1 data
    m1, u1 = single_task_round(s1, catalog, weight_decay=weight_decay, mu=mu)
    m2, u2 = single_task_round(s2, catalog, weight_decay=weight_decay, mu=mu)
    for c in (0, 2):  # untouched categories: bit-identical models and wire weights
        a, b = owned(m1, c, catalog.item_category), owned(m2, c, catalog.item_category)
        for k in a:
            assert torch.equal(a[k], b[k]), (c, k)
        n_c = (catalog.item_category[s1.train_items] == c).sum()
        for key in (f"encoder.experts.{c}.0.weight", f"encoder.recencies.{c}"):
            assert u1[WEIGHT_PREFIX + key][0] == u2[WEIGHT_PREFIX + key][0] == n_c
        rec = a[f"encoder.recencies.{c}"]
        assert not torch.equal(rec, torch.zeros_like(rec))  # it trains
    # ...while category 1's model did change (the test can fail)
    a, b = owned(m1, 1, catalog.item_category), owned(m2, 1, catalog.item_category)
    assert not torch.equal(a["encoder.experts.1.0.weight"], b["encoder.experts.1.0.weight"])
    # and scores of category-0/2 candidates are identical for the same user
    h1 = category_histories(s1, "test", catalog.item_category, 3, 10, catalog.n_items)
    h2 = category_histories(s2, "test", catalog.item_category, 3, 10, catalog.n_items)
    cand = torch.as_tensor(s1.test.candidates)
    keep = torch.as_tensor(catalog.item_category)[cand] != 1
    with torch.no_grad():
        sc1, sc2 = m1(torch.as_tensor(h1), cand), m2(torch.as_tensor(h2), cand)
    assert torch.equal(sc1[keep], sc2[keep])


def test_shared_bottom_is_affected_by_other_categories_data():
    """The contrast: with hard sharing, category 0's scores move with category 1's data."""
    catalog = full_catalog()
    df = interactions(0)
    res = []
    for d in (df, with_other_category_changed(df, "c1")):
        s = split_market(d, catalog, n_neg=10, max_history=10)
        torch.manual_seed(0)
        model = MarketModel(MCFG, torch.as_tensor(catalog.item_category))
        train_local(model, s.train_users, s.train_items, s.train_histories, s.items,
                    TrainSettings(batch_size=16, negatives=3), torch.device("cpu"))
        res.append(model.state_dict()["heads.proj"][0].clone())
    assert not torch.equal(res[0], res[1])


def test_category_histories_hold_only_their_category_most_recent_first_kept():
    catalog = full_catalog()
    s = split_market(interactions(1), catalog, n_neg=10, max_history=4)
    cats = np.append(catalog.item_category, -1)  # pad row
    for which, n in (("train", s.n_users), ("valid", len(s.valid.users)),
                     ("test", len(s.test.users))):
        h = category_histories(s, which, catalog.item_category, 3, 4, catalog.n_items)
        assert h.shape == (n, 3, 4)
        for c in range(3):
            got = cats[h[:, c]]
            assert np.all((got == c) | (got == -1))
    # test history of a user = its category items of train + valid, the most recent 4
    u = int(s.test.users[0])
    seq = list(s.train_items[s.train_users == u]) + [int(s.valid.candidates[0, 0])]
    h = category_histories(s, "test", catalog.item_category, 3, 4, catalog.n_items)
    for c in range(3):
        want = [i for i in seq if catalog.item_category[i] == c][-4:]
        assert list(h[0, c][: len(want)]) == want
        assert np.all(h[0, c][len(want):] == catalog.n_items)


def test_single_task_node_round_is_accepted_by_the_server(tmp_path):
    cfg = RunConfig(mtl="single-task", embedding_dim=8, local_epochs=1, device="cpu")
    catalog = load_catalog("synthetic", None)
    glob = initial_encoder(cfg, catalog)
    assert {f"encoder.experts.{c}.0.weight" for c in range(len(catalog.categories))} <= set(glob)
    node = MarketNode(cfg, "m0", tmp_path)
    update, metrics = node.train_round(glob, 1)
    assert check_update(update, expected_update_shapes(glob, True)) is None
    per_cat = np.bincount(catalog.item_category[node.split.train_items],
                          minlength=len(catalog.categories))
    for c, n in enumerate(per_cat):
        assert update[WEIGHT_PREFIX + f"encoder.experts.{c}.2.bias"][0] == n
    ev = node.evaluate(apply_summed_update(glob, sum_updates([update])))
    assert set(ev["categories"]) == set(catalog.categories)
    assert metrics["num-examples"] == node.split.n_train


# --------------------------------------------------------------------------- mmoe
def test_mmoe_gates_are_per_category_and_private(tmp_path):
    cfg = RunConfig(mtl="mmoe", num_experts=3, embedding_dim=8, local_epochs=1, device="cpu")
    catalog = load_catalog("synthetic", None)
    model = build_model(cfg, catalog)
    n_cat = len(catalog.categories)
    priv, enc = private_state(model), encoder_state(model)
    assert priv["heads.gate"].shape == (n_cat, 3, 8) and priv["heads.gate_bias"].shape == (n_cat, 3)
    assert not any("gate" in k for k in enc)
    assert {k.split(".")[2] for k in enc if k.startswith("encoder.experts.")} == {"0", "1", "2"}
    node = MarketNode(cfg, "m0", tmp_path)
    update, _ = node.train_round(initial_encoder(cfg, catalog), 1)
    assert not any("gate" in k or k.startswith("heads.") for k in update)
    gates = node.private()["heads.gate"]
    assert all(not torch.equal(gates[a], gates[b])
               for a in range(n_cat) for b in range(a + 1, n_cat))  # each category its own


# --------------------------------------------------------------------------- metrics flow
@pytest.mark.parametrize("mtl", ["single-task", "mmoe"])
def test_per_category_metrics_flow_client_to_server_to_metrics_json(tmp_path, mtl):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    over = {"embedding-dim": 8, "local-epochs": 1, "markets": "m0,m1", "device": "cpu",
            "mtl": mtl, "state-dir": str(tmp_path / "state")}
    cfg = RunConfig.from_mapping(over)
    glob = initial_encoder(cfg, load_catalog("synthetic", None))
    app = make_app(over)
    strategy = EncoderFedAvg(glob, True, fraction_evaluate=1.0, min_evaluate_nodes=2,
                             min_available_nodes=2)
    replies, own = [], {}
    for pid, market in enumerate(("m0", "m1")):
        msg = Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=glob),
                                  "config": ConfigRecord({"server-round": 1})}),
                      dst_node_id=pid + 1, message_type=MessageType.EVALUATE)
        ctx = Context(run_id=1, node_id=pid + 1, run_config={}, state=RecordDict(),
                      node_config={"partition-id": pid, "num-partitions": 2})
        reply = app(msg, ctx)
        assert not reply.has_error(), reply.error
        replies.append(reply)
        own[market] = MarketNode(cfg, market).evaluate(glob)
    strategy.aggregate_evaluate(1, replies)
    markets = {m: {"ndcg@10": v["ndcg@10"], "hr@10": v["hr@10"], "examples": v["examples"],
                   "categories": v["categories"]} for m, v in strategy.last_markets.items()}
    write_metrics(tmp_path / "metrics.json", [{"round": 1, "markets": markets}])
    doc = json.loads((tmp_path / "metrics.json").read_text())
    for m in ("m0", "m1"):
        cats = doc["final"]["markets"][m]["categories"]
        assert set(cats) == set(own[m]["categories"]) and len(cats) > 1
        for c, v in own[m]["categories"].items():
            assert cats[c]["ndcg@10"] == pytest.approx(v["ndcg@10"])
            assert cats[c]["examples"] == v["examples"]


# --------------------------------------------------------------------------- benchmark parts
def test_within_category_scores_rank_only_own_category():
    item_category = np.array([0, 1, 0, 1, 0])
    cands = np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4]])
    scores = torch.tensor([[1.0, 5.0, 0.5, 6.0, 0.0], [1.0, 5.0, 0.5, 0.0, 0.0]])
    ndcg, _ = ndcg_hr_at_k(within_category_scores(scores, cands, item_category), 1)
    # user 0: category-1 items outscore it but do not count -> top of its category
    # user 1 (category 1): only candidate 3 competes and scores lower -> top
    assert ndcg.tolist() == [1.0, 1.0]
    assert ndcg_hr_at_k(scores, 1)[0].tolist() == [0.0, 0.0]


def test_pooled_categories_and_comparison():
    per_market = {"a": {"categories": {"x": {"ndcg@10": 0.2, "hr@10": 0.4, "examples": 1},
                                       "y": {"ndcg@10": 0.5, "hr@10": 0.5, "examples": 2}}},
                  "b": {"categories": {"x": {"ndcg@10": 0.5, "hr@10": 1.0, "examples": 3}}}}
    pooled = pooled_categories(per_market)
    assert pooled["x"]["ndcg@10"] == pytest.approx((0.2 + 1.5) / 4)
    assert pooled["x"]["examples"] == 4 and pooled["y"]["ndcg@10"] == 0.5

    def meth(vals):
        cats = {c: {"ndcg@10": v, "ndcg@10_std": 0.0, "within_ndcg@10": v,
                    "within_ndcg@10_std": 0.0} for c, v in vals.items()}
        avg = float(np.mean(list(vals.values())))
        return {"categories": cats, "category_average": {"ndcg@10": avg,
                                                         "within_ndcg@10": avg}}

    res = compare({"single-task": meth({"s": 0.1, "m": 0.3, "l": 0.4}),
                   "shared-bottom": meth({"s": 0.2, "m": 0.33, "l": 0.38}),
                   "mmoe": meth({"s": 0.2, "m": 0.3, "l": 0.41})},
                  {"s": 10, "m": 100, "l": 1000})
    assert res["small_categories"] == ["s"]
    mixed = res["mixed"]
    assert mixed["shared_bottom_vs_single_task_avg_gain"] == pytest.approx(0.91 / 0.8 - 1)
    assert mixed["small_gain_most"] and mixed["small_mean_gain"] == pytest.approx(1.0)
    assert [e["category"] for e in mixed["negative_transfer"]] == ["l"]
    assert mixed["negative_transfer"][0]["mmoe_fixes"] is True
