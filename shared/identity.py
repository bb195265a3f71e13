"""A market's long-term identity key, and the round keys it signs with it.

Decision record
---------------
* **Why.** SecAgg+ round keys (``shared/secagg.py``) are relayed by the server. Unsigned, a
  server can hand a market its own public key in place of a neighbour's, decrypt the Shamir
  shares meant for that neighbour, and rebuild the market's masks. Bonawitz et al. (CCS 2017,
  the malicious-server variant) sign each round's keys with a long-term key that the other
  parties know from outside the protocol; storefed does the same.
* **Which key.** Ed25519 (``cryptography``): 32-byte public keys, deterministic signatures, no
  parameter choices. One per market, created on first use as ``identity.key`` (PKCS#8 PEM, mode
  0600) in the market's state directory; the private key never leaves it.
* **Whom a market trusts.** A TOML table ``market = "<hex public key>"``: the policy's
  ``trusted-markets`` file, else ``trusted-markets.toml`` in the market's state directory. It
  comes from enrollment (a region's configuration, the join step, or ``storefed simulate``,
  whose user holds every simulated market), never from the server. With such a table, a market
  refuses share-keys unless every neighbour's round keys carry a valid signature by the key the
  table holds for that neighbour's market name, and names are unique. Without one, round keys
  are unauthenticated and the market says so in its log.
* **What is signed.** ``storefed-secagg-v1``, the round, the attempt, the market name and both
  round public keys, length-prefixed: a signature cannot be replayed into another round, attempt
  or market.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.errors import ConfigError

IDENTITY_FILE = "identity.key"
TRUSTED_FILE = "trusted-markets.toml"
_DOMAIN = b"storefed-secagg-v1"


def load_or_create(market_dir: Path) -> Ed25519PrivateKey:
    """The market's identity key from ``market_dir/identity.key``, created (0600) if absent."""
    path = market_dir / IDENTITY_FILE
    if path.is_file():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a PEM private key ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path}: not an Ed25519 key")
        return key
    key = Ed25519PrivateKey.generate()
    market_dir.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(path, pem)
    os.chmod(path, 0o600)
    return key


def public_hex(key: Ed25519PrivateKey) -> str:
    """The 32-byte raw public key, hex."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw).hex()


def _message(rnd: int, attempt: int, market: str, pk1: bytes, pk2: bytes) -> bytes:
    parts = [_DOMAIN, str(rnd).encode(), str(attempt).encode(), market.encode(), pk1, pk2]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def sign_round_keys(key: Ed25519PrivateKey, rnd: int, attempt: int, market: str, pk1: bytes,
                    pk2: bytes) -> bytes:
    return key.sign(_message(rnd, attempt, market, pk1, pk2))


def verify_round_keys(public: bytes, signature: bytes, rnd: int, attempt: int, market: str,
                      pk1: bytes, pk2: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            signature, _message(rnd, attempt, market, pk1, pk2))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _survivors_message(rnd: int, attempt: int, survivors: list[int]) -> bytes:
    parts = [b"storefed-consistency-v1", str(rnd).encode(), str(attempt).encode(),
             ",".join(str(n) for n in sorted(survivors)).encode()]
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def sign_survivors(key: Ed25519PrivateKey, rnd: int, attempt: int,
                   survivors: list[int]) -> bytes:
    """The consistency check's signature over the survivor set a market was given."""
    return key.sign(_survivors_message(rnd, attempt, survivors))


def verify_survivors(public: bytes, signature: bytes, rnd: int, attempt: int,
                     survivors: list[int]) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(
            signature, _survivors_message(rnd, attempt, survivors))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def load_trusted(path: Path) -> dict[str, bytes]:
    """``market = "<hex>"`` lines -> {market: 32-byte public key}; errors name the file."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the trusted markets: {exc}") from exc
    out: dict[str, bytes] = {}
    for market, value in raw.items():
        try:
            key = bytes.fromhex(str(value))
        except ValueError as exc:
            raise ConfigError(f"{path}: key of market '{market}' is not hex") from exc
        if len(key) != 32:
            raise ConfigError(f"{path}: key of market '{market}' is not 32 bytes")
        out[str(market)] = key
    return out


def write_trusted(path: Path, keys: dict[str, str]) -> Path:
    """Write a trusted-markets table (market -> hex public key) atomically."""
    text = "".join(f'"{m}" = "{k}"\n' for m, k in sorted(keys.items()))
    atomic_write_bytes(path, text.encode())
    return path


def enroll(state_dir: Path, markets: list[str]) -> None:
    """Give every market of ``state_dir`` an identity key and a trusted-markets table holding
    all of them (a simulation: one person holds every market)."""
    keys = {m: public_hex(load_or_create(state_dir / m)) for m in markets}
    for m in markets:
        write_trusted(state_dir / m / TRUSTED_FILE, keys)
