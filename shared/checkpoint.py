"""Checkpoints: the global encoder (with the catalog it indexes) and a market's private state.

Every write is atomic: the file is written to a temporary name in the same directory, flushed
and fsync'ed, then renamed over the target, so a kill during a write leaves the previous
checkpoint readable. Loads use ``torch.load(weights_only=True)`` and check shapes and catalog.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from storefed.shared.errors import CheckpointError
from storefed.shared.model import ITEM_EMB_KEY, ModelConfig

FORMAT = "storefed-encoder/1"
PRIVATE_FORMAT = "storefed-private/1"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"{what} checkpoint {path} is corrupted or not a storefed "
                              f"checkpoint ({type(exc).__name__}: {load_reason(exc)})"
                              ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} checkpoint {path} does not hold a dict")
    return obj


def load_reason(exc: BaseException) -> str:
    """The first line of ``torch.load``'s error, without its advice to retry with
    ``weights_only=False`` (that would unpickle arbitrary code from an untrusted file)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    keep = [ln for ln in lines if "weights_only" not in ln and "arbitrary code" not in ln
            and not ln.startswith(("(1)", "(2)", "Please file an issue", "Check the docum"))]
    text = (keep[0] if keep else "unreadable file")[:200]
    return text.removesuffix(".")


@dataclass(frozen=True)
class EncoderCheckpoint:
    state: dict[str, torch.Tensor]
    model: ModelConfig
    item_ids: tuple[str, ...]
    categories: tuple[str, ...]
    item_category: tuple[int, ...]
    catalog_fingerprint: str
    round: int
    meta: dict[str, Any]


def save_encoder(path: str | Path, state: dict[str, torch.Tensor], model: ModelConfig,
                 item_ids: tuple[str, ...], categories: tuple[str, ...],
                 item_category: list[int], catalog_fingerprint: str, round_: int,
                 meta: dict[str, Any] | None = None) -> None:
    """Save the global encoder with the catalog it indexes (atomic)."""
    atomic_torch_save({
        "format": FORMAT, "state": {k: v.detach().cpu() for k, v in state.items()},
        "model": model.to_dict(), "item_ids": list(item_ids), "categories": list(categories),
        "item_category": [int(c) for c in item_category],
        "catalog_fingerprint": catalog_fingerprint, "round": int(round_),
        "meta": dict(meta or {}),
    }, path)


def load_encoder(path: str | Path) -> EncoderCheckpoint:
    """Load and validate an encoder checkpoint (CheckpointError naming the file on failure)."""
    obj = read_checkpoint(path, "encoder")
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"encoder checkpoint {path}: format {obj.get('format')!r}, "
                              f"expected {FORMAT!r}")
    try:
        model = ModelConfig(**obj["model"])
        state = obj["state"]
        emb = state[ITEM_EMB_KEY]
        if tuple(emb.shape) != (model.n_items + 1, model.dim):
            raise CheckpointError(f"encoder checkpoint {path}: item table {tuple(emb.shape)} "
                                  f"does not match n_items={model.n_items}, dim={model.dim}")
        if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"encoder checkpoint {path}: 'state' is not a dict of tensors")
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(
            torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"encoder checkpoint {path}: non-finite values in {bad[0]}")
        if len(obj["item_ids"]) != model.n_items:
            raise CheckpointError(f"encoder checkpoint {path}: {len(obj['item_ids'])} catalog "
                                  f"items but the model has {model.n_items}")
        return EncoderCheckpoint(
            state=state, model=model, item_ids=tuple(obj["item_ids"]),
            categories=tuple(obj["categories"]), item_category=tuple(obj["item_category"]),
            catalog_fingerprint=str(obj["catalog_fingerprint"]), round=int(obj["round"]),
            meta=dict(obj.get("meta", {})))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"encoder checkpoint {path}: missing or malformed field "
                              f"{exc}") from exc


def check_state(path: str | Path, state: dict[str, torch.Tensor],
                expected: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless ``state`` has exactly the keys and shapes of ``expected``."""
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise CheckpointError(f"encoder checkpoint {path}: tensor keys differ from this model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"encoder checkpoint {path}: key {k} has shape "
                                  f"{tuple(state[k].shape)}, this model needs {tuple(v.shape)}")


def save_private(path: str | Path, state: dict[str, torch.Tensor], market: str,
                 catalog_fingerprint: str, round_: int) -> None:
    """Save a market's private state (heads) atomically."""
    atomic_torch_save({"format": PRIVATE_FORMAT, "state": state, "market": market,
                       "catalog_fingerprint": catalog_fingerprint, "round": int(round_)}, path)


def load_private(path: str | Path, market: str,
                 catalog_fingerprint: str) -> tuple[dict[str, torch.Tensor], int]:
    """Load a market's private state; refuse one saved for another market or catalog."""
    obj = read_checkpoint(path, "private-state")
    if obj.get("format") != PRIVATE_FORMAT:
        raise CheckpointError(f"private-state checkpoint {path}: format {obj.get('format')!r}")
    if obj.get("market") != market:
        raise CheckpointError(f"private-state checkpoint {path} belongs to market "
                              f"{obj.get('market')!r}, not {market!r}")
    if obj.get("catalog_fingerprint") != catalog_fingerprint:
        raise CheckpointError(f"private-state checkpoint {path} was saved for another catalog")
    return obj["state"], int(obj.get("round", 0))
