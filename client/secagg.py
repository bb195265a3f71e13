"""Client side of storefed's SecAgg+ (the ``train.secagg`` messages; see ``shared/secagg.py``
for the protocol and why it is not Flower's legacy ``secaggplus_mod``).

One handler serves the four stages. At **setup** the market answers two fresh public keys. At
**share keys** it Shamir-shares a fresh private-mask seed and its first secret key among its
neighbours, each share encrypted for one neighbour. At **masked upload** it trains once per round
(a restarted attempt of the same round reuses the encoded update: no retraining), optionally
clips and noises the update (``shared/dp.py``), encodes it into one integer vector, decrypts the
shares it was forwarded and uploads ``vector + PRG(seed) +- PRG(pairwise keys)`` (mod 2**64) with
its train metrics. At **unmask** it reveals seed shares of the neighbours that uploaded and
secret-key shares of those that did not, never both for one node, only after checking the stage
order of that (round, attempt).

Pipelining (``server/secagg.py``): the server may piggyback the next round's setup on a masked
upload and the next round's share-keys on an unmask message (``secagg-next``), and the next
round's masked upload on an evaluate message (``piggyback``: the market evaluates the encoder
first, then trains from it). A masked upload that names the survivor set (``survivors``) is
signed at once: that signature is this instance's consistency check, and the market signs no
other set for it.
The protocol state lives in ``context.state`` (same node, successive messages), one record
per (round, attempt); records of older rounds are dropped.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt
from flwr.common.secure_aggregation.secaggplus_utils import (
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)

from storefed.client.node import PRIVATE_KEY, open_node
from storefed.shared.dp import delta_norm, privatize
from storefed.shared.errors import ConfigError
from storefed.shared.identity import (
    TRUSTED_FILE,
    load_or_create,
    load_trusted,
    sign_round_keys,
    sign_survivors,
    verify_round_keys,
    verify_survivors,
)
from storefed.shared.model import encoder_state
from storefed.shared.policy import PolicyRefusedError, PrivacyLedger, PrivacyPolicy
from storefed.shared.secagg import (
    CONSISTENCY,
    MASKED,
    MASKED_KEY,
    RECORD,
    RECORD_NEXT,
    SEED_BYTES,
    SETUP,
    SHARE_KEYS,
    STAGES,
    UNMASK,
    VectorLayout,
    encode,
    generate_keys,
    pair_sign,
    prg_mask,
    shared_key,
    with_stats,
)
from storefed.shared.wire import make_update

log = logging.getLogger("storefed")
STATE_KEY = "secagg-state"
VECTOR_KEY = "secagg-vector"
MARKET_KEY = "secagg-market"
RELEASED_KEY = "secagg-released"  # the last round whose unmask this node answered


class SecAggRefusedError(ValueError):
    """The client refuses a protocol step (wrong order, bad keys, unsafe request)."""


def _refuse(why: str) -> PolicyRefusedError:
    log.warning("secagg: this market refuses the message: %s", why)
    return PolicyRefusedError(why)


@dataclass(frozen=True)
class Identity:
    """Who this market is to the other markets: its name, its long-term signing key and the
    identity keys of the markets it trusts (None: round keys go unauthenticated)."""

    market: str
    key: Ed25519PrivateKey
    trusted: dict[str, bytes] | None

    @classmethod
    def of(cls, market: str, policy: PrivacyPolicy, market_dir: Path) -> Identity:
        path = Path(policy.trusted_markets) if policy.trusted_markets else (
            market_dir / TRUSTED_FILE)
        if policy.trusted_markets and not path.is_file():
            raise ConfigError(f"privacy policy 'trusted-markets': no file {path}")
        return cls(market, load_or_create(market_dir),
                   load_trusted(path) if path.is_file() else None)


def handle_secagg(msg: Message, context: Context, fixed: Mapping[str, Any],
                  policy: PrivacyPolicy, me: Identity) -> Message:
    """Answer one ``train.secagg`` message: its ``secagg`` stage, plus the next round's stage
    when the server piggybacks one (``secagg-next``). The reply carries protocol fields and the
    masked vector only: no metrics; the market's name only with its setup keys (who a node is,
    the server knows anyway from the node's authentication key)."""
    return Message(secagg_records(msg, context, fixed, policy, me), reply_to=msg)


def secagg_records(msg: Message, context: Context, fixed: Mapping[str, Any],
                   policy: PrivacyPolicy, me: Identity) -> RecordDict:
    """The reply records to the ``secagg`` (and ``secagg-next``) records of ``msg``, whether
    it is a ``train.secagg`` message or an evaluate message carrying the next round's masked
    upload (``piggyback``)."""
    content = RecordDict()
    rec = msg.content.config_records[RECORD]
    res, extra = _stage(msg, context, fixed, rec, policy, me)
    content[RECORD] = ConfigRecord(res)
    for k, v in extra.items():
        content[k] = v
    if RECORD_NEXT in msg.content.config_records:
        nxt, _ = _stage(msg, context, fixed, msg.content.config_records[RECORD_NEXT], policy,
                        me)
        content[RECORD_NEXT] = ConfigRecord(nxt)
    if rec["stage"] == SETUP or RECORD_NEXT in msg.content.config_records:
        content["info"] = ConfigRecord({"market": me.market})
    return content


def piggyback(msg: Message, context: Context, fixed: Mapping[str, Any],
              policy: PrivacyPolicy, me: Identity) -> RecordDict:
    """The reply records to the protocol stage riding on an evaluate message (the next
    round's masked upload, and the setup of the round after it). Call it after evaluating:
    the masked upload trains from the encoder the message carries."""
    if str(msg.content.config_records[RECORD].get("stage")) != MASKED:
        raise SecAggRefusedError("secagg: only a masked upload may ride on an evaluate message")
    return secagg_records(msg, context, fixed, policy, me)


def _stage(msg: Message, context: Context, fixed: Mapping[str, Any],
           rec: ConfigRecord, policy: PrivacyPolicy,
           me_id: Identity) -> tuple[dict[str, Any], RecordDict]:
    stage = str(rec["stage"])
    if stage not in STAGES:
        raise SecAggRefusedError(f"unknown secagg stage {stage!r}")
    rnd, attempt = int(cast(int, rec["round"])), int(cast(int, rec["attempt"]))
    me = int(msg.metadata.dst_node_id)
    extra = RecordDict()
    if stage == SETUP:
        _forget_before(context, rnd - 1)
        st: dict[str, Any] = {"round": rnd, "attempt": attempt, "stage": SETUP, "nid": me}
        sk1, pk1 = generate_keys()
        sk2, pk2 = generate_keys()
        st.update(sk1=sk1, pk1=pk1, sk2=sk2, pk2=pk2)
        # the round keys, signed with the market's identity key (shared/identity.py)
        # ``authenticated``: this market checks signatures, so the server must run the
        # consistency check before asking it to unmask
        res: dict[str, Any] = {"pk1": pk1, "pk2": pk2, "market": me_id.market,
                               "sig": sign_round_keys(me_id.key, rnd, attempt, me_id.market,
                                                      pk1, pk2),
                               "authenticated": me_id.trusted is not None}
    else:
        st = _load(context, rnd, attempt)
        expected = STAGES[STAGES.index(stage) - 1]
        if stage == UNMASK and st.get("stage") == MASKED and (
                me_id.trusted is None or "survivors" in st):
            # no consistency check for a market that cannot verify it; none left to run
            # when the market signed the survivor set with its masked upload
            expected = MASKED
        if stage == CONSISTENCY and "survivors" in st:
            raise _refuse(f"it already signed a survivor set for round {rnd} attempt "
                          f"{attempt}; it signs no other")
        if st.get("stage") != expected:
            raise SecAggRefusedError(f"secagg: {stage} for round {rnd} attempt {attempt} but "
                                     f"this node is at {st.get('stage') or 'no stage'} of it")
        st["stage"] = stage
        if stage == SHARE_KEYS:
            _check_signatures(st, rec, me_id)
            res = _share_keys(st, rec, policy)
        elif stage == MASKED:
            _ensure_update(msg, context, fixed, rec, policy)
            res = _masked(st, rec, context)
            if "survivors" in rec:  # the consistency check, signed with the upload
                res.update(_consistency(st, rec, me_id))
            extra = RecordDict({"arrays": ArrayRecord({MASKED_KEY: Array(res.pop("_vec"))})})
        elif stage == CONSISTENCY:
            res = _consistency(st, rec, me_id)
        else:
            _check_consistency(st, rec, me_id)
            res = _unmask(st, rec, policy)
            context.state[RELEASED_KEY] = ConfigRecord({"round": rnd})
    _save(context, st)
    return res, extra


# ---------------------------------------------------------------------------- stages
def _ensure_update(msg: Message, context: Context, fixed: Mapping[str, Any],
                   rec: ConfigRecord, policy: PrivacyPolicy) -> None:
    """Train and encode once per round. A restarted attempt reuses the encoded update only if
    no unmask of the round was answered yet: once the server could decode a sum holding this
    update, the update never goes into a second sum (two sums differing by one market would
    hand the server that market's update)."""
    rnd = int(cast(int, rec["round"]))
    if (RELEASED_KEY in context.state
            and int(cast(int, context.state.config_records[RELEASED_KEY]["round"])) >= rnd):
        raise _refuse(f"round {rnd} was already unmasked with this market's update in it: "
                      f"it is not uploaded into another sum")
    cached = (VECTOR_KEY in context.state
              and int(cast(int, context.state.config_records[MARKET_KEY]["round"])) == rnd)
    if not cached:
        _train_and_encode(msg, context, fixed, rec, policy)
    size = int(context.state.array_records[VECTOR_KEY]["vec"].numpy().shape[0])
    if size != int(cast(int, rec["size"])):
        raise SecAggRefusedError("secagg: this node's update does not match the server's "
                                 "vector layout (different aggregation or model config?)")


def _train_and_encode(msg: Message, context: Context, fixed: Mapping[str, Any],
                      rec: ConfigRecord, policy: PrivacyPolicy) -> None:

    rnd = int(cast(int, rec["round"]))
    node, global_encoder = open_node(msg, context, fixed)
    cfg = node.cfg
    if bool(rec.get("rowwise", False)):
        raise _refuse("the server asks for row-wise weights: a row weight of an item only this "
                      "market trained would be its own interaction count")
    # the DP noise and clip are the market's: the run may ask for more, never for less
    dp_clip = policy.clip(cfg.dp_clip)
    std = policy.noise_std(cfg.dp_noise, cfg.dp_clip, int(cast(int, rec["sampled"])))
    multiplier = std * (policy.min_markets ** 0.5) / dp_clip if dp_clip > 0 else 0.0
    ledger = PrivacyLedger.open(node.state_path.parent if node.state_path else None)
    delta = min(policy.dp_delta, cfg.dp_delta)
    if ledger.epsilon(delta, multiplier) > policy.epsilon_budget:
        raise _refuse(f"its privacy budget (epsilon {policy.epsilon_budget:g}) would be "
                      f"exceeded by one more release; it stops contributing")
    _, metrics = node.train_round(global_encoder, rnd, rowwise=False)
    # what one market can do to the encoder is bounded: its delta's L2 norm by update-clip (or
    # the tighter DP clip), its weight by secagg-max-weight (1 under DP)
    clip = min(c for c in (dp_clip, cfg.update_clip) if c > 0)
    weight = 1 if dp_clip > 0 else min(int(metrics["num-examples"]), cfg.secagg_max_weight)
    local = encoder_state(node.model)
    norm_clipped = delta_norm(local, global_encoder) > clip
    if norm_clipped or std > 0:
        rng = np.random.default_rng()  # OS entropy: DP noise must not be predictable
        local, _ = privatize(local, global_encoder, clip, std, rng)
    update = make_update(local, global_encoder, weight, None)
    context.state[PRIVATE_KEY] = ArrayRecord(torch_state_dict=node.private())
    node.persist(rnd)
    layout = VectorLayout.for_encoder(global_encoder)
    update = with_stats(update, float(metrics["train-loss"]), weight, std * std)
    # the stochastic rounding only keeps the fixed-point sum unbiased (the masks hide the
    # vector): seeded per (seed, round, market), so a run's sums, hence its results, are
    # reproducible (integer sums are exact and order-free)
    rounding = np.random.default_rng([cfg.seed % 2**32, rnd, zlib.crc32(node.market.encode())])
    vec, _ = encode(update, layout, float(cast(float, rec["clip-range"])),
                    int(cast(int, rec["quant-range"])), rounding, norm_clipped)
    ledger.record(rnd, int(cast(int, rec["attempt"])), multiplier, delta)
    context.state[VECTOR_KEY] = ArrayRecord({"vec": Array(vec)})
    context.state[MARKET_KEY] = ConfigRecord({"market": node.market, "round": rnd})


def _check_signatures(st: dict[str, Any], rec: ConfigRecord, me: Identity) -> None:
    """Every neighbour's round keys must be signed by the identity key this market trusts for
    that neighbour's market (when it has a trusted-markets table; see shared/identity.py)."""
    if me.trusted is None:
        log.warning("secagg: market %s has no trusted-markets table: its neighbours' round "
                    "keys are not authenticated (a server could substitute them)", me.market)
        return
    nids = [int(x) for x in cast(list[int], rec["neighbours"])]
    names, sigs = rec.get("markets"), rec.get("sigs")
    pk1s, pk2s = cast(list[bytes], rec["pk1"]), cast(list[bytes], rec["pk2"])
    if not (isinstance(names, list) and isinstance(sigs, list)
            and len(names) == len(sigs) == len(nids) == len(pk1s) == len(pk2s)):
        raise _refuse("share-keys without signed round keys; this market authenticates its "
                      "neighbours (trusted-markets)")
    if len(set(names)) != len(names):
        raise _refuse("share-keys names one market twice")
    st["names"] = {nid: str(name) for nid, name in zip(nids, names, strict=True)}
    for nid, name, sig, pk1, pk2 in zip(nids, names, sigs, pk1s, pk2s, strict=True):
        if nid == st["nid"]:
            if name != me.market:
                raise _refuse(f"share-keys calls this market {name!r}")
            continue
        known = me.trusted.get(str(name))
        if known is None or not isinstance(sig, bytes) or not verify_round_keys(
                known, sig, st["round"], st["attempt"], str(name), pk1, pk2):
            raise _refuse(f"round keys of market {name!r} are not signed by the identity key "
                          f"this market trusts for it (substituted keys?)")


def _share_keys(st: dict[str, Any], rec: ConfigRecord, policy: PrivacyPolicy) -> dict[str, Any]:
    me, t = st["nid"], int(cast(int, rec["threshold"]))
    nids = [int(x) for x in cast(list[int], rec["neighbours"])]
    pk1s, pk2s = cast(list[bytes], rec["pk1"]), cast(list[bytes], rec["pk2"])
    if me not in nids or len(pk1s) != len(nids) or len(pk2s) != len(nids):
        raise SecAggRefusedError("secagg share-keys: malformed neighbour list")
    if len(nids) < policy.min_markets:
        raise _refuse(f"share-keys with {len(nids)} markets; its policy needs at least "
                      f"{policy.min_markets} in any sum (min-markets)")
    if t < policy.min_shares(len(nids)):
        raise _refuse(f"threshold {t} of {len(nids)}; its policy needs at least "
                      f"{policy.min_shares(len(nids))} (more than half, min-threshold)")
    i = nids.index(me)
    if pk1s[i] != st["pk1"] or pk2s[i] != st["pk2"]:
        raise SecAggRefusedError("secagg share-keys: this node's public keys were altered")
    if len(set(pk1s) | set(pk2s)) != 2 * len(nids):
        raise SecAggRefusedError("secagg share-keys: repeated public keys")
    if not 2 <= t <= len(nids):
        raise SecAggRefusedError(f"secagg share-keys: threshold {t} for {len(nids)} neighbours")
    st.update(neighbours=nids, npk1=list(pk1s), npk2=list(pk2s), threshold=t,
              rd_seed=os.urandom(SEED_BYTES))
    b_shares = create_shares(st["rd_seed"], t, len(nids))
    s_shares = create_shares(st["sk1"], t, len(nids))
    st["ss2"] = {}
    dsts, ctxts = [], []
    for idx, nid in enumerate(nids):
        if nid == me:
            st["rd_shares"], st["sk_shares"] = {me: b_shares[idx]}, {me: s_shares[idx]}
            continue
        key = shared_key(st["sk2"], pk2s[idx])
        st["ss2"][nid] = key  # reused to decrypt this neighbour's shares (one ECDH per pair)
        ctxts.append(encrypt(key, share_keys_plaintext_concat(me, nid, b_shares[idx],
                                                              s_shares[idx])))
        dsts.append(nid)
    return {"dsts": dsts, "ctxts": ctxts}


def _masked(st: dict[str, Any], rec: ConfigRecord, context: Context) -> dict[str, Any]:
    me, nids = st["nid"], st["neighbours"]
    srcs = [int(x) for x in cast(list[int], rec["srcs"])]
    ctxts = cast(list[bytes], rec["ctxts"])
    if len(srcs) != len(ctxts) or len(set(srcs)) != len(srcs) or me in srcs:
        raise SecAggRefusedError("secagg masked-upload: malformed forwarded shares")
    if len(srcs) + 1 < st["threshold"]:
        raise SecAggRefusedError("secagg masked-upload: fewer neighbours than the threshold")
    for src, ct in zip(srcs, ctxts, strict=True):
        if src not in nids or src not in st["ss2"]:
            raise SecAggRefusedError(f"secagg masked-upload: share from non-neighbour {src}")
        actual, dst, b_share, s_share = share_keys_plaintext_separate(decrypt(st["ss2"][src], ct))
        if actual != src or dst != me:
            raise SecAggRefusedError(f"secagg masked-upload: share {actual}->{dst} forwarded as "
                              f"{src}->{me}")
        st["rd_shares"][src], st["sk_shares"][src] = b_share, s_share
    st["partners"] = srcs
    vec = context.state.array_records[VECTOR_KEY]["vec"].numpy().astype(np.uint64, copy=True)
    vec += prg_mask(st["rd_seed"], vec.shape[0])
    for src in srcs:
        key = shared_key(st["sk1"], st["npk1"][nids.index(src)])
        if pair_sign(me, src) > 0:
            vec += prg_mask(key, vec.shape[0])
        else:
            vec -= prg_mask(key, vec.shape[0])
    return {"_vec": vec}


def _consistency(st: dict[str, Any], rec: ConfigRecord, me: Identity) -> dict[str, Any]:
    """Sign the survivor set the server announces (once per round and attempt)."""
    survivors = sorted({int(x) for x in cast(list[int], rec["survivors"])})
    if st["nid"] not in survivors:
        raise SecAggRefusedError("secagg consistency: this node is not among the survivors")
    st["survivors"] = survivors
    return {"sig": sign_survivors(me.key, st["round"], st["attempt"], survivors)}


def _check_consistency(st: dict[str, Any], rec: ConfigRecord, me: Identity) -> None:
    """Before revealing any share: the survivor set this market signed, signed by at least
    ``threshold`` of its neighbours (itself included), and the unmask request consistent with
    it (alive = the neighbours in it, dropped = the partners not in it)."""
    if me.trusted is None:
        return
    survivors = st.get("survivors")
    if survivors is None:
        raise _refuse("unmask before the consistency check")
    if sorted(int(x) for x in cast(list[int], rec.get("survivors", []))) != survivors:
        raise _refuse("unmask names another survivor set than the one this market signed")
    active = {int(x) for x in cast(list[int], rec["active"])}
    dead = {int(x) for x in cast(list[int], rec["dead"])}
    held = set(st["partners"]) | {st["nid"]}
    if active != held & set(survivors) or dead != set(st["partners"]) - set(survivors):
        raise _refuse("unmask's alive/dropped lists disagree with the signed survivor set")
    names: dict[int, str] = st.get("names", {})
    signers = [int(x) for x in cast(list[int], rec.get("signers", []))]
    sigs = cast(list[bytes], rec.get("sigs", []))
    valid = set()
    for nid, sig in zip(signers, sigs, strict=False):
        name = names.get(nid)
        key = me.trusted.get(name) if name is not None else None
        if nid == st["nid"]:
            key = me.key.public_key().public_bytes_raw()
        if (key is not None and isinstance(sig, bytes)
                and verify_survivors(key, sig, st["round"], st["attempt"], survivors)):
            valid.add(nid)
    if len(valid) < st["threshold"]:
        raise _refuse(f"only {len(valid)} of its neighbours signed the survivor set; the "
                      f"threshold is {st['threshold']}")


def _unmask(st: dict[str, Any], rec: ConfigRecord, policy: PrivacyPolicy) -> dict[str, Any]:
    me = st["nid"]
    active = [int(x) for x in cast(list[int], rec["active"])]
    dead = [int(x) for x in cast(list[int], rec["dead"])]
    held = set(st["partners"]) | {me}
    if set(active) & set(dead) or me in dead or me not in active:
        raise SecAggRefusedError("secagg unmask: a node cannot be both alive and dropped")
    if not set(active) <= held or not set(dead) <= set(st["partners"]):
        raise SecAggRefusedError("secagg unmask: asked about nodes this node did not share with")
    if len(active) < st["threshold"]:
        raise SecAggRefusedError("secagg unmask: fewer surviving neighbours than the threshold")
    if len(active) < policy.min_markets:
        raise _refuse(f"unmask of a sum over {len(active)} of its neighbours; its policy needs "
                      f"at least {policy.min_markets} markets in any sum (min-markets)")
    shares = [st["rd_shares"][n] for n in active] + [st["sk_shares"][n] for n in dead]
    return {"nids": active + dead, "shares": shares}


# ---------------------------------------------------------------------------- state
_DICTS = ("rd_shares", "sk_shares", "ss2", "names")


def _key(rnd: int, attempt: int) -> str:
    return f"{STATE_KEY}/{rnd}/{attempt}"


def _save(context: Context, st: dict[str, Any]) -> None:
    flat: dict[str, Any] = {}
    for k, v in st.items():
        if k in _DICTS:
            flat[k + ":k"], flat[k + ":v"] = list(v), list(v.values())
        else:
            flat[k] = v
    context.state[_key(st["round"], st["attempt"])] = ConfigRecord(flat)


def _load(context: Context, rnd: int, attempt: int) -> dict[str, Any]:
    key = _key(rnd, attempt)
    if key not in context.state:
        return {}
    flat = dict(context.state.config_records[key])
    st: dict[str, Any] = {}
    for k, v in flat.items():
        if k.endswith(":k"):
            name = k[:-2]
            st[name] = dict(zip(cast(list[int], v), cast(list[bytes], flat[name + ":v"]),
                                strict=True))
        elif not k.endswith(":v"):
            st[k] = list(v) if isinstance(v, list) else v
    return st


def _forget_before(context: Context, rnd: int) -> None:
    """Drop the protocol state (keys, shares) of rounds before ``rnd``."""
    for key in [k for k in context.state.config_records if k.startswith(STATE_KEY + "/")]:
        if int(key.split("/")[1]) < rnd:
            del context.state[key]
