"""What a client sends: only the encoder update and metrics; heads and users never leave."""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from storefed.client.client_app import make_app
from storefed.shared.config import RunConfig
from storefed.shared.data import load_market
from storefed.shared.node import initial_encoder
from storefed.shared.policy import PrivacyPolicy, write_policy
from storefed.shared.wire import LAYOUT_KEY, PACKED_KEY, WEIGHT_PREFIX, from_record

OVERRIDES = {"embedding-dim": 8, "local-epochs": 1, "markets": "m0,m1", "device": "cpu"}


def run_client(tmp_path, message_type, state=None):
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as the server
    cfg = RunConfig.from_mapping({**OVERRIDES, "state-dir": str(tmp_path)})
    catalog, _ = load_market(cfg.dataset, None, "m0")
    glob = initial_encoder(cfg, catalog)
    app = make_app({**OVERRIDES, "state-dir": str(tmp_path)})
    # these tests read the plain-FedAvg reply: m0's own policy lets it out
    write_policy(tmp_path / "m0", PrivacyPolicy(secure_aggregation_only=False))
    msg = Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=glob),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=message_type)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2},
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
