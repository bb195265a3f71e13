"""SecAgg+ (server/secagg.py, client/secagg.py, shared/secagg.py) and DP (shared/dp.py).

Protocol tests run the real ServerApp loop (``run_server_secagg``) and the real ClientApp in one
process through ``FakeGrid``, which delivers each message to the ClientApp of its node (one
Flower ``Context`` per node, kept across messages as a SuperNode keeps it) and records every
reply the server receives. One slow test goes through Flower's simulation engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

import storefed.client.secagg as client_secagg
from storefed.client.client_app import make_app
from storefed.server.secagg import run_server_secagg
from storefed.shared.config import RunConfig
from storefed.shared.data import load_catalog
from storefed.shared.dp import closed_form_epsilon, epsilon_spent, privatize
from storefed.shared.errors import ConfigError
from storefed.shared.node import initial_encoder
from storefed.shared.secagg import (
    MESSAGE_TYPE,
    RECORD,
    RECORD_NEXT,
    SEED_BYTES,
    VectorLayout,
    decode,
    encode,
    neighbours,
    prg_mask,
    quant_step,
    with_stats,
)
from storefed.shared.wire import WEIGHT_PREFIX, apply_summed_update, state_from_record, sum_updates

ROOT = Path(__file__).resolve().parents[1]
BASE = {"embedding-dim": 8, "local-epochs": 1, "device": "cpu", "num-rounds": 1,
        "secagg": True, "torch-threads": 1}


class FakeGrid(Grid):
    """In-process Grid: node ``i`` runs ``app`` with partition-id ``i``."""

    def __init__(self, app, n: int, run_config: dict) -> None:
        self.app = app
        self.ids = [101 + 7 * i for i in range(n)]
        self.contexts = {nid: Context(run_id=1, node_id=nid,
                                      node_config={"partition-id": i, "num-partitions": n},
                                      state=RecordDict(), run_config=dict(run_config))
                         for i, nid in enumerate(self.ids)}
        self.received: list[Message] = []
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self):  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.ids)

    def push_messages(self, messages):  # pragma: no cover - unused
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - unused
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
            ctx = self.contexts[msg.metadata.dst_node_id]
            try:
                reply = self.app(msg, ctx)
            except Exception as exc:  # noqa: BLE001 - a failing ClientApp = an error reply
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            self.received.append(reply)
            replies.append(reply)
        return replies


def drop_mod(market_index: int, stage: str, rounds: tuple[int, ...] = (1,)):
    """A client mod making one node fail at one SecAgg+ stage (as a crashed node)."""

    def mod(msg, ctx, call_next):
        if (msg.metadata.message_type == MESSAGE_TYPE
                and ctx.node_config["partition-id"] == market_index
                and msg.content.config_records[RECORD]["stage"] == stage
                and msg.content.config_records[RECORD]["round"] in rounds):
            raise RuntimeError(f"injected dropout at {stage}")
        return call_next(msg, ctx)

    return mod


@pytest.fixture
def recorded(monkeypatch):
    """Every (market, float update) a client encodes: its true, unmasked update."""
    seen: list[tuple[str, dict[str, np.ndarray]]] = []
    real_encode = client_secagg.encode

    def spy(update, layout, clip, quant, rng, *rest):
        seen.append({k: np.array(v, copy=True) for k, v in update.items()})
        return real_encode(update, layout, clip, quant, rng, *rest)

    monkeypatch.setattr(client_secagg, "encode", spy)
    return seen


def run(tmp_path, markets, mods=None, **cfg_extra):
    overrides = {**BASE, "markets": ",".join(markets), "out-dir": str(tmp_path / "out"),
                 "state-dir": str(tmp_path / "state"), **cfg_extra}
    cfg = RunConfig.from_mapping(overrides)
    grid = FakeGrid(make_app(overrides, mods=mods), len(markets), overrides)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as the server
    doc = run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    catalog = load_catalog(cfg.dataset, None, seed=cfg.seed)
    glob = initial_encoder(cfg, catalog)
    new = torch.load(tmp_path / "out" / "encoder.pt", weights_only=False)["state"]
    return cfg, grid, doc, glob, new


def updates_by_market(grid, recorded):
    """Recorded updates -> {market: update}; the spy records in the order the nodes trained,
    which is the order of their first masked uploads (one training per node and round)."""
    markets = _train_order(grid)
    assert len(recorded) == len(markets)
    return dict(zip(markets, recorded, strict=True))


def _train_order(grid):
    labels = {int(msg.metadata.src_node_id): str(msg.content.config_records["info"]["market"])
              for msg in grid.received  # a node names its market with its setup keys only
              if not msg.has_error() and "info" in msg.content.config_records}
    order = []
    for msg in grid.received:
        if (not msg.has_error() and RECORD in msg.content.config_records
                and "arrays" in msg.content.array_records):  # masked uploads: trained nodes
            m = labels[int(msg.metadata.src_node_id)]
            if m not in order:
                order.append(m)
    return order


def check_average(cfg, glob, new, updates, doc):
    """New global == plain weighted average of ``updates`` within the stated bound."""
    plain = apply_summed_update(glob, sum_updates(list(updates)))
    summed = sum_updates(list(updates))
    step = quant_step(cfg.secagg_clip_range, cfg.secagg_quant_range)
    n = len(updates)
    assert doc["rounds"][-1]["secagg"]["sum_error_bound"] == pytest.approx(n * step)
    for k, g in glob.items():
        w = summed[WEIGHT_PREFIX + k].astype(np.float64)
        w = w.reshape((-1,) + (1,) * (g.dim() - 1)) if w.size > 1 else w[0]
        bound = n * step / np.where(w > 0, w, np.inf)  # float32 storage adds its own eps
        err = np.abs(new[k].double().numpy() - plain[k].double().numpy())
        assert np.all(err <= bound + 2e-7 * (1 + np.abs(plain[k].double().numpy()))), k
    moved = max(float((new[k] - glob[k]).abs().max()) for k in glob)
    assert moved > 1e-4  # the round did change the encoder


# ---------------------------------------------------------------------------- unit
def test_encode_decode_bound_and_clipping():
    rng = np.random.default_rng(0)
    glob = {"a": torch.zeros(5, 3), "encoder.item_emb.weight": torch.zeros(4, 2)}
    layout = VectorLayout.for_encoder(glob)
    ups = []
    for _ in range(3):
        u = {"a": rng.normal(0, 3, (5, 3)), WEIGHT_PREFIX + "a": np.array([7.0]),
             "encoder.item_emb.weight": rng.normal(0, 1, (4, 2)),
             WEIGHT_PREFIX + "encoder.item_emb.weight": np.array([7.0])}
        ups.append(with_stats(u, float(rng.random()), 7.0))
    clip, quant = 4.0, 2**20
    vecs = [encode(u, layout, clip, quant, rng) for u in ups]
    clipped = sum(c for _, c in vecs)
    expected = sum(int(np.sum(np.abs(u[k]) > clip)) for u in ups for k in ("a",
                   "encoder.item_emb.weight", "stat/train-loss"))
    assert clipped == expected and clipped > 0  # sd 3 vs clip 4: some values exceed it
    total = sum((v for v, _ in vecs), np.zeros(layout.size, dtype=np.uint64))
    got = decode(total, layout, clip, quant)
    # the counters are summed too: the server learns how many markets and clipped values
    assert got["counter/markets"][0] == 3 and got["counter/clipped"][0] == clipped
    got = {k: v for k, v in got.items() if not k.startswith("counter/")}
    clipped_ups = [{k: np.clip(v, -clip, clip) if not k.startswith(WEIGHT_PREFIX) else v
                    for k, v in u.items()} for u in ups]
    want = sum_updates(clipped_ups)
    step = quant_step(clip, quant)
    for k in want:
        if k.startswith(WEIGHT_PREFIX):
            assert np.array_equal(got[k], want[k])  # weights are exact
        else:
            assert np.abs(got[k] - want[k]).max() < 3 * step
    with pytest.raises(ValueError):
        encode({**ups[0], WEIGHT_PREFIX + "a": np.array([1.5])}, layout, clip, quant, rng)


def test_masks_cancel_and_graph_is_symmetric():
    a, b = b"\x01" * 32, b"\x02" * 32
    assert not np.array_equal(prg_mask(a, 10), prg_mask(b, 10))
    assert np.array_equal(prg_mask(a, 10), prg_mask(a, 10))
    x = np.arange(10, dtype=np.int64).view(np.uint64)
    y = x + prg_mask(a, 10)
    assert np.array_equal((y - prg_mask(a, 10)).view(np.int64), np.arange(10))
    # private-mask seeds: 31 bytes, so Flower's Shamir shares them in 2 chunks of 16 bytes
    seed = b"\x03" * SEED_BYTES
    assert len(create_shares(seed, 2, 3)[0]) == 4 + 2 * 16
    assert prg_mask(seed, 10).dtype == np.uint64 and not np.array_equal(prg_mask(seed, 10),
                                                                         prg_mask(a, 10))
    g = neighbours([5, 3, 9, 1, 7, 2, 8], shares=3)
    assert all(len(v) == 3 and k in v for k, v in g.items())
    assert all(k in g[v] for k, nb in g.items() for v in nb)
    assert all(len(v) == 7 for v in neighbours([1, 2, 3, 4, 5, 6, 7], 0).values())
    auto = neighbours(list(range(100, 120)), 0)  # 20 nodes: automatic ring of 11
    assert all(len(v) == 11 for v in auto.values())
    assert all(k in auto[v] for k, nb in auto.items() for v in nb)


def test_config_rejects_unsafe_secagg_and_dp_settings():
    with pytest.raises(ConfigError, match="secagg"):
        RunConfig.from_mapping({"dp-noise": 1.0, "dp-clip": 1.0, "secagg": False})
    with pytest.raises(ConfigError, match="dp-clip"):
        RunConfig.from_mapping({"secagg": True, "dp-noise": 1.0})
    with pytest.raises(ConfigError, match="secagg-threshold"):
        RunConfig.from_mapping({"secagg-threshold": 0.0})


def test_dp_clip_noise_and_epsilon():
    rng = np.random.default_rng(1)
    glob = {"x": torch.zeros(100), "y": torch.zeros(3, 3)}
    local = {"x": torch.ones(100), "y": torch.ones(3, 3)}
    out, norm = privatize(local, glob, clip=1.0, noise_std=0.0, rng=rng)
    assert norm == pytest.approx(np.sqrt(109))
    got = np.sqrt(sum(float((out[k] ** 2).sum()) for k in out))
    assert got == pytest.approx(1.0, rel=1e-5)
    noisy, _ = privatize(local, glob, clip=1.0, noise_std=0.5, rng=rng)
    assert float((noisy["x"] - out["x"]).std()) == pytest.approx(0.5, rel=0.3)
    eps = [epsilon_spent([s] * 5, 1e-5, 4)["epsilon"] for s in (0.5, 1.0, 2.0)]
    assert eps[0] > eps[1] > eps[2] > 0
    rdp = epsilon_spent([1.0] * 5, 1e-5, 4)
    assert rdp["method"] == "flwr RdpAccountant"
    # the closed form is a valid (looser or equal) bound of the same curve
    assert closed_form_epsilon([1.0] * 5, 1e-5) >= rdp["epsilon"] - 1e-6


# ---------------------------------------------------------------------------- protocol
def test_server_never_holds_a_plain_update_but_gets_the_average(tmp_path, recorded):
    markets = ["m0", "m1", "m2"]
    cfg, grid, doc, glob, new = run(tmp_path, markets)
    updates = updates_by_market(grid, recorded)
    assert sorted(updates) == markets
    rep = doc["rounds"][0]["secagg"]
    assert rep["attempts"][-1]["aggregated"] == markets and rep["clipped_values"] == 0
    layout = VectorLayout.for_encoder(glob)
    rng = np.random.default_rng(0)
    for m, u in updates.items():
        w, v = layout.flatten(u)
        plain_enc, _ = encode(u, layout, cfg.secagg_clip_range, cfg.secagg_quant_range, rng)
        for reply in grid.received:  # everything the server ever got from any node
            if reply.has_error():
                continue
            for rec in reply.content.array_records.values():
                for arr in rec.values():
                    a = arr.numpy().ravel()
                    if a.size == layout.size:
                        assert a.dtype == np.uint64
                        # the masked vector is not the encoded update; its difference from
                        # it looks uniform over 2**64 (not a small quantisation error)
                        diff = (a - plain_enc).view(np.int64)
                        assert np.median(np.abs(diff.astype(np.float64))) > 2.0**50
                    for plain in (v, w, v.astype(np.float32)):
                        if a.size == plain.size:
                            assert not np.allclose(a.astype(np.float64), plain, atol=1e-3)
                    for k, arr_u in u.items():  # no tensor of the update travels as such
                        if arr_u.size == a.size and arr_u.size > 1:
                            assert not np.allclose(a.astype(np.float64), arr_u.ravel(),
                                                   atol=1e-3), (m, k)
    check_average(cfg, glob, new, list(updates.values()), doc)
    assert set(doc["final"]["markets"]) == set(markets)


@pytest.mark.parametrize("stage", ["setup", "share-keys", "masked-upload", "unmask"])
def test_dropout_in_each_stage_completes_with_survivors(tmp_path, recorded, stage):
    markets = ["m0", "m1", "m2", "m3"]
    cfg, grid, doc, glob, new = run(tmp_path, markets, mods=[drop_mod(1, stage)])
    rep = doc["rounds"][0]["secagg"]
    # a node that fails at setup never said which market it serves
    assert rep["dropped"] == {stage: [f"node-{grid.ids[1]}" if stage == "setup" else "m1"]}
    assert "pipelined" not in rep["attempts"][0] or not rep["attempts"][0]["pipelined"]
    # a node dropping at unmask already uploaded: its update is in the sum (its private mask is
    # rebuilt from its neighbours' shares); earlier dropouts are left out
    expected = markets if stage == "unmask" else ["m0", "m2", "m3"]
    assert len(rep["attempts"]) == 1 and rep["attempts"][0]["aggregated"] == expected
    updates = updates_by_market(grid, recorded)
    check_average(cfg, glob, new, [updates[m] for m in expected], doc)
    assert sorted(doc["rounds"][0]["markets"]) == markets  # every market is still evaluated


def test_retry_when_dropout_leaves_a_secret_underprotected(tmp_path, recorded):
    # ring of 3 neighbours with threshold 3 of 3: losing m1 at share-keys leaves its two
    # neighbours' secrets with only 2 holders, so the round restarts with the 3 survivors
    # (fully connected then), without retraining anyone
    markets = ["m0", "m1", "m2", "m3"]
    cfg, grid, doc, glob, new = run(tmp_path, markets, mods=[drop_mod(1, "share-keys")],
                                    **{"secagg-shares": 3, "secagg-threshold": 1.0})
    rep = doc["rounds"][0]["secagg"]
    assert len(rep["attempts"]) == 2 and "failed" in rep["attempts"][0]
    assert rep["attempts"][1]["aggregated"] == ["m0", "m2", "m3"]
    updates = updates_by_market(grid, recorded)  # asserts one encode (training) per market
    check_average(cfg, glob, new, [updates[m] for m in ("m0", "m2", "m3")], doc)


def test_client_refuses_out_of_order_and_unsafe_requests(tmp_path, recorded):
    markets = ["m0", "m1"]
    cfg, grid, doc, glob, new = run(tmp_path, markets)
    nid = grid.ids[0]
    ctx = grid.contexts[nid]
    app = grid.app
    from flwr.app import ConfigRecord

    def ask(rec):
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        msg = Message(RecordDict({RECORD: ConfigRecord(rec)}), dst_node_id=nid,
                      message_type=MESSAGE_TYPE, group_id="1")
        with pytest.raises(client_secagg.SecAggRefusedError):
            app(msg, ctx)

    # the round finished at unmask: a second unmask of the same attempt is refused
    ask({"stage": "unmask", "round": 1, "attempt": 0, "active": [nid], "dead": []})
    ask({"stage": "masked-upload", "round": 1, "attempt": 0, "srcs": [], "ctxts": []})


def test_dp_mode_reports_epsilon_and_averages_clipped_updates(tmp_path, recorded):
    markets = ["m0", "m1", "m2"]
    cfg, grid, doc, glob, new = run(tmp_path, markets, **{"dp-noise": 0.5, "dp-clip": 0.5,
                                                          "num-rounds": 2})
    priv = doc["privacy"]
    assert priv["method"] == "flwr RdpAccountant" and priv["releases"] == 2
    assert 0 < priv["epsilon"] < float("inf")
    assert doc["rounds"][1]["secagg"]["epsilon"] == pytest.approx(priv["epsilon"])
    assert doc["rounds"][0]["secagg"]["epsilon"] < priv["epsilon"]
    # DP updates are unweighted, clipped (L2 <= clip before noise) and noised
    for u in recorded:
        assert all(float(u[WEIGHT_PREFIX + k][0]) == 1.0 for k in glob)
        assert u[WEIGHT_PREFIX + "encoder.item_emb.weight"].shape == (1,)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_storefed_simulate_secagg_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "storefed.simulations.cli", "simulate", "--secagg",
                          "--rounds", "2", "--markets", "m0,m1,m2", "--out", str(out),
                          "--config", "embedding-dim=8", "--config", "local-epochs=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    for r in doc["rounds"]:
        rep = r["secagg"]
        assert rep["attempts"][-1]["aggregated"] == ["m0", "m1", "m2"]
        assert rep["clipped_values"] == 0 and not r["rejected"]
    # round 2 was prepared during round 1 (piggybacked through Flower's engine): its keys, and
    # its masked upload with round 1's evaluation, where the enrolled markets also signed the
    # survivor set; round 1 ran every stage, the consistency check as its own exchange
    assert doc["rounds"][1]["secagg"]["attempts"][0]["pipelined"] is True
    assert set(doc["rounds"][1]["secagg"]["stage_seconds"]) == {"unmask", "server-unmask"}
    assert "consistency" in doc["rounds"][0]["secagg"]["stage_seconds"]
    assert "not authenticated" not in res.stderr
    assert doc["final"]["average"]["ndcg@10"] > 0.05


def eval_drop_mod(market_index: int, rnd: int):
    """Make one node fail its evaluate message of one round (it carries the next round's
    piggybacked masked upload)."""

    def mod(msg, ctx, call_next):
        if (msg.metadata.message_type == "evaluate"
                and ctx.node_config["partition-id"] == market_index
                and msg.content.config_records["config"]["server-round"] == rnd):
            raise RuntimeError("injected dropout at evaluate")
        return call_next(msg, ctx)

    return mod


def round_start(grid, rnd):
    """The global encoder round ``rnd`` trained from (its masked-upload requests carry it,
    whether on ``train.secagg`` or on the previous round's evaluate messages)."""
    for msg in grid.sent:
        rec = msg.content.config_records.get(RECORD)
        if rec is not None and rec["stage"] == "masked-upload" and rec["round"] == rnd:
            return state_from_record(msg.content.array_records["arrays"])
    raise AssertionError(f"no masked-upload message for round {rnd}")


def secagg_stages(grid, rnd):
    """(message type, stage) of every message that carried a stage of round ``rnd``."""
    out = set()
    for m in grid.sent:
        for key in (RECORD, RECORD_NEXT):
            rec = m.content.config_records.get(key)
            if rec is not None and rec["round"] == rnd:
                out.add((m.metadata.message_type, rec["stage"]))
    return out


@pytest.mark.parametrize("fail", ["none", "masked upload with evaluation",
                                  "unmask + next share-keys"])
def test_pipelined_rounds(tmp_path, recorded, fail):
    """Round 2 is prepared during round 1 (setup on the masked upload, share-keys on unmask,
    the masked upload on evaluation), so it costs one exchange of its own (unmask); a dropout
    in a piggybacked stage still leaves a correct round 2."""
    markets = ["m0", "m1", "m2", "m3"]  # losing one still leaves min-markets (3) in a sum
    mods = {"none": [], "masked upload with evaluation": [eval_drop_mod(1, 1)],
            "unmask + next share-keys": [drop_mod(1, "unmask", rounds=(1,))]}[fail]
    cfg, grid, doc, glob, new = run(tmp_path, markets, mods=mods, **{"num-rounds": 2})
    r1, r2 = (r["secagg"] for r in doc["rounds"])
    assert r1["attempts"][0]["aggregated"] == markets
    stages_r2 = secagg_stages(grid, 2)
    if fail == "masked upload with evaluation":
        # m1 did not upload: the pipelined attempt is abandoned before any unmask and the
        # round runs the full protocol with the three that did (a free retry)
        assert r2["attempts"][0] == {"attempt": 0, "pipelined": True,
                                     "failed": "1 node(s) of the survivor set did not upload"}
        assert r2["attempts"][1]["pipelined"] is False
        assert ("train.secagg", "setup") in stages_r2
        assert r2["dropped"]["masked-upload"] == ["m1"]
        expected = ["m0", "m2", "m3"]
    else:
        assert len(r2["attempts"]) == 1 and r2["attempts"][0]["pipelined"] is True
        assert stages_r2 == {("train.secagg", "setup"), ("train.secagg", "share-keys"),
                             ("evaluate", "masked-upload"), ("train.secagg", "unmask")}
        # setup and share-keys of round 2 rode on round 1's masked upload and unmask
        assert not [m for m in grid.sent if m.metadata.message_type == MESSAGE_TYPE
                    and m.content.config_records[RECORD]["round"] == 2
                    and m.content.config_records[RECORD]["stage"] != "unmask"]
        expected = markets if fail == "none" else ["m0", "m2", "m3"]
        if fail != "none":
            assert r2["dropped"] == {"share-keys": ["m1"]}
    assert r2["attempts"][-1]["aggregated"] == expected
    assert sorted(doc["rounds"][1]["markets"]) == markets  # every market is evaluated
    round2 = recorded[len(markets):]  # round-1 updates come first
    assert len(round2) == len(expected)
    check_average(cfg, round_start(grid, 2), new, round2, doc)


# ---------------------------------------------------------------------------- default + wiring
def test_secagg_is_the_default_and_needs_two_markets_per_round(tmp_path):
    from storefed.server.rounds import prepare_run

    assert RunConfig().secagg is True  # pyproject == dataclass is checked in test_config
    out = {"out-dir": str(tmp_path / "o"), "embedding-dim": 8}
    with pytest.raises(ConfigError, match="secagg needs at least 2 markets"):
        prepare_run(RunConfig.from_mapping({**out, "markets": "m0"}))
    with pytest.raises(ConfigError, match="secagg needs at least 2 markets"):
        prepare_run(RunConfig.from_mapping({**out, "markets": "m0,m1,m2",
                                            "fraction-train": 0.5}))
    prepare_run(RunConfig.from_mapping({**out, "markets": "m0", "secagg": False}))
    prepare_run(RunConfig.from_mapping({**out, "markets": "m0,m1"}))


def test_cli_secagg_flags_and_deploy_run_default(tmp_path, monkeypatch):
    import tomllib

    import storefed.simulations.deploy_cli as deploy
    from storefed.simulations.cli import _parser
    from storefed.simulations.simulate import config_from_args

    for flags, want in (([], True), (["--no-secagg"], False), (["--secagg"], True)):
        args = _parser("simulate")[0].parse_args(["simulate", "--markets", "m0,m1", *flags])
        assert config_from_args(args, secagg=args.secagg).secagg is want, flags
        args = _parser("deploy")[0].parse_args(["deploy", "demo", *flags])
        assert args.secagg is (None if not flags else want)

    submitted = []

    def fake_submit(app_dir, values, env, connection):
        doc = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
        submitted.append((doc["tool"]["flwr"]["app"]["config"]["secagg"], dict(values)))
        return 7

    monkeypatch.setattr(deploy, "submit_run", fake_submit)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    from storefed.simulations.cli import main

    base = ["deploy", "run", "--markets", "m0,m1", "--out", str(tmp_path / "o"), "--no-wait"]
    assert main(base) == 0 and main([*base, "--no-secagg"]) == 0
    (app_default, v1), (_, v2) = submitted
    assert app_default is True and "secagg" not in v1  # the app's default: SecAgg+ on
    assert v2["secagg"] is False


def test_secagg_runs_are_reproducible(tmp_path, recorded):
    """Seeded rounding + exact integer sums: the same seed gives a bit-identical encoder."""
    markets = ["m0", "m1", "m2"]
    *_, new_a = run(tmp_path / "a", markets)
    *_, new_b = run(tmp_path / "b", markets)
    assert all(torch.equal(new_a[k], new_b[k]) for k in new_a)


class FakeHttpGrid(FakeGrid, HttpGrid):
    """``FakeGrid`` posing as Flower's deployment grid: replies are produced at push time and
    handed out by ``pull_messages``, so ``server.exchange`` takes its fast-poll path."""

    def __init__(self, app, n: int, run_config: dict) -> None:
        FakeGrid.__init__(self, app, n, run_config)
        self.pending: dict[str, Message] = {}
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            (reply,) = FakeGrid.send_and_receive(self, [msg])
            self.pending[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages, *, timeout=None):  # Flower's: a fixed 3 s poll
        raise AssertionError("SecAgg+ must use server.exchange, not HttpGrid.send_and_receive")


def test_secagg_exchanges_use_the_fast_poll_on_the_deployment_grid(tmp_path, recorded):
    markets = ["m0", "m1", "m2"]
    overrides = {**BASE, "markets": ",".join(markets), "out-dir": str(tmp_path / "out"),
                 "state-dir": str(tmp_path / "state"), "num-rounds": 2}
    cfg = RunConfig.from_mapping(overrides)
    grid = FakeHttpGrid(make_app(overrides), len(markets), overrides)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    doc = run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    assert [r["secagg"]["attempts"][-1]["aggregated"] for r in doc["rounds"]] == [markets] * 2
    assert doc["rounds"][1]["secagg"]["attempts"][0]["pipelined"] is True
    stages = {m.content.config_records[RECORD]["stage"] for m in grid.sent
              if m.metadata.message_type == MESSAGE_TYPE}
    assert stages == {"setup", "share-keys", "masked-upload", "unmask"}
    assert grid.pulls > 0 and not grid.pending


def test_benchmark_secagg_interleaves_arms_and_profiles_the_protocol(tmp_path):
    from storefed.simulations.experiments.secagg_bench import run_bench

    cfg = RunConfig.from_mapping({**BASE, "markets": "m0,m1", "num-rounds": 2})
    report = run_bench(cfg, [2], tmp_path, [], 0.5, engine="inprocess", repeats=2)
    (row,) = report["rows"]
    assert row["order"] == ["plain", "secagg", "secagg", "plain"] and row["complete"]
    assert len(row["ratio_round_per_repeat"]) == 2 and row["ratio_round"] > 0
    assert row["ratio_cpu"] > 0 and row["plain_cpu_round_s"] > 0
    prof = row["secagg_profile_s_per_round"]
    for bucket in ("key agreement", "share generation", "share decryption", "encoding",
                   "masking", "unmasking", "local training", "evaluation"):
        assert prof[bucket] > 0, bucket
    assert 0 < row["secagg_protocol_s_per_round"] < sum(prof.values())
    # same seed, same data: SecAgg+ changes the aggregate only by its fixed-point rounding
    assert abs(row["ndcg_rel_diff"]) < 0.01
    assert json.loads((tmp_path / "secagg_bench.json").read_text())["rows"][0]["clients"] == 2
