"""What a market's recommendation service (``client/serve.py``) reads: one file per market,
``<state-dir>/<market>/serving.pt``, rewritten by the market's node after every round's
evaluation with exactly the model that evaluation scored: the global encoder the node received
for that round, its private heads (with the item-kNN weight the evaluation calibrated), the
model shapes, the catalog fingerprint and the run config (dataset, seed, history length, ...).

The file is private to the market (the heads never leave it) and written atomically (temp file
in the same directory + fsync + ``os.replace``), so a reader sees the previous round's file or
the new one, never a torn one. ``version`` is a content hash of the tensors: two rounds with the
same model give the same version, a different model a different one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from storefed.shared.checkpoint import atomic_torch_save, read_checkpoint
from storefed.shared.errors import CheckpointError
from storefed.shared.model import MarketModel, ModelConfig, encoder_state, private_state

if TYPE_CHECKING:
    from storefed.shared.node import MarketNode

SERVING_FORMAT = "storefed-serving/1"
SERVING_FILE = "serving.pt"

log = logging.getLogger("storefed")


@dataclass(frozen=True)
class ServingSnapshot:
    """One round's servable model of one market."""

    market: str
    round: int
    version: str
    encoder: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    model: ModelConfig
    catalog_fingerprint: str
    config: dict[str, Any]
    written_at: float


def serving_path(state_dir: str | Path, market: str) -> Path:
    """``<state_dir>/<market>/serving.pt``."""
    return Path(state_dir) / market / SERVING_FILE


def model_version(encoder: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> str:
    """12 hex digits of a sha256 over every tensor (name, shape, bytes), in name order."""
    h = hashlib.sha256()
    for part in (encoder, heads):
        for k in sorted(part):
            t = part[k].detach().cpu().contiguous()
            h.update(k.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:12]


def save_serving(path: str | Path, model: MarketModel, market: str, catalog_fingerprint: str,
                 round_: int, config: dict[str, Any]) -> str:
    """Write ``model``'s encoder and heads for serving (atomic); returns the version."""
    enc, heads = encoder_state(model), private_state(model)
    version = model_version(enc, heads)
    atomic_torch_save({"format": SERVING_FORMAT, "market": market, "round": int(round_),
                       "version": version, "encoder": enc, "heads": heads,
                       "model": model.cfg.to_dict(), "catalog_fingerprint": catalog_fingerprint,
                       "config": dict(config), "written_at": time.time()}, path)
    return version


def write_node_serving(node: MarketNode, round_: int) -> Path | None:
    """After ``node.evaluate``: keep what the market's service needs for ``round_`` beside the
    node's private state (``<state-dir>/<market>/serving.pt``). Nothing without a state
    directory; the single-task model (one tower per category) is not servable."""
    if node.state_path is None or not isinstance(node.model, MarketModel) \
            or node.cfg.mtl == "single-task":
        return None
    path = node.state_path.parent / SERVING_FILE
    version = save_serving(path, node.model, node.market, node.catalog.fingerprint(), round_,
                           node.cfg.to_mapping())
    log.debug("market %s: serving model of round %d written (%s)", node.market, round_, version)
    return path


def load_serving(path: str | Path, market: str) -> ServingSnapshot:
    """Load and check a serving file (CheckpointError naming the file and what is wrong)."""
    obj = read_checkpoint(path, "serving")
    if obj.get("format") != SERVING_FORMAT:
        raise CheckpointError(f"serving file {path}: format {obj.get('format')!r}, expected "
                              f"{SERVING_FORMAT!r}")
    if obj.get("market") != market:
        raise CheckpointError(f"serving file {path} belongs to market {obj.get('market')!r}, "
                              f"not {market!r}")
    try:
        enc, heads = obj["encoder"], obj["heads"]
        for part in (enc, heads):
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor)
                                                     for v in part.values()):
                raise CheckpointError(f"serving file {path}: tensors missing or malformed")
            bad = [k for k, v in part.items()
                   if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:
                raise CheckpointError(f"serving file {path}: non-finite values in {bad[0]}")
        return ServingSnapshot(
            market=market, round=int(obj["round"]), version=str(obj["version"]),
            encoder=enc, heads=heads, model=ModelConfig(**obj["model"]),
            catalog_fingerprint=str(obj["catalog_fingerprint"]),
            config=dict(obj.get("config") or {}), written_at=float(obj.get("written_at", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"serving file {path}: missing or malformed field {exc}") from exc
