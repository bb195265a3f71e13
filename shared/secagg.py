"""SecAgg+ pieces shared by the server (``server/secagg.py``) and the client
(``client/secagg.py``): message keys, the encoding of a wire-format update into one integer
vector, the pseudo-random masks and the neighbour graph.

Why storefed runs SecAgg+ on the Message API instead of Flower's ``SecAggPlusWorkflow``
---------------------------------------------------------------------------------------
Flower 1.42 ships SecAgg+ only on the legacy path: ``SecAggPlusWorkflow`` needs a
``LegacyContext`` + legacy ``Strategy`` (``aggregate_fit`` over ``FitRes``) and its client mod
``secaggplus_mod`` converts the reply with ``recorddict_to_fitres`` (it expects the legacy
``fitres.*`` records, not storefed's ``arrays``/``metrics`` reply), so it cannot wrap a Message
API ``@app.train`` handler. It also (a) weights *parameters* by ``num_examples / max_weight``
itself, while storefed's wire format already sends weighted deltas + weights, (b) quantises into
int32 with a target range below 2**31 and silently clips to ``clipping_range``, (c) derives each
mask from a 32-bit seed (``pseudo_rand_gen`` xors the key down to 32 bits) and (d) halts the round
when a node drops during setup or key sharing. So storefed runs the same four SecAgg+ stages
(setup -> share keys -> collect masked vectors -> unmask; Bell et al. 2020) as its own
``train.secagg`` messages, built from Flower's primitives: authenticated encryption of shares
(``flwr.common.secure_aggregation.crypto.symmetric_encryption``), the share plaintext format
(``secaggplus_utils``) and Shamir secret sharing (``flwr.common.secure_aggregation.crypto.shamir``),
with key agreement by X25519 + HKDF-SHA256 from ``cryptography`` (:func:`shared_key`; Flower's
P-384 ECDH was the largest SecAgg+ cost in ``storefed benchmark-secagg``'s profile: X25519 is
~40x faster and its 32-byte private key is shared in 3 Shamir chunks instead of 4). What differs:

* **Encoding** (:class:`VectorLayout`): one int64 vector per client, arithmetic mod 2**64
  (numpy uint64 wrap-around, no explicit modulus): two counters (``COUNTERS``: 1 per market, its
  number of clipped values), then the *weights*, one example count per tensor and market (no
  item-row counts: for an item only one market sells, the row count would be that market's own),
  exactly as integers (no ``max_weight``: sums of weights are exact), then the weighted deltas
  and the weighted train loss (``STATS``), so no training figure of a market travels in the
  clear. The weighted
  deltas are clipped to ``[-clip_range, clip_range]`` and stochastically rounded to the grid
  ``step = 2 * clip_range / quant_range`` (unbiased; the same scheme as Flower's ``quantize`` but
  signed and in int64, so the default grid is 2**-31 instead of ~4e-6). Clipped values are
  counted and reported per market and per round, never lost silently.
* **Bound**: with no clipped value, each client's dequantised value is within one ``step`` of
  its true value, so per coordinate ``|sum_secagg - sum_true| < n * step`` for ``n`` aggregated
  clients and the averaged update is within ``n * step / sum(weights)`` of the plain average
  (weights are exact). Decoding is exact as long as ``n * (quant_range / 2 + 1) < 2**63``.
* **Integrity check** (:func:`checksum`): the last slot of every vector is
  ``sum_j c_j * v_j mod 2**64`` over the vector's other slots, with public odd coefficients
  ``c`` (AES-CTR under a fixed public key). The check is linear, so the unmasked sum of honest
  vectors carries the check of the sum exactly; the server rejects a sum whose check does not
  match. A value changed anywhere after encoding (a corrupted or tampered masked vector, or a
  bug) fails it with certainty for one slot and with probability about ``1 - 2**-64``
  otherwise (:func:`intact`). It is **not** input validation: a market that
  poisons its update *before* encoding computes a matching check, since ``c`` is public; what
  bounds that market is ``update-clip``, ``secagg-max-weight`` and the server's sum checks,
  and proofs of bounded inputs (ACORN) are what would stop it (``docs/privacy.md``).
* **Masks** (:func:`prg_mask`): AES-256-CTR keystream (``cryptography``) keyed by the full
  32-byte seed / ECDH-derived key, instead of a 32-bit-seeded numpy ``RandomState``.
* **Dropouts**: the server tracks the survivor set of every stage: a node dropping at setup or
  share-keys is simply left out (nobody masks with it), a node dropping at masked upload has its
  pairwise masks removed from its ``sk1`` shares, a node dropping at unmask has its private mask
  removed from its seed shares. When a stage leaves too few nodes (fewer than two, or fewer than
  the reconstruction threshold a secret needs) the round restarts from setup with the survivors
  (clients reuse the update they already trained for the round, unless an unmask of the round
  was already answered: then they refuse) up to ``secagg-retries`` times.
* **Pipelining**: the next round's setup, share-keys and masked upload ride on this round's
  masked upload, unmask and evaluate messages, so a steady-state round is two exchanges (unmask,
  evaluation) as in plain FedAvg (``server/secagg.py``).
* **Threat model** (``docs/privacy.md``): honest-but-curious server; the server learns only
  sums over at least the ``min-markets`` of every summed market's privacy policy
  (``shared/policy.py``). Each client checks the stage order, that no node is reported both
  alive and dropped, a threshold above half its neighbourhood, the survivor count before it
  reveals shares, and never uploads an update into a second sum once an unmask of its round was
  answered, and (with a trusted-markets table, ``shared/identity.py``) verifies every
  neighbour's round keys against the identity key it trusts for that market. DP noise never
  falls below the market's own floor, whatever sample size the server announces.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from storefed.shared.wire import ROWWISE_KEY, WEIGHT_PREFIX

MESSAGE_TYPE = "train.secagg"
RECORD = "secagg"  # ConfigRecord key carrying the protocol fields both ways
RECORD_NEXT = "secagg-next"  # the next round's stage riding on this round's (pipelining)
SETUP, SHARE_KEYS, MASKED, UNMASK = "setup", "share-keys", "masked-upload", "unmask"
#: the malicious-server variant's consistency check (between masked upload and unmask): each
#: survivor signs the survivor set it was given, and reveals shares only after checking at
#: least ``threshold`` of its neighbours' signatures on the same set
CONSISTENCY = "consistency"
STAGES = (SETUP, SHARE_KEYS, MASKED, CONSISTENCY, UNMASK)
MASKED_KEY = "masked"  # ArrayRecord key of the masked vector (uint64)
MAX_SUM = 2**63


#: integer slots at the head of every vector: each market puts 1 in ``markets`` (the server
#: checks the decoded count against the nodes it summed), its number of values beyond the
#: fixed-point range in ``clipped`` and 1 in ``norm-clipped`` if ``update-clip`` shortened its
#: delta; the server learns only their sums
COUNTERS = ("markets", "clipped", "norm-clipped")
COUNTER_PREFIX = "counter/"
#: training statistics that travel inside the masked vector, weighted like a dense tensor (the
#: server decodes their example-weighted mean over the markets, never one market's value)
STAT_PREFIX = "stat/"
STATS = ("stat/train-loss", "stat/noise-var")


@dataclass(frozen=True)
class VectorLayout:
    """Where each wire-format tensor lives in the flat integer vector.

    Integers first (the ``COUNTERS``, then every ``weight/<k>``, exact), then every numerator
    ``<k>`` (fixed point), the ``STATS`` last. Built identically on both sides from the global
    encoder's keys and shapes. Under secure aggregation every weight is one scalar per market
    (``rowwise`` is for plain FedAvg: a row weight of a row only one market trained *is* that
    market's interaction count).
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    weight_shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def for_encoder(cls, global_: dict[str, torch.Tensor], rowwise: bool = False,
                    ) -> VectorLayout:
        enc = tuple(sorted(global_))
        keys = enc + STATS
        shapes = tuple(tuple(global_[k].shape) for k in enc) + tuple((1,) for _ in STATS)
        wshapes = tuple((global_[k].shape[0],) if (rowwise and k == ROWWISE_KEY) else (1,)
                        for k in enc) + tuple((1,) for _ in STATS)
        return cls(keys, shapes, wshapes)

    @property
    def n_counters(self) -> int:
        return len(COUNTERS)

    @property
    def n_weights(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.weight_shapes))

    @property
    def n_values(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @property
    def size(self) -> int:
        """Slots of the vector: counters, weights, values and the integrity check."""
        return self.n_counters + self.n_weights + self.n_values + 1

    def flatten(self, update: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(weights float64, numerators float64) as flat vectors; checks keys and shapes."""
        expected = set(self.keys) | {WEIGHT_PREFIX + k for k in self.keys}
        if set(update) != expected:
            raise ValueError(f"update keys differ from the layout: "
                             f"{sorted(set(update) ^ expected)[:4]}")
        ws, vs = [], []
        for k, shape, wshape in zip(self.keys, self.shapes, self.weight_shapes, strict=True):
            v, w = np.asarray(update[k]), np.asarray(update[WEIGHT_PREFIX + k])
            if tuple(v.shape) != shape or tuple(w.shape) != wshape:
                raise ValueError(f"{k}: shapes {v.shape}/{w.shape} != layout {shape}/{wshape}")
            ws.append(w.astype(np.float64).ravel())
            vs.append(v.astype(np.float64).ravel())
        return np.concatenate(ws), np.concatenate(vs)

    def unflatten(self, weights: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        wo = vo = 0
        for k, shape, wshape in zip(self.keys, self.shapes, self.weight_shapes, strict=True):
            n, nw = int(np.prod(shape)), int(np.prod(wshape))
            out[k] = values[vo:vo + n].reshape(shape)
            out[WEIGHT_PREFIX + k] = weights[wo:wo + nw].reshape(wshape)
            vo, wo = vo + n, wo + nw
        return out


def with_stats(update: dict[str, np.ndarray], train_loss: float, weight: float,
               noise_var: float = 0.0) -> dict[str, np.ndarray]:
    """``update`` plus the ``STATS`` slots: the train loss weighted like the dense tensors, and
    the variance of the DP noise the market added per value (summed: the server sizes its
    bound on the decoded sum with it)."""
    out = dict(update)
    out["stat/train-loss"] = np.asarray([train_loss * weight], dtype=np.float64)
    out[WEIGHT_PREFIX + "stat/train-loss"] = np.asarray([weight], dtype=np.float64)
    out["stat/noise-var"] = np.asarray([noise_var], dtype=np.float64)
    out[WEIGHT_PREFIX + "stat/noise-var"] = np.asarray([1.0], dtype=np.float64)
    return out


def generate_keys() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes (private 32, public 32). The private key is what
    is Shamir-shared (3 chunks of 16 bytes, where a P-384 scalar takes 4)."""
    sk = x25519.X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def shared_key(private: bytes, public: bytes) -> bytes:
    """Pairwise key of two parties: X25519, then HKDF-SHA256 to 32 bytes, url-safe base64 (a
    Fernet key, as Flower's ``generate_shared_key`` derives it from P-384 ECDH). Raises
    ValueError for a malformed key."""
    secret = x25519.X25519PrivateKey.from_private_bytes(private).exchange(
        x25519.X25519PublicKey.from_public_bytes(public))
    return base64.urlsafe_b64encode(
        HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=None).derive(secret))


def quant_step(clip_range: float, quant_range: int) -> float:
    """The fixed-point grid step: ``2 * clip_range / quant_range``."""
    return 2.0 * clip_range / quant_range


def check_capacity(n_clients: int, quant_range: int) -> None:
    """Raise ValueError when a sum over ``n_clients`` could overflow int64."""
    if n_clients * (quant_range // 2 + 1) >= MAX_SUM:
        raise ValueError(f"secagg-quant-range {quant_range} is too large for {n_clients} "
                         f"clients: n * (range/2 + 1) must stay below 2**63")


def encode(update: dict[str, np.ndarray], layout: VectorLayout, clip_range: float,
           quant_range: int, rng: np.random.Generator,
           norm_clipped: bool = False) -> tuple[np.ndarray, int]:
    """Wire-format update -> (uint64 vector, number of clipped numerator values).

    Weights must be non-negative integers (example / row counts) and travel exactly."""
    weights, values = layout.flatten(update)
    if np.any(weights < 0) or np.any(weights != np.round(weights)) or np.any(weights >= 2**52):
        raise ValueError("secagg weights must be non-negative integers below 2**52")
    if not np.all(np.isfinite(values)):
        raise ValueError("secagg: non-finite values in the update")
    clipped = int(np.count_nonzero(np.abs(values) > clip_range))
    scaled = np.clip(values, -clip_range, clip_range) / quant_step(clip_range, quant_range)
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))  # unbiased stochastic rounding
    counters = np.asarray([1, clipped, int(norm_clipped)], dtype=np.int64)  # COUNTERS
    body = np.concatenate([counters, weights.astype(np.int64), q.astype(np.int64)])
    body = body.view(np.uint64)
    return np.concatenate([body, np.asarray([checksum(body)], dtype=np.uint64)]), clipped


_CHECK_KEY = hashlib.sha256(b"storefed-secagg-integrity-check-v1").digest()


@functools.lru_cache(maxsize=4)
def check_coefficients(n: int) -> np.ndarray:
    """The public odd coefficients of the integrity check for an ``n``-slot body (read-only)."""
    c = prg_mask(_CHECK_KEY, n) | np.uint64(1)
    c.flags.writeable = False
    return c


def intact(vec: np.ndarray) -> bool:
    """Whether a vector (one market's, or an unmasked sum) carries the check of its body."""
    raw = np.ascontiguousarray(vec, dtype=np.uint64)
    return bool(checksum(raw[:-1]) == raw[-1])


def checksum(body: np.ndarray) -> np.uint64:
    """``sum_j c_j * body_j mod 2**64`` (uint64 arithmetic wraps): linear, so the check of a
    sum of vectors is the sum of their checks."""
    c = check_coefficients(int(body.shape[0]))
    return np.uint64((c * np.asarray(body, dtype=np.uint64)).sum(dtype=np.uint64))


def decode(summed: np.ndarray, layout: VectorLayout, clip_range: float,
           quant_range: int) -> dict[str, np.ndarray]:
    """Unmasked sum (uint64, mod 2**64) -> summed wire-format update (float64); the check slot
    is not decoded (:func:`intact` checks it)."""
    if summed.shape != (layout.size,):
        raise ValueError(f"summed vector has shape {summed.shape}, expected ({layout.size},)")
    signed = np.ascontiguousarray(summed, dtype=np.uint64)[:-1].view(np.int64)
    nc, nw = layout.n_counters, layout.n_weights
    weights = signed[nc:nc + nw].astype(np.float64)
    values = signed[nc + nw:].astype(np.float64) * quant_step(clip_range, quant_range)
    out = layout.unflatten(weights, values)
    for i, name in enumerate(COUNTERS):
        out[COUNTER_PREFIX + name] = signed[i:i + 1].astype(np.float64)
    return out


# A private-mask seed has 31 random bytes (248 bits): Flower's Shamir sharing pads a secret to
# whole 16-byte chunks (always adding padding), so 31 bytes travel as 2 chunks instead of the 3
# of a 32-byte seed: a third less work to share a seed and, on the server, to rebuild one per
# aggregated node at unmask (pure-Python GF(2^128) Lagrange interpolation, the server's largest
# SecAgg+ cost). The AES-256 mask key is the seed's SHA-256.
SEED_BYTES = 31


def key_bytes(shared_key: bytes) -> bytes:
    """The 32-byte AES key of a mask: a Flower shared key (url-safe base64 of 32 bytes) decoded,
    a 31-byte private-mask seed hashed (SHA-256), 32 raw bytes as they are."""
    if len(shared_key) == 44:
        return base64.urlsafe_b64decode(shared_key)
    if len(shared_key) == SEED_BYTES:
        return hashlib.sha256(shared_key).digest()
    return shared_key


def prg_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint64 values: the AES-256-CTR keystream under a 32-byte seed."""
    key = key_bytes(seed)
    if len(key) != 32:
        raise ValueError(f"mask seed must give a 32-byte key, got {len(key)} bytes")
    enc = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(bytes(8 * length)) + enc.finalize(), dtype=np.uint64).copy()


AUTO_MIN_NEIGHBOURS = 11


def neighbourhood_size(n: int, shares: int) -> int:
    """Nodes in each neighbourhood (itself included), a ring with ``k // 2`` nodes on each
    side. ``shares`` > 0: that many, made odd. ``shares`` = 0 (automatic): everyone up to 11
    nodes, else ``max(11, 2 * ceil(log2 n) + 1)`` (SecAgg+'s logarithmic neighbourhoods: the
    key agreement and secret sharing cost O(n k) instead of O(n^2))."""
    if shares <= 0:
        shares = max(AUTO_MIN_NEIGHBOURS, 2 * math.ceil(math.log2(max(n, 2))) + 1)
    if shares >= n:
        return n
    return min(n, shares | 1)


def threshold_for(k: int, fraction: float) -> int:
    """Shares needed to rebuild a secret in a neighbourhood of ``k``: ``round(fraction*k)``,
    at least 2 (one node alone must never reveal a secret), above ``k / 2`` (two disjoint
    halves of the neighbourhood must never both rebuild one node's secrets) and at most
    ``k``."""
    return min(k, max(2, k // 2 + 1, round(fraction * k)))


def neighbours(order: list[int], shares: int) -> dict[int, list[int]]:
    """SecAgg+ graph over ``order`` (already shuffled): node -> sorted neighbourhood (itself
    included), a ring of ``neighbourhood_size`` consecutive nodes; symmetric."""
    n = len(order)
    k = neighbourhood_size(n, shares)
    half = k // 2
    out: dict[int, list[int]] = {}
    for i, nid in enumerate(order):
        if k == n:
            out[nid] = sorted(order)
        else:
            out[nid] = sorted({order[(i + off) % n] for off in range(-half, half + 1)})
    return out


def pair_sign(me: int, other: int) -> int:
    """+1 if ``me`` adds the pairwise mask shared with ``other``, -1 if it subtracts it."""
    return 1 if me > other else -1
