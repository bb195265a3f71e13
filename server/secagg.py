"""Server side of storefed's SecAgg+: the round loop of ``run_server`` with the train step
replaced by the four protocol stages, so the server only ever holds the *sum* of the markets'
encoder updates (the protocol, its encoding and why it is built on Flower's secure-aggregation
primitives rather than the legacy ``SecAggPlusWorkflow`` are described in ``shared/secagg.py``).

Per round: sample nodes with the strategy (``EncoderFedAvg.configure_train``), then

1. **setup**: nodes answer two fresh public keys. Survivors U1; the SecAgg+ neighbour graph (a
   ring over shuffled U1) and the reconstruction threshold are fixed now, so a setup dropout is
   simply not in the graph.
2. **share keys**: each node gets its neighbours' keys, answers encrypted Shamir shares of its
   mask seed and first secret key. Survivors U2; nodes that dropped here are never masked with.
3. **masked upload** (carries the global encoder): each node trains (once per round), encodes,
   decrypts the shares addressed to it (from U2 only) and uploads its masked vector and train
   metrics. Survivors U3; their masked vectors are summed (mod 2**64).
4. **unmask**: each node in U3 reveals seed shares of its neighbours in U3 and secret-key shares
   of its neighbours in U2 - U3. The server removes every private mask and the pairwise masks of
   the U2 - U3 dropouts, then decodes the sum (``apply_summed_update``).

**Pipelining** (when every node trains every round, ``fraction-train = 1``): the next round's
setup rides on this round's masked upload, its share-keys on this round's unmask and its masked
upload on this round's evaluate messages (each market evaluates the new encoder, then trains
from it). From round 2 on a round is then two exchanges, as in plain FedAvg: unmask, and the
evaluation that carries the next masked upload. A pipelined masked upload names its survivor
set (the nodes asked) and each enrolled market signs it with its upload: that is the
consistency check, done without an exchange of its own. The pipelined attempt is all or
nothing: if a node asked did not upload (or a node to be sampled was not in the keys), it is
abandoned before any unmask (nothing was revealed) and the round runs the full protocol with
the nodes that uploaded, as a retry that does not count against ``secagg-retries``; a market
signs one survivor set per attempt, so the retry has fresh keys.

If a stage leaves fewer than two nodes, or a secret that will be needed has fewer holders than
the threshold, the attempt is abandoned (no sum was revealed) and the round restarts from setup
with the survivors (fresh keys), up to ``secagg-retries`` times; clients reuse the update they
trained for the round, but never once an unmask of the round was answered (a restart after
unmask is refused: two decoded sums differing by one market would reveal it). The round record
in ``metrics.json`` gets a ``secagg`` entry: attempts, who dropped at which stage, the summed
number of clipped values and mean train loss, the quantisation bound, stage times and (DP mode)
epsilon.
Every reply of every stage is checked; a malformed one is that node dropping out, never a crash.
Integrity, from sums only (no market's own figures reach the server): the decoded market count
must equal the number of nodes summed and every tensor's summed weight must be the same (the
number of markets in DP mode), else the round's update is rejected; every decoded sum counts
towards epsilon, rejected or not.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.serverapp import Grid

from storefed.server.exchange import send_and_receive
from storefed.server.rounds import RoundStep, ServerRun, run_rounds
from storefed.shared.config import RunConfig
from storefed.shared.dp import effective_multiplier, epsilon_spent
from storefed.shared.secagg import (
    CONSISTENCY,
    COUNTER_PREFIX,
    MASKED,
    MASKED_KEY,
    MESSAGE_TYPE,
    RECORD,
    RECORD_NEXT,
    SETUP,
    SHARE_KEYS,
    STAT_PREFIX,
    UNMASK,
    VectorLayout,
    check_capacity,
    decode,
    intact,
    neighbourhood_size,
    neighbours,
    pair_sign,
    prg_mask,
    quant_step,
    shared_key,
    threshold_for,
)
from storefed.shared.wire import WEIGHT_PREFIX, apply_summed_update, to_record

log = logging.getLogger("storefed")


class AttemptFailedError(Exception):
    """This attempt cannot finish; ``survivors`` may retry the round."""

    def __init__(self, reason: str, survivors: set[int]) -> None:
        super().__init__(reason)
        self.survivors = survivors


@dataclass
class RoundResult:
    """What one SecAgg+ round gives the server: the summed update (None if the round failed),
    each aggregated market's train metrics, and the round's ``secagg`` report."""

    summed: dict[str, np.ndarray] | None
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    n_sampled: int = 0
    n_summed: int = 0
    intact: bool = True  # the unmasked sum carries its integrity check (shared.secagg)


@dataclass
class KeyRing:
    """The outcome of setup + share-keys for one protocol instance (round, attempt): the
    neighbour graph over the nodes that sent keys (``u1``), the threshold, the public keys,
    the nodes that shared their secrets (``u2``) and the encrypted shares to forward."""

    rnd: int
    attempt: int
    graph: dict[int, list[int]]
    t: int
    pks: dict[int, tuple[bytes, bytes]]
    u1: set[int]
    u2: set[int] = field(default_factory=set)
    fwd: dict[int, tuple[list[int], list[bytes]]] = field(default_factory=dict)
    signed: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # market, signature
    authenticated: set[int] = field(default_factory=set)  # nodes that check signatures
    dropped: dict[str, list[str]] = field(default_factory=dict)
    uploaded: Uploaded | None = None  # the masked upload that rode on evaluation
    after: KeyRing | None = None  # the following round's keys, set up with that upload


@dataclass
class Uploaded:
    """One instance's masked upload: the vectors summed (mod 2**64), who uploaded (``u3``),
    the survivor set the requests named (pipelined) and the markets' signatures on it."""

    total: np.ndarray
    u3: set[int]
    survivors: list[int] | None = None
    signed: dict[int, bytes] = field(default_factory=dict)


class SecAggRound:
    """One round of SecAgg+ over ``nodes`` (see module doc). ``received`` keeps every reply
    the server got (tests inspect it: it must never contain a market's plain update).

    ``prepared``: this round's keys and masked upload, done during the previous round's unmask
    and evaluation (``pipeline``): the round then needs only its unmask exchange.
    ``pipeline``: prepare the next round during this one (``next_records`` / ``collect_next``).
    """

    def __init__(self, grid: Grid, cfg: RunConfig, rnd: int,
                 global_state: dict[str, torch.Tensor], nodes: list[int],
                 prepared: KeyRing | None = None, pipeline: bool = False,
                 markets: dict[int, str] | None = None) -> None:
        self.grid, self.cfg, self.rnd = grid, cfg, rnd
        self.global_state = global_state
        # one scalar weight per market under secure aggregation (see shared/secagg.py)
        self.layout = VectorLayout.for_encoder(global_state)
        self.nodes = list(nodes)
        self.prepared, self.pipeline = prepared, pipeline
        # next round: keys received with the masked upload, shares with the unmask replies
        self.next_ring: KeyRing | None = None
        self.next_prepared: KeyRing | None = None  # ... and its masked upload, at evaluation
        # node -> market, as nodes name themselves with their setup keys (kept across rounds)
        self.markets: dict[int, str] = {} if markets is None else markets
        self.dropped: dict[str, list[str]] = {}
        self.attempts: list[dict[str, Any]] = []
        self.received: list[Message] = []
        self.stage_seconds: dict[str, float] = {}
        self.intact = True

    # ------------------------------------------------------------------ driver
    def run(self) -> RoundResult:
        participants = set(self.nodes)
        ring = self.prepared
        pipelined = ring is not None and ring.rnd == self.rnd and ring.uploaded is not None
        # the pipelined attempt (0, if any) does not count against secagg-retries
        for attempt in range(self.cfg.secagg_retries + 1 + int(pipelined)):
            piped = pipelined and attempt == 0
            if not piped and len(participants) < 2:
                self.attempts.append({"attempt": attempt, "failed": "fewer than 2 nodes left"})
                break
            try:
                if piped:
                    assert ring is not None
                    summed, train = self._finish_pipelined(ring, participants)
                else:
                    summed, train = self._finish(self._ring(attempt, participants), participants)
            except AttemptFailedError as exc:
                log.warning("round %d: secagg attempt %d%s failed (%s); %d nodes left", self.rnd,
                            attempt, " (pipelined)" if piped else "", exc, len(exc.survivors))
                self.attempts.append({"attempt": attempt, "failed": str(exc),
                                      **({"pipelined": True} if piped else {})})
                participants = exc.survivors
                self.next_ring = None
                continue
            self.attempts.append({"attempt": attempt, "aggregated": sorted(train),
                                  "pipelined": piped})
            return self._result(summed, train)
        log.warning("round %d: secure aggregation failed; global encoder unchanged", self.rnd)
        return RoundResult(None, {}, self._report(0), len(self.nodes), 0)

    def _result(self, summed: dict[str, np.ndarray],
                train: dict[str, dict[str, float]]) -> RoundResult:
        return RoundResult(summed, train, self._report(len(train)), len(self.nodes),
                           len(train), self.intact)

    def _report(self, n: int) -> dict[str, Any]:
        step = quant_step(self.cfg.secagg_clip_range, self.cfg.secagg_quant_range)
        return {"attempts": self.attempts, "dropped": self.dropped, "aggregated_markets": n,
                "sampled_markets": len(self.nodes), "quant_step": step,
                "sum_error_bound": n * step, "vector_length": self.layout.size,
                "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()}}

    def _ring(self, attempt: int, nodes: set[int]) -> KeyRing:
        """This attempt's keys: setup and share-keys over ``nodes``."""
        ring = self._setup(attempt, self._send(SETUP, {
            n: RecordDict({RECORD: self._setup_record(self.rnd, attempt)}) for n in nodes},
            self.cfg.secagg_timeout), RECORD)
        self._share_keys(ring, self._send(SHARE_KEYS, {
            n: RecordDict({RECORD: rec}) for n, rec in self._share_records(ring).items()},
            self.cfg.secagg_timeout))
        return ring

    # ------------------------------------------------------------------ stages
    @staticmethod
    def _setup_record(rnd: int, attempt: int) -> ConfigRecord:
        return ConfigRecord({"round": rnd, "attempt": attempt, "stage": SETUP})

    def _setup(self, attempt: int, rep: dict[int, Message], key: str,
               rnd: int | None = None) -> KeyRing:
        """Public keys received -> the neighbour graph and threshold of the instance. A reply
        without two 32-byte keys is that node dropping out of setup."""
        pks: dict[int, tuple[bytes, bytes]] = {}
        signed: dict[int, tuple[str, bytes]] = {}
        authenticated: set[int] = set()
        for n, m in rep.items():
            rec = m.content.config_records.get(key)
            pk1, pk2 = (rec.get("pk1"), rec.get("pk2")) if rec is not None else (None, None)
            if not (isinstance(pk1, bytes) and isinstance(pk2, bytes)
                    and len(pk1) == len(pk2) == 32):
                self._drop(SETUP, n, "malformed public keys")
                continue
            pks[n] = (pk1, pk2)
            name, sig = rec.get("market"), rec.get("sig")  # type: ignore[union-attr]
            if isinstance(name, str) and isinstance(sig, bytes):
                signed[n] = (name, sig)  # forwarded as is: the markets verify it
            if rec.get("authenticated") is True:  # type: ignore[union-attr]
                authenticated.add(n)
        u1 = set(pks)
        if len(u1) < 2:
            raise AttemptFailedError(f"{len(u1)} node(s) answered setup", u1)
        check_capacity(len(u1), self.cfg.secagg_quant_range)
        order = sorted(u1)
        random.SystemRandom().shuffle(order)
        shares = self.cfg.secagg_shares
        t = threshold_for(neighbourhood_size(len(order), shares), self.cfg.secagg_threshold)
        return KeyRing(self.rnd if rnd is None else rnd, attempt, neighbours(order, shares), t,
                       pks, u1, signed={n: v for n, v in signed.items() if n in u1},
                       authenticated=authenticated & u1)

    @staticmethod
    def _share_records(ring: KeyRing) -> dict[int, ConfigRecord]:
        out = {}
        for n in ring.u1:
            nb = ring.graph[n]
            rec: dict[str, Any] = {
                "round": ring.rnd, "attempt": ring.attempt, "stage": SHARE_KEYS,
                "threshold": ring.t, "neighbours": nb,
                "pk1": [ring.pks[v][0] for v in nb], "pk2": [ring.pks[v][1] for v in nb]}
            if all(v in ring.signed for v in nb):  # each neighbour's signed round keys
                rec["markets"] = [ring.signed[v][0] for v in nb]
                rec["sigs"] = [ring.signed[v][1] for v in nb]
            out[n] = ConfigRecord(rec)
        return out

    def _share_keys(self, ring: KeyRing, rep: dict[int, Message], key: str = RECORD) -> None:
        """Encrypted shares received -> what to forward to whom (from ``u2`` only). A reply
        whose lists are malformed is that node dropping out of share-keys."""
        good: dict[int, list[tuple[int, bytes]]] = {}
        for src, m in rep.items():
            rec = m.content.config_records.get(key)
            dsts, ctxts = (rec.get("dsts"), rec.get("ctxts")) if rec is not None else (None, None)
            if not (src in ring.graph and isinstance(dsts, list) and isinstance(ctxts, list)
                    and len(dsts) == len(ctxts)
                    and all(isinstance(d, int) and not isinstance(d, bool) for d in dsts)
                    and all(isinstance(c, bytes) for c in ctxts)
                    and len(set(dsts)) == len(dsts)):
                self._drop(SHARE_KEYS, src, "malformed share-keys reply")
                continue
            good[src] = list(zip(cast(list[int], dsts), cast(list[bytes], ctxts), strict=True))
        ring.u2 = set(good)
        ring.fwd = {n: ([], []) for n in ring.u2}
        for src, pairs in good.items():
            for dst, ct in pairs:
                if dst in ring.fwd and dst in ring.graph[src]:
                    ring.fwd[dst][0].append(src)
                    ring.fwd[dst][1].append(ct)
        self._check_holders(ring.u2, ring.graph, ring.u2, ring.t, "share keys")

    def _finish(self, ring: KeyRing, participants: set[int],
                ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
        """Masked upload (nodes train on the first attempt), the consistency check when
        enrolled markets take part, and unmask; returns the sum."""
        u2 = ring.u2 & participants
        arrays = to_record(self.global_state)
        config = ConfigRecord({"server-round": self.rnd})
        records = self._masked_records(ring, u2, survivors=False)
        rep = self._send(MASKED, {n: RecordDict({"arrays": arrays, "config": config, **rec})
                                  for n, rec in records.items()}, self.cfg.round_timeout)
        up = self._collect_masked(ring, rep)
        self.next_ring = self._next_setup(rep, self.rnd + 1)
        proof = self._consistency(ring, up.u3) if ring.authenticated & up.u3 else {}
        return self._unmask(ring, up, proof)

    def _finish_pipelined(self, ring: KeyRing, participants: set[int],
                          ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
        """Unmask the masked upload that rode on the previous round's evaluation, if every
        node asked uploaded (and signed, when enrolled) and no new node is to be sampled;
        else ``AttemptFailedError`` before anything is revealed."""
        up = ring.uploaded
        assert up is not None and up.survivors is not None
        for stage, labels in ring.dropped.items():
            self.dropped.setdefault(stage, []).extend(labels)
        if not participants <= ring.u1:
            raise AttemptFailedError(f"{len(participants - ring.u1)} node(s) to be sampled "
                                     f"were not in the prepared keys", participants)
        if up.u3 != set(up.survivors):
            raise AttemptFailedError(f"{len(set(up.survivors) - up.u3)} node(s) of the "
                                     f"survivor set did not upload", participants & up.u3)
        unsigned = ring.authenticated & up.u3 - set(up.signed)
        if unsigned:
            raise AttemptFailedError(f"{len(unsigned)} node(s) did not sign the survivor set",
                                     participants & up.u3)
        self._check_holders(up.u3, ring.graph, up.u3, ring.t, "masked upload")
        self.next_ring = ring.after
        proof: dict[str, list[int] | list[bytes]] = (
            {"survivors": up.survivors, "signers": list(up.signed),
             "sigs": list(up.signed.values())} if up.signed else {})
        return self._unmask(ring, up, proof)

    def _masked_records(self, ring: KeyRing, nodes: set[int],
                        survivors: bool) -> dict[int, dict[str, ConfigRecord]]:
        """The masked-upload requests (and the next round's setup, when pipelining).
        ``survivors``: name the survivor set (every node asked), which enrolled markets sign
        with their upload (the pipelined consistency check)."""
        cfg = self.cfg
        named = {"survivors": sorted(nodes)} if survivors else {}
        out: dict[int, dict[str, ConfigRecord]] = {}
        for n in nodes:
            out[n] = {RECORD: ConfigRecord({
                "round": ring.rnd, "attempt": ring.attempt, "stage": MASKED,
                "srcs": ring.fwd[n][0], "ctxts": ring.fwd[n][1], "sampled": len(self.nodes),
                "size": self.layout.size, "clip-range": float(cfg.secagg_clip_range),
                "quant-range": int(cfg.secagg_quant_range), **named})}
            if self.pipeline and ring.rnd < cfg.num_rounds:
                out[n][RECORD_NEXT] = self._setup_record(ring.rnd + 1, 0)
        return out

    def _collect_masked(self, ring: KeyRing, rep: dict[int, Message],
                        dropped: dict[str, list[str]] | None = None) -> Uploaded:
        """Sum the well-formed masked vectors (mod 2**64); note the signatures on the survivor
        set; check every secret that unmask will need still has ``t`` holders. Malformed
        uploads are dropouts, noted in ``dropped`` (default: this round's)."""
        total = np.zeros(self.layout.size, dtype=np.uint64)
        u3: set[int] = set()
        signed: dict[int, bytes] = {}
        for n, m in rep.items():
            try:
                vec = m.content.array_records["arrays"][MASKED_KEY].numpy()
            except (KeyError, TypeError, ValueError) as exc:
                self._drop(MASKED, n, f"malformed masked upload: {exc}", dropped)
                continue
            if vec.dtype != np.uint64 or vec.shape != (self.layout.size,):
                self._drop(MASKED, n, f"masked vector {vec.dtype}{vec.shape}", dropped)
                continue
            total += vec
            u3.add(n)
            if (sig := _signature(m)) is not None:
                signed[n] = sig
        dead = ring.u2 - u3
        self._check_holders(u3, ring.graph, u3, ring.t, "masked upload")
        self._check_holders(dead, ring.graph, u3, ring.t, "masked upload", min_alive=0)
        return Uploaded(total, u3, signed=signed)

    def _consistency(self, ring: KeyRing, u3: set[int]) -> dict[str, list[int] | list[bytes]]:
        """The consistency check as its own exchange: the survivors sign the survivor set."""
        survivors = sorted(u3)
        rep = self._send(CONSISTENCY, {n: RecordDict({RECORD: ConfigRecord({
            "round": ring.rnd, "attempt": ring.attempt, "stage": CONSISTENCY,
            "survivors": survivors})}) for n in u3}, self.cfg.secagg_timeout)
        signed = {n: sig for n, m in rep.items() if (sig := _signature(m)) is not None}
        return ({"survivors": survivors, "signers": list(signed), "sigs": list(signed.values())}
                if signed else {})

    def _unmask(self, ring: KeyRing, up: Uploaded, proof: dict[str, list[int] | list[bytes]],
                ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
        """Ask the survivors for the shares (with the next round's share-keys, when
        pipelining), remove the masks and decode the sum."""
        cfg, graph, t, u3 = self.cfg, ring.graph, ring.t, up.u3
        dead = ring.u2 - u3
        nxt = self._share_records(self.next_ring) if self.next_ring is not None else {}
        unmask_msgs = {}
        for n in u3:
            content = RecordDict({RECORD: ConfigRecord({
                "round": ring.rnd, "attempt": ring.attempt, "stage": UNMASK,
                "active": [v for v in graph[n] if v in u3],
                "dead": [v for v in graph[n] if v in dead], **proof})})
            if n in nxt:
                content[RECORD_NEXT] = nxt[n]
            unmask_msgs[n] = content
        rep = self._send(UNMASK, unmask_msgs, cfg.secagg_timeout)
        t_unmask = time.perf_counter()
        shares: dict[int, list[bytes]] = {n: [] for n in u3 | dead}
        for n, m in rep.items():
            rec = m.content.config_records.get(RECORD)
            nids, got = (rec.get("nids"), rec.get("shares")) if rec is not None else (None, None)
            asked = set(graph[n]) & (u3 | dead)
            if not (isinstance(nids, list) and isinstance(got, list) and len(nids) == len(got)
                    and len(set(nids)) == len(nids)
                    and all(isinstance(o, int) and o in asked for o in nids)
                    and all(isinstance(sh, bytes) for sh in got)):
                self._drop(UNMASK, n, "malformed unmask reply")
                continue
            for owner, share in zip(cast(list[int], nids), cast(list[bytes], got), strict=True):
                shares[owner].append(share)
        short = [n for n, s in shares.items() if len(s) < t]
        if short:
            raise AttemptFailedError(f"too few shares to unmask {len(short)} node(s)", set(rep))
        total = up.total.copy()
        try:
            self._remove_masks(total, shares, ring, u3, dead)
        except (ValueError, TypeError, IndexError) as exc:  # a share that rebuilds nothing
            raise AttemptFailedError(f"unmask shares do not rebuild a secret: {exc}",
                                     set()) from exc
        self.intact = intact(total)
        summed = decode(total, self.layout, cfg.secagg_clip_range, cfg.secagg_quant_range)
        self._time("server-unmask", t_unmask)
        if self.next_ring is not None:
            self._next_shares(self.next_ring, rep)
        return summed, {self._label(n, u3): {} for n in sorted(u3)}

    @staticmethod
    def _remove_masks(total: np.ndarray, shares: dict[int, list[bytes]], ring: KeyRing,
                      u3: set[int], dead: set[int]) -> None:
        """Subtract every aggregated node's private mask and the pairwise masks between the
        aggregated nodes and the masked-upload dropouts (``total`` in place)."""
        t, graph = ring.t, ring.graph
        # t shares rebuild a secret (Lagrange over more points gives the same, slower)
        for n in u3:  # private masks of every aggregated node
            total -= prg_mask(combine_shares(shares[n][:t]), total.shape[0])
        for d in dead:  # pairwise masks between aggregated nodes and a masked-upload dropout
            sk1 = combine_shares(shares[d][:t])
            for w in graph[d]:
                if w in u3:
                    mask = prg_mask(shared_key(sk1, ring.pks[w][0]), total.shape[0])
                    if pair_sign(w, d) > 0:
                        total -= mask
                    else:
                        total += mask

    # ------------------------------------------------------------------ pipelining
    def _next_setup(self, rep: dict[int, Message], rnd: int) -> KeyRing | None:
        """Round ``rnd``'s keys, from the setup replies riding on a masked upload."""
        if not self.pipeline or rnd > self.cfg.num_rounds:
            return None
        nxt = {n: m for n, m in rep.items() if RECORD_NEXT in m.content.config_records}
        try:
            return self._setup(0, nxt, RECORD_NEXT, rnd=rnd)
        except AttemptFailedError:
            return None

    def _next_shares(self, ring: KeyRing, rep: dict[int, Message]) -> None:
        """The next round's encrypted shares, from the unmask replies (``self.next_ring`` is
        None when too few came)."""
        ok = {n: m for n, m in rep.items() if n in ring.u1
              and RECORD_NEXT in m.content.config_records}
        for n in ring.u1 - set(ok):
            ring.dropped.setdefault(SHARE_KEYS, []).append(self.markets.get(n, f"node-{n}"))
        try:
            self._share_keys(ring, ok, RECORD_NEXT)
        except AttemptFailedError as exc:
            log.warning("round %d: pipelined share-keys failed (%s); next round runs setup",
                        self.rnd, exc)
            self.next_ring = None

    def next_records(self) -> dict[int, dict[str, ConfigRecord]]:
        """The next round's masked-upload requests, to ride on this round's evaluate
        messages (naming the survivor set, which enrolled markets sign)."""
        if self.next_ring is None:
            return {}
        return self._masked_records(self.next_ring, self.next_ring.u2, survivors=True)

    def collect_next(self, replies: list[Message]) -> None:
        """Read the next round's masked upload (and the setup of the round after it) from the
        evaluate replies into ``next_prepared``, the next round's ``prepared``."""
        ring = self.next_ring
        if ring is None:
            return
        asked = ring.u2
        ok: dict[int, Message] = {}
        for r in replies:
            self.received.append(r)
            n = int(r.metadata.src_node_id)
            if n in asked and n not in ok and not r.has_error() and RECORD in r.content:
                ok[n] = r
                info = r.content.config_records.get("info")
                if info is not None and isinstance(info.get("market"), str):
                    self.markets[n] = str(info["market"])
        for n in asked - set(ok):
            self._drop(MASKED, n, "no masked upload with its evaluation", ring.dropped)
        try:
            up = self._collect_masked(ring, ok, ring.dropped)
        except AttemptFailedError:
            up = Uploaded(np.zeros(self.layout.size, dtype=np.uint64), set())
        up.survivors = sorted(asked)
        ring.uploaded = up
        ring.after = self._next_setup(ok, ring.rnd + 1)
        self.next_prepared = ring

    # ------------------------------------------------------------------ helpers
    def _send(self, stage: str, contents: dict[int, RecordDict],
              timeout: float) -> dict[int, Message]:
        msgs = [Message(content=c, dst_node_id=n, message_type=MESSAGE_TYPE,
                        group_id=str(self.rnd)) for n, c in contents.items()]
        ok: dict[int, Message] = {}
        seen: set[int] = set()
        t0 = time.perf_counter()
        # fast, backing-off reply polling on Flower's deployment grid (server/exchange.py)
        replies = send_and_receive(self.grid, msgs, timeout=timeout)
        self._time(stage, t0)
        for reply in replies:
            self.received.append(reply)
            n = int(reply.metadata.src_node_id)
            if n not in contents or n in seen:
                continue
            seen.add(n)
            if reply.has_error():
                self._drop(stage, n, str(reply.error.reason))
            elif RECORD not in reply.content:
                self._drop(stage, n, "reply without secagg record")
            else:
                info = reply.content.config_records.get("info")
                if info is not None and isinstance(info.get("market"), str):
                    self.markets[n] = str(info["market"])
                ok[n] = reply
        for n in contents:
            if n not in seen:
                self._drop(stage, n, "no reply")
        return ok

    def _time(self, what: str, t0: float) -> None:
        self.stage_seconds[what] = self.stage_seconds.get(what, 0.0) + time.perf_counter() - t0

    def _label(self, n: int, among: set[int]) -> str:
        """The node's market, suffixed with its id if another node serves the same market."""
        m = self.markets.get(n, f"node-{n}")
        clash = any(self.markets.get(o) == m for o in among if o != n)
        return f"{m}@{n}" if clash else m

    def _drop(self, stage: str, n: int, why: str,
              into: dict[str, list[str]] | None = None) -> None:
        label = self.markets.get(n, f"node-{n}")
        (self.dropped if into is None else into).setdefault(stage, []).append(label)
        log.warning("round %d: secagg %s: %s dropped (%s)", self.rnd, stage, label, why[:200])

    @staticmethod
    def _check_holders(nodes: set[int], graph: dict[int, list[int]], holders: set[int],
                       t: int, stage: str, min_alive: int = 2) -> None:
        """Each of ``nodes`` must have >= t share holders among ``holders`` (else its secret
        could not be rebuilt at unmask), and at least ``min_alive`` nodes must remain."""
        if len(nodes) < min_alive:
            raise AttemptFailedError(f"{len(nodes)} node(s) left after {stage}", holders)
        weak = [n for n in nodes if len(set(graph[n]) & holders) < t]
        if weak:
            raise AttemptFailedError(f"{len(weak)} node(s) with fewer than {t} live neighbours "
                                f"after {stage}", holders)


def _signature(reply: Message) -> bytes | None:
    """The survivor-set signature a reply carries (consistency check), if any."""
    sig = reply.content.config_records[RECORD].get("sig")
    return sig if isinstance(sig, bytes) else None


def check_sum(summed: dict[str, np.ndarray], n_summed: int, cfg: RunConfig) -> str | None:
    """Why a decoded sum must be rejected, or None. Only sums are checked (no market's own
    figures reach the server): the count of markets each one put in; one weight (per market
    its capped example count, or 1 under DP) shared by every encoder tensor, within what
    ``n_summed`` markets may claim; and the L2 norm of the summed weighted deltas within what
    markets whose deltas are clipped to ``update-clip`` (the DP clip if tighter) could produce,
    plus the DP noise they declared (summed) and the fixed-point rounding."""
    dp = cfg.dp_clip > 0
    markets = float(summed[COUNTER_PREFIX + "markets"][0])
    if markets != n_summed:
        return f"the sum holds {markets:g} market counts but {n_summed} markets were summed"
    enc = [k for k in summed if not k.startswith((WEIGHT_PREFIX, COUNTER_PREFIX, STAT_PREFIX))]
    weights = sorted({float(summed[WEIGHT_PREFIX + k][0]) for k in enc})
    if len(weights) != 1:
        return f"summed weights differ between tensors: {weights[:3]}"
    w = weights[0]
    if w < n_summed or w > n_summed * (1 if dp else cfg.secagg_max_weight):
        return f"summed weight {w:g} is not possible for {n_summed} markets"
    clip = min(c for c in (cfg.dp_clip, cfg.update_clip) if c > 0)
    d = sum(summed[k].size for k in enc)
    noise_var = max(float(summed["stat/noise-var"][0]), 0.0)
    step = quant_step(cfg.secagg_clip_range, cfg.secagg_quant_range)
    bound = (w * clip * (1 + 1e-5) + math.sqrt(noise_var) * (math.sqrt(d) + 10.0)
             + n_summed * step * d)
    norm = math.sqrt(sum(float(np.square(summed[k], dtype=np.float64).sum()) for k in enc))
    if not norm <= bound:
        return (f"the summed update's L2 norm {norm:.4g} exceeds {bound:.4g}, the most "
                f"{n_summed} markets clipped to {clip:g} (weights {w:g}) can send")
    return None


class SecAggAggregation:
    """Every round's encoder aggregation done by SecAgg+ (module doc), for ``run_rounds``: the
    DP accounting of every decoded sum, and the next round's key exchange prepared during this
    round's unmask and evaluate messages when every node trains every round."""

    def __init__(self, run: ServerRun) -> None:
        self.run = run
        self.last: SecAggRound | None = None  # its next_prepared is set during evaluation
        self.labels: dict[int, str] = {}
        self.multipliers = [float(r["secagg"]["dp_multiplier"]) for r in run.rounds
                            if "dp_multiplier" in r.get("secagg", {})]
        # with sampling (fraction-train < 1) the next round's nodes are not known yet
        self.pipeline = run.cfg.fraction_train >= 1.0

    def train_round(self, grid: Grid, rnd: int, messages: list[Message]) -> RoundStep:
        run, cfg = self.run, self.run.cfg
        nodes = [int(m.metadata.dst_node_id) for m in messages]
        prepared = self.last.next_prepared if self.last is not None else None
        sa = SecAggRound(grid, cfg, rnd, run.strategy.global_state, nodes, prepared,
                         pipeline=self.pipeline and rnd < cfg.num_rounds, markets=self.labels)
        self.last = sa
        result = sa.run()
        dp = cfg.dp_clip > 0
        if dp and result.summed is not None:  # every decoded sum counts, accepted or not
            self.multipliers.append(effective_multiplier(cfg.dp_noise, result.n_sampled,
                                                         result.n_summed))
            result.report["dp_multiplier"] = self.multipliers[-1]
        aggregate_round(run, rnd, result)
        if dp:
            run.extra["privacy"] = {**epsilon_spent(self.multipliers, cfg.dp_delta,
                                                    len(cfg.market_list) or len(nodes)),
                                    "noise_multiplier": cfg.dp_noise, "clip": cfg.dp_clip}
            result.report["epsilon"] = run.extra["privacy"]["epsilon"]
        return RoundStep(extra={"secagg": result.report},
                         eval_records=sa.next_records(), on_eval=sa.collect_next)


def run_server_secagg(grid: Grid, context: Context, cfg: RunConfig) -> dict[str, Any]:
    """``run_rounds`` with SecAgg+ (what the ServerApp runs when ``secagg = true``)."""
    del context  # the run config is already in ``cfg``
    return run_rounds(grid, cfg, SecAggAggregation)


def aggregate_round(run: ServerRun, rnd: int, result: RoundResult) -> None:
    """Apply a SecAgg+ round's sum to the global encoder (or record why not)."""
    strategy = run.strategy
    strategy.last_train = {}  # no market's own training figures reach the server
    result.report["clipped_values"] = 0
    if result.summed is None:
        strategy.rejected.append((rnd, "*", "secure aggregation failed"))
        return
    summed = result.summed
    result.report["clipped_values"] = int(summed[COUNTER_PREFIX + "clipped"][0])
    loss_w = float(summed[WEIGHT_PREFIX + "stat/train-loss"][0])
    if loss_w > 0:  # the example-weighted mean train loss of the summed markets
        result.report["train_loss"] = float(summed["stat/train-loss"][0]) / loss_w
    if result.report["clipped_values"]:
        log.warning("round %d: %d update values exceeded secagg-clip-range %g and were "
                    "clipped", rnd, result.report["clipped_values"], run.cfg.secagg_clip_range)
    result.report["norm_clipped_markets"] = int(summed[COUNTER_PREFIX + "norm-clipped"][0])
    why = check_sum(summed, result.n_summed, run.cfg) if result.intact else (
        "the sum fails its integrity check: a masked vector was changed after it was encoded")
    if why is not None:
        strategy.rejected.append((rnd, "*", why))
        log.warning("round %d: secagg sum rejected: %s", rnd, why)
        result.summed = None
        return
    strategy.last_train = {label: {} for label in result.train}  # who is in the sum
    strategy.global_state = apply_summed_update(strategy.global_state, summed)
