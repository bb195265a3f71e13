"""What a client sends: only the encoder update and metrics; heads and users never leave."""

import json
import os

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from storefed.client.client_app import make_app
from storefed.client.serve import ModelStore
from storefed.shared.config import RunConfig
from storefed.shared.data import load_market
from storefed.shared.node import initial_encoder
from storefed.shared.policy import PrivacyPolicy, write_policy
from storefed.shared.ranker import RANKER_FILE, load_ranker
from storefed.shared.serving_state import load_serving, serving_path
from storefed.shared.wire import LAYOUT_KEY, PACKED_KEY, WEIGHT_PREFIX, from_record

OVERRIDES = {"embedding-dim": 8, "local-epochs": 1, "markets": "m0,m1", "device": "cpu"}


def run_client(tmp_path, message_type, state=None, node_config=None, overrides=None):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as the server
    over = {**OVERRIDES, **(overrides or {}), "state-dir": str(tmp_path)}
    cfg = RunConfig.from_mapping(over)
    catalog, _ = load_market(cfg.dataset, None, "m0")
    glob = initial_encoder(cfg, catalog)
    app = make_app(over)
    # these tests read the plain-FedAvg reply: m0's own policy lets it out
    write_policy(tmp_path / "m0", PrivacyPolicy(secure_aggregation_only=False))
    msg = Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=glob),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=message_type)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2,
                                                    **(node_config or {})},
                  state=state if state is not None else RecordDict(), run_config={})
    return app(msg, ctx), ctx, glob


def test_train_reply_carries_only_encoder_tensors(tmp_path):
    reply, ctx, glob = run_client(tmp_path, MessageType.TRAIN)
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.array_records) == {"arrays"}
    assert set(content["arrays"].keys()) == {PACKED_KEY, LAYOUT_KEY}  # packed on the wire
    decoded = from_record(content["arrays"])
    sent = set(decoded)
    expected = set(glob) | {WEIGHT_PREFIX + k for k in glob}
    assert sent == expected
    assert not any(k.startswith("heads.") or "user" in k for k in sent)
    # no array anywhere in the reply has a per-user dimension or a head's shape
    n_users = load_market("synthetic", None, "m0")[1].n_users
    for arr in decoded.values():
        assert n_users not in arr.shape
    assert set(content.metric_records["metrics"].keys()) >= {"num-examples", "train-loss"}
    assert set(content.config_records) == {"info"}
    # heads stayed home: in the node's state and on disk
    assert "private" in ctx.state
    assert any(k.startswith("heads.") for k in ctx.state["private"].keys())
    assert (tmp_path / "m0" / "private.pt").is_file()


def test_update_is_the_weighted_delta(tmp_path):
    reply, _, glob = run_client(tmp_path, MessageType.TRAIN)
    arrays = from_record(reply.content["arrays"])
    w = arrays[WEIGHT_PREFIX + "encoder.experts.0.0.weight"]
    assert w.shape == (1,) and w[0] > 0
    delta = arrays["encoder.experts.0.0.weight"] / w[0]
    assert np.abs(delta).max() > 0  # training moved the encoder


def test_evaluate_reply_has_metrics_only(tmp_path):
    reply, _, _ = run_client(tmp_path, MessageType.EVALUATE)
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records
    metrics = reply.content["metrics"]
    assert 0.0 <= metrics["ndcg@10"] <= 1.0 and metrics["num-examples"] > 0
    assert any(k.startswith("cat/") for k in metrics.keys())


def test_a_ranking_node_keeps_its_ranker_for_its_service_and_sends_nothing_of_it(tmp_path):
    """Node config ``ranker = true``: the evaluation fits the market's ranker to the model it
    evaluated and keeps it beside the serving file where it beats the model on valid (here an
    untrained encoder without the item-kNN term: the ranker's own kNN and EASE features win),
    the service ranks with it, and the reply is the same metrics-only reply; without the flag
    no ranker is written, and one that does not beat the model is not kept."""
    strong, _, _ = run_client(tmp_path / "knn", MessageType.EVALUATE,
                              node_config={"ranker": True})  # the model with its kNN term
    assert not (tmp_path / "knn" / "m0" / RANKER_FILE).exists()
    no_knn = {"item-knn": False}
    plain, _, _ = run_client(tmp_path / "plain", MessageType.EVALUATE, overrides=no_knn)
    assert not (tmp_path / "plain" / "m0" / RANKER_FILE).exists()
    reply, _, _ = run_client(tmp_path, MessageType.EVALUATE, node_config={"ranker": True},
                             overrides=no_knn)
    assert not reply.has_error(), reply.error
    assert not reply.content.array_records
    assert set(reply.content["metrics"].keys()) == set(plain.content["metrics"].keys())
    ranker = load_ranker(tmp_path / "m0" / RANKER_FILE, "m0")
    assert ranker.model_version == load_serving(serving_path(tmp_path, "m0"), "m0").version
    store = ModelStore(tmp_path, "m0", "synthetic", "")
    assert store.check() and store.current is not None and store.current.ranker is not None
    served = store.current
    _, split = load_market("synthetic", None, "m0")
    ev = split.test
    hist = [h[h != served.data.catalog.pad_index] for h in ev.histories[:5]]
    items = ev.candidates[0]
    got = served.scores(hist, items)
    want = ranker.rank(served.model, served.ranker[1], ev.histories[:5],
                       np.broadcast_to(items, (5, len(items))), torch.device("cpu"))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        own = served.model.score_items(torch.as_tensor(ev.histories[:5]), torch.as_tensor(items))
    assert not np.allclose(got.numpy(), own.numpy())
    # a ranker fitted to another model (an earlier round's) is never used on this one
    doc = json.loads((tmp_path / "m0" / RANKER_FILE).read_text())
    (tmp_path / "m0" / RANKER_FILE).write_text(json.dumps({**doc, "model_version": "0" * 12}))
    path = serving_path(tmp_path, "m0")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert store.check() and store.current is not None and store.current.ranker is None


def test_heads_persist_across_restarts(tmp_path):
    reply, ctx, _ = run_client(tmp_path, MessageType.TRAIN)
    heads_mem = ctx.state["private"].to_torch_state_dict()
    # a restarted node has an empty context.state: it must restore heads from disk
    from storefed.shared.node import MarketNode

    cfg = RunConfig.from_mapping({**OVERRIDES, "state-dir": str(tmp_path)})
    node = MarketNode(cfg, "m0", tmp_path)
    assert node.restore(None) == "disk"
    for k, v in node.private().items():
        assert torch.equal(v, heads_mem[k])
