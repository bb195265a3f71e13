"""A deviating server and a malicious market against the real client and server code.

Each test plays the attacker through ``FakeGrid`` (the real ClientApp of every market, the real
SecAgg+ round of ``server/secagg.py``) and checks that the attack no longer works: what the
attacker would recover is not there, or the round is abandoned cleanly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import storefed.client.secagg as client_secagg
import storefed.server.secagg as server_secagg
from storefed.client.client_app import make_app
from storefed.shared.config import RunConfig
from storefed.shared.data import load_catalog
from storefed.shared.node import MarketNode, initial_encoder
from storefed.shared.secagg import (
    CONSISTENCY,
    MASKED,
    MASKED_KEY,
    MESSAGE_TYPE,
    RECORD,
    RECORD_NEXT,
    UNMASK,
    VectorLayout,
    generate_keys,
    pair_sign,
    prg_mask,
    shared_key,
)
from storefed.shared.wire import to_record
from tests.test_secagg import FakeGrid

BASE = {"embedding-dim": 4, "local-epochs": 1, "device": "cpu", "num-rounds": 1,
        "secagg": True, "torch-threads": 1, "item-knn": False, "eval-negatives": 20}


def _setup(tmp_path, n: int, mods=None, **extra):
    markets = [f"m{i}" for i in range(n)]
    overrides = {**BASE, "markets": ",".join(markets), "out-dir": str(tmp_path / "out"),
                 "state-dir": str(tmp_path / "state"), **extra}
    cfg = RunConfig.from_mapping(overrides)
    grid = FakeGrid(make_app(overrides, mods=mods), n, overrides)
    glob = initial_encoder(cfg, load_catalog(cfg.dataset, None, seed=cfg.seed))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return cfg, grid, glob


@pytest.fixture
def spies(monkeypatch):
    """Every vector a client encodes (by node, in order) and every sum the server decodes."""
    seen: dict[str, list] = {"encoded": [], "decoded": [], "market": [], "round": [],
                             "encoded_round": []}
    real_encode, real_decode = client_secagg.encode, server_secagg.decode
    real_train = MarketNode.train_round

    def train(self, *a, **kw):
        seen["market"].append(self.market)
        seen["round"].append(int(a[1]))
        return real_train(self, *a, **kw)

    def encode(update, layout, clip, quant, rng, *rest):
        vec, clipped = real_encode(update, layout, clip, quant, rng, *rest)
        seen["encoded"].append((seen["market"][-1], vec.copy()))
        seen["encoded_round"].append(seen["round"][-1])
        return vec, clipped

    def decode(*a, **kw):
        out = real_decode(*a, **kw)
        seen["decoded"].append(out)
        return out

    monkeypatch.setattr(MarketNode, "train_round", train)
    monkeypatch.setattr(client_secagg, "encode", encode)
    monkeypatch.setattr(server_secagg, "decode", decode)
    return seen


def test_restart_differencing_recovers_nothing(tmp_path, spies):
    """The server lets round 1 of {m0..m3} reach unmask and decodes its sum, then runs round
    1 again with {m0, m1, m2}: if the markets re-uploaded the same update, the difference of
    the two sums would be m3's update."""
    cfg, grid, glob = _setup(tmp_path, 4)
    server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    assert len(spies["decoded"]) == 1
    sa = server_secagg.SecAggRound(grid, cfg, 1, glob, grid.ids[:3])
    again = sa.run()
    if again.summed is not None:  # the attack got a second sum: does it single out m3?
        first = spies["decoded"][0]
        (vec,) = [v for m, v in spies["encoded"] if m == "m3"]
        m3 = server_secagg.decode(vec, sa.layout, cfg.secagg_clip_range,
                                  cfg.secagg_quant_range)  # m3's own encoded update
        k = "encoder.item_emb.weight"
        diff = first[k] - again.summed[k]
        assert not np.allclose(diff, m3[k], atol=1e-6), "the two sums differ by m3's update"
    assert again.summed is None  # the markets refuse to put their update into a second sum


def _split_unmask(grid, cfg, glob, threshold: int) -> dict[str, object]:
    """A server that tells some neighbours of X that X survived and the others that it
    dropped, to rebuild both X's mask seed and its secret key, i.e. X's unmasked vector."""
    nodes = list(grid.ids)
    sa = server_secagg.SecAggRound(grid, cfg, 1, glob, nodes)
    sa.cfg = cfg.replace(secagg_threshold=1.0)
    ring = sa._setup(0, sa._send("setup", {n: RecordDict({RECORD: sa._setup_record(1, 0)})
                                           for n in nodes}, 60), RECORD)
    ring.t = threshold  # the server picks the threshold it announces
    try:
        sa._share_keys(ring, sa._send("share-keys", {n: RecordDict({RECORD: rec}) for n, rec
                                                     in sa._share_records(ring).items()}, 60))
    except server_secagg.AttemptFailedError:
        return {"refused": "share-keys"}
    if len(ring.u2) < len(nodes):
        return {"refused": "share-keys"}
    layout = sa.layout
    rep = sa._send(MASKED, {n: RecordDict({
        "arrays": to_record(glob), "config": ConfigRecord({"server-round": 1}),
        RECORD: ConfigRecord({"round": 1, "attempt": 0, "stage": MASKED,
                              "srcs": ring.fwd[n][0], "ctxts": ring.fwd[n][1],
                              "sampled": len(nodes), "size": layout.size,
                              "rowwise": bool(getattr(sa, "rowwise", False)),
                              "clip-range": float(cfg.secagg_clip_range),
                              "quant-range": int(cfg.secagg_quant_range)})}) for n in nodes},
        60)
    x = nodes[-1]
    masked = rep[x].content.array_records["arrays"][MASKED_KEY].numpy()
    others = [n for n in nodes if n != x]
    best: dict[str, object] = {"refused": None, "recovered": None}
    # the best split: X and t - 1 neighbours reveal seed shares, all the others key shares
    alive_to, dead_to = others[:threshold - 1], others[threshold - 1:]
    seed_shares, key_shares = [], []
    asks = {n: {"active": nodes, "dead": []} for n in [*alive_to, x]}
    asks.update({n: {"active": [v for v in nodes if v != x], "dead": [x]} for n in dead_to})
    for n, lists in asks.items():
        reply = sa._send(UNMASK, {n: RecordDict({RECORD: ConfigRecord({
            "round": 1, "attempt": 0, "stage": UNMASK, **lists})})}, 60).get(n)
        if reply is None:
            continue
        rec = reply.content.config_records[RECORD]
        for owner, share in zip(rec["nids"], rec["shares"], strict=True):
            if owner == x:
                (seed_shares if x in lists["active"] else key_shares).append(share)
    if len(seed_shares) >= threshold and len(key_shares) >= threshold:
        seed = combine_shares(seed_shares[:threshold])
        sk1 = combine_shares(key_shares[:threshold])
        vec = masked.astype(np.uint64) - prg_mask(seed, masked.shape[0])
        for n in others:
            mask = prg_mask(shared_key(sk1, ring.pks[n][0]), masked.shape[0])
            vec = vec - mask if pair_sign(x, n) > 0 else vec + mask
        best["recovered"] = vec
    return best


@pytest.mark.parametrize("threshold", [2, 3])
def test_split_unmask_rebuilds_no_market(tmp_path, spies, threshold):
    cfg, grid, glob = _setup(tmp_path, 4)
    out = _split_unmask(grid, cfg, glob, threshold)
    if out.get("recovered") is not None:
        x_plain = dict(spies["encoded"])["m3"]  # X is the last node, m3
        assert not np.array_equal(out["recovered"], x_plain), "X's update was rebuilt"
    assert out.get("recovered") is None
    if threshold <= 2:  # a threshold of half the neighbourhood or less is refused outright
        assert out.get("refused") == "share-keys"


def _short_unmask_reply(index: int):
    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (ctx.node_config["partition-id"] == index and not reply.has_error()
                and msg.metadata.message_type == MESSAGE_TYPE
                and msg.content.config_records[RECORD]["stage"] == UNMASK):
            rec = reply.content.config_records[RECORD]
            rec["shares"] = list(rec["shares"])[:-1]
        return reply

    return mod


def test_a_malformed_unmask_reply_is_a_dropout_not_a_crash(tmp_path, spies):
    cfg, grid, glob = _setup(tmp_path, 4, mods=[_short_unmask_reply(1)])
    doc = server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    rep = doc["rounds"][0]["secagg"]
    assert "unmask" in rep["dropped"]  # m1's reply was thrown away, the round went on
    assert rep["attempts"][-1]["aggregated"] == ["m0", "m1", "m2", "m3"]


# ---------------------------------------------------------------------------- fuzzing
def _mutate(value, draw):
    kind = draw(st.sampled_from(["drop-item", "wrong-type", "garbage-bytes", "extra-item",
                                 "negate"]))
    if isinstance(value, list):
        if kind == "drop-item" and value:
            return value[:-1]
        if kind == "extra-item":
            return [*value, value[0] if value else 7]
        if kind == "garbage-bytes":
            return [b"\x00" * 3 for _ in value]
        return "not a list"
    if isinstance(value, bytes):
        return value[:-1] if kind == "drop-item" else b"\xff" * len(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return -value - 1
    return [1, 2]


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_replies_never_crash_the_server(tmp_path_factory, spies, data):
    """Any field of any stage's reply of one market, mutated, in round 1 (every stage its own
    exchange) or in round 2 (pipelined: setup on round 1's masked upload, share-keys on its
    unmask, the masked upload on its evaluation): every round completes or is abandoned
    cleanly, the server survives, and an accepted sum is exactly the honest sum of the
    markets it names (a shifted masked vector fails the sum's integrity check)."""
    for v in spies.values():
        v.clear()
    stage = data.draw(st.sampled_from(["setup", "share-keys", "masked-upload", "unmask"]))
    target = data.draw(st.integers(1, 2))  # the round whose stage is mutated
    victim = data.draw(st.integers(0, 3))
    tmp_path = tmp_path_factory.mktemp("fuzz")
    shifted: set[int] = set()

    def carried(msg) -> str | None:
        """The key of the record in ``msg`` that carries ``stage`` of round ``target``."""
        for key in (RECORD, RECORD_NEXT):
            rec = msg.content.config_records.get(key)
            if rec is not None and rec["stage"] == stage and rec["round"] == target:
                return key
        return None

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        key = carried(msg)
        if ctx.node_config["partition-id"] != victim or reply.has_error() or key is None:
            return reply
        if stage == MASKED:
            if "arrays" not in reply.content.array_records:  # the market refused
                return reply
            vec = reply.content.array_records["arrays"][MASKED_KEY].numpy().copy()
            how = data.draw(st.sampled_from(["shorter", "shifted", "float"]))
            if how == "shorter":
                vec = vec[:-1]
            elif how == "shifted":
                vec = vec + np.uint64(2**41)
                shifted.add(target)
            else:
                vec = vec.astype(np.float64)
            from flwr.app import Array, ArrayRecord  # noqa: PLC0415

            reply.content.array_records["arrays"] = ArrayRecord({MASKED_KEY: Array(vec)})
            return reply
        rec = reply.content.config_records.get(key)
        if rec:
            field = data.draw(st.sampled_from(sorted(rec.keys())))
            rec[field] = _mutate(rec[field], data.draw)
        return reply

    cfg, grid, glob = _setup(tmp_path, 4, mods=[mod], **{"num-rounds": 2})
    doc = server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    assert [r["round"] for r in doc["rounds"]] == [1, 2]  # the server survived both rounds
    layout = server_secagg.SecAggRound(grid, cfg, 1, glob, grid.ids).layout
    decoded = iter(list(spies["decoded"]))  # one decode per round that reached unmask
    for rnd in doc["rounds"]:
        aggregated = rnd["secagg"]["attempts"][-1].get("aggregated")
        if not aggregated:
            continue  # abandoned cleanly
        got = next(decoded)
        if rnd["rejected"]:
            continue  # rejected cleanly
        assert rnd["round"] not in shifted, "a shifted masked vector was accepted"
        honest = sum((v for (m, v), r in zip(spies["encoded"], spies["encoded_round"],
                                              strict=True)
                      if m in aggregated and r == rnd["round"]),
                     np.zeros_like(spies["encoded"][0][1]))
        want = server_secagg.decode(honest, layout, cfg.secagg_clip_range,
                                    cfg.secagg_quant_range)
        for k in want:
            assert np.array_equal(got[k], want[k]), (rnd["round"], k)


def _poison(index: int, what: str, amount: int, consistent: bool = True):
    """A malicious market: adds ``amount`` to every numerator slot of its vector (``values``)
    or to every weight slot (``weights``). ``consistent``: it also adds the change's integrity
    check to the check slot (the check is linear and public: what a market that poisons its
    input before encoding sends); otherwise it changes the masked vector only."""

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (ctx.node_config["partition-id"] == index and not reply.has_error()
                and msg.metadata.message_type == MESSAGE_TYPE
                and msg.content.config_records[RECORD]["stage"] == MASKED):
            from flwr.app import Array, ArrayRecord  # noqa: PLC0415

            vec = reply.content.array_records["arrays"][MASKED_KEY].numpy().copy()
            layout = _POISON_LAYOUT[0]
            start = layout.n_counters + layout.n_weights
            part = (slice(start, start + layout.n_values) if what == "values"
                    else slice(layout.n_counters, start))
            delta = np.zeros(vec.shape[0] - 1, dtype=np.uint64)
            delta[part] = np.uint64(amount)
            vec[:-1] += delta
            if consistent:
                from storefed.shared.secagg import checksum  # noqa: PLC0415

                vec[-1] += checksum(delta)
            reply.content.array_records["arrays"] = ArrayRecord({MASKED_KEY: Array(vec)})
        return reply

    return mod


_POISON_LAYOUT: list[VectorLayout] = []


@pytest.mark.parametrize("what,amount", [("values", 2**41), ("values", 2**52),
                                         ("weights", 2**41)])
def test_a_poisoning_market_moves_the_encoder_no_further_than_its_clip(tmp_path, spies, what,
                                                                       amount):
    """2**41 on every value moved the encoder by 1024 per value; now a market's influence is
    bounded by update-clip (the average of clipped deltas has an L2 norm of at most the
    clip), and a sum beyond what clipped markets could send is rejected. The market here
    poisons consistently (its integrity check matches), as one that poisons its input would."""
    cfg, grid, glob = _setup(tmp_path, 4, mods=[_poison(1, what, amount)])
    _POISON_LAYOUT[:] = [server_secagg.SecAggRound(grid, cfg, 1, glob, grid.ids).layout]
    doc = server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    new = torch.load(tmp_path / "out" / "encoder.pt", weights_only=False)["state"]
    step = float(sum(float(((new[k] - glob[k]).double() ** 2).sum()) for k in glob)) ** 0.5
    bound = getattr(cfg, "update_clip", 100.0)  # the default clip (older code: none)
    assert step <= bound, f"the encoder moved by {step:g} (L2)"
    if amount >= 2**52 or what == "weights":  # beyond any clipped market: rejected
        assert doc["rounds"][0]["rejected"] and step == 0.0


def test_a_masked_vector_changed_after_encoding_fails_the_integrity_check(tmp_path, spies):
    """A small change of one market's masked vector (inside every bound the sum checks
    have) would pass unseen without the check slot: the server rejects the sum."""
    cfg, grid, glob = _setup(tmp_path, 4, mods=[_poison(2, "values", 3, consistent=False)])
    _POISON_LAYOUT[:] = [server_secagg.SecAggRound(grid, cfg, 1, glob, grid.ids).layout]
    doc = server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    rejected = doc["rounds"][0]["rejected"]
    assert rejected and "integrity check" in str(rejected), doc["rounds"][0]
    new = torch.load(tmp_path / "out" / "encoder.pt", weights_only=False)["state"]
    assert all(torch.equal(new[k], glob[k]) for k in glob)


def test_substituted_round_keys_are_refused(tmp_path, spies):
    """The server hands m0 its own round keys in place of m1's: unsigned, m0 encrypts its
    Shamir shares for m1 under a key the server knows, and the server reads them."""
    cfg, grid, glob = _setup(tmp_path, 4)
    try:  # enrollment: every market's identity key, trusted by the others
        from storefed.shared.identity import enroll  # noqa: PLC0415
    except ImportError:  # code without identities: nothing to enroll
        enroll = None
    if enroll is not None:
        enroll(tmp_path / "state", [f"m{i}" for i in range(4)])
    nodes = list(grid.ids)
    sa = server_secagg.SecAggRound(grid, cfg, 1, glob, nodes)
    ring = sa._setup(0, sa._send("setup", {n: RecordDict({RECORD: sa._setup_record(1, 0)})
                                           for n in nodes}, 60), RECORD)
    victim, target = nodes[0], nodes[1]
    own_sk1, own_pk1 = generate_keys()
    own_sk2, own_pk2 = generate_keys()
    rec = sa._share_records(ring)[victim]
    i = list(rec["neighbours"]).index(target)
    pk1s, pk2s = list(rec["pk1"]), list(rec["pk2"])
    pk1s[i], pk2s[i] = own_pk1, own_pk2
    rec["pk1"], rec["pk2"] = pk1s, pk2s
    reply = sa._send("share-keys", {victim: RecordDict({RECORD: rec})}, 60).get(victim)
    read = None
    if reply is not None:
        out = reply.content.config_records[RECORD]
        for dst, ct in zip(out["dsts"], out["ctxts"], strict=True):
            if dst == target:  # the server derives the key m0 used for "m1"
                key = shared_key(own_sk2, ring.pks[victim][1])
                read = share_keys_plaintext_separate(decrypt(key, ct))
    assert read is None, f"the server read m0's shares meant for m1: {read[:2]}"


def test_enrolled_markets_sign_and_check_round_keys(tmp_path, spies, caplog):
    from storefed.shared.identity import enroll, load_or_create, public_hex, write_trusted

    markets = [f"m{i}" for i in range(4)]
    cfg, grid, glob = _setup(tmp_path, 4, **{"num-rounds": 2})
    enroll(tmp_path / "state", markets)
    doc = server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    for r in doc["rounds"]:  # round 2 runs on keys set up during round 1 (pipelined)
        assert r["secagg"]["attempts"][-1]["aggregated"] == markets
    assert "not authenticated" not in caplog.text
    # a market that does not trust m3's key (another key is enrolled for it) refuses m3's keys
    other = load_or_create(tmp_path / "elsewhere")
    trusted = {m: public_hex(load_or_create(tmp_path / "state" / m)) for m in markets}
    write_trusted(tmp_path / "state" / "m0" / "trusted-markets.toml",
                  {**trusted, "m3": public_hex(other)})
    cfg, grid, glob = _setup(tmp_path, 4)
    server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    assert "round keys of market 'm3' are not signed" in caplog.text


def _enrolled_round(tmp_path):
    """Four enrolled markets, round 1 set up to the masked upload (keys and shares out)."""
    from storefed.shared.identity import enroll

    cfg, grid, glob = _setup(tmp_path, 4)
    enroll(tmp_path / "state", [f"m{i}" for i in range(4)])
    nodes = list(grid.ids)
    sa = server_secagg.SecAggRound(grid, cfg, 1, glob, nodes)
    return cfg, grid, glob, nodes, sa, sa._ring(0, set(nodes))


def test_consistency_check_before_any_share_is_revealed(tmp_path, spies, caplog):
    """Enrolled markets reveal shares only for the survivor set they signed, and only once
    a threshold of their neighbours signed the same set."""
    cfg, grid, glob, nodes, sa, ring = _enrolled_round(tmp_path)
    assert ring.authenticated == set(nodes)
    layout = sa.layout
    sa._send(MASKED, {n: RecordDict({
        "arrays": to_record(glob), "config": ConfigRecord({"server-round": 1}),
        RECORD: ConfigRecord({"round": 1, "attempt": 0, "stage": MASKED,
                              "srcs": ring.fwd[n][0], "ctxts": ring.fwd[n][1],
                              "sampled": len(nodes), "size": layout.size,
                              "clip-range": float(cfg.secagg_clip_range),
                              "quant-range": int(cfg.secagg_quant_range)})}) for n in nodes}, 60)
    unmask = {"round": 1, "attempt": 0, "stage": UNMASK, "active": nodes, "dead": []}
    # no consistency check: refused
    assert not sa._send(UNMASK, {nodes[0]: RecordDict({RECORD: ConfigRecord(unmask)})}, 60)
    assert "this node is at masked-upload" in caplog.text  # consistency comes first
    # m0..m2 sign {all four}; m3 is then told it survived with another set
    sigs = {}
    for n in nodes[:3]:
        rep = sa._send("consistency", {n: RecordDict({RECORD: ConfigRecord({
            "round": 1, "attempt": 0, "stage": "consistency", "survivors": nodes})})}, 60)
        sigs[n] = rep[n].content.config_records[RECORD]["sig"]
    sa._send("consistency", {nodes[3]: RecordDict({RECORD: ConfigRecord({
        "round": 1, "attempt": 0, "stage": "consistency", "survivors": nodes[1:]})})}, 60)
    proof = {"survivors": nodes, "signers": list(sigs), "sigs": list(sigs.values())}
    assert not sa._send(UNMASK, {nodes[3]: RecordDict({RECORD: ConfigRecord(
        {**unmask, **proof})})}, 60)
    assert "another survivor set" in caplog.text
    # too few signatures on the set: refused; with a threshold of them: shares revealed
    few = {"survivors": nodes, "signers": nodes[:1], "sigs": [sigs[nodes[0]]]}
    assert not sa._send(UNMASK, {nodes[1]: RecordDict({RECORD: ConfigRecord(
        {**unmask, **few})})}, 60)
    assert "signed the survivor set" in caplog.text
    ok = sa._send(UNMASK, {nodes[2]: RecordDict({RECORD: ConfigRecord(
        {**unmask, **proof})})}, 60)
    assert ok and ok[nodes[2]].content.config_records[RECORD]["shares"]


def test_a_survivor_set_signed_with_the_upload_is_the_only_one(tmp_path, spies, caplog):
    """Pipelined rounds sign the survivor set with the masked upload (no consistency exchange
    of its own). A server that then asks a market to sign another set for the same attempt
    (to tell its neighbours different stories about who survived) is refused, and the
    market reveals shares only for the set it signed."""
    cfg, grid, glob, nodes, sa, ring = _enrolled_round(tmp_path)
    records = sa._masked_records(ring, set(nodes), survivors=True)
    rep = sa._send(MASKED, {n: RecordDict({"arrays": to_record(glob),
                                           "config": ConfigRecord({"server-round": 1}),
                                           **rec}) for n, rec in records.items()}, 60)
    sigs = {n: m.content.config_records[RECORD]["sig"] for n, m in rep.items()}
    assert set(sigs) == set(nodes)  # every enrolled market signed with its upload
    # a second survivor set for the same attempt: refused
    assert not sa._send(CONSISTENCY, {nodes[0]: RecordDict({RECORD: ConfigRecord({
        "round": 1, "attempt": 0, "stage": CONSISTENCY, "survivors": nodes[:3]})})}, 60)
    assert "already signed a survivor set" in caplog.text
    # unmask naming the signed set, with every signature: shares revealed
    unmask = {"round": 1, "attempt": 0, "stage": UNMASK, "active": nodes, "dead": [],
              "survivors": nodes, "signers": list(sigs), "sigs": list(sigs.values())}
    ok = sa._send(UNMASK, {nodes[1]: RecordDict({RECORD: ConfigRecord(unmask)})}, 60)
    assert ok and ok[nodes[1]].content.config_records[RECORD]["shares"]
    # ... and naming m0 as dropped (to rebuild its secret key as well): refused
    lie = {**unmask, "active": nodes[1:], "dead": nodes[:1]}
    assert not sa._send(UNMASK, {nodes[2]: RecordDict({RECORD: ConfigRecord(lie)})}, 60)
