"""How a global encoder checkpoint becomes a joining market's encoder.

Decision record:

* ``map_encoder``: a global encoder checkpoint is indexed by *its* catalog; the new market's
  model is indexed by the market's catalog. Rows are matched by item id. Items the market has
  that the checkpoint's catalog lacks, and rows the federation never trained (no source market
  held the item, so the row is still the deterministic random init, recognised by rebuilding the
  initial encoder from the checkpoint's own run config: ``initial_item_rows``), get a fresh row:
  the mean of the trained rows of the item's category (global mean when the category has none).
  A fresh item then scores neutrally and the market's popularity bias ranks it, instead of a
  random direction.
* ``remove_push``: under secure aggregation every market sends one weight for the whole item
  table and draws its negatives from the whole catalog (docs/privacy.md), so every market
  pushes every item its users did not pick away from them. Those pushes share a few directions
  (its users' mean vectors) and add up over markets: a row that few or no source markets sold
  moved mostly along them, and a joining market would inherit that instead of what the selling
  market learned. The push is estimated from the checkpoint alone: the top right singular
  vectors of the federation's update to the item table (rows minus the rebuilt initial rows).
  ``map_encoder(push_dims=k)`` removes ``k`` of them from every row's update; a row left with
  little of its update moved only along the push and counts as untrained (fresh row). How many
  directions is picked on the market's validation split (shared/transfer.py,
  ``zero_shot_model``; 0 among them). Measured on XMarket (ca,de,fr,mx,uk): the update's
  singular values fall 98.6, 52.3, then 14.2, 11.6; rows of items few sources held point along
  the push (cosine 0.22-0.35 with a row-wise encoder's update; 0.50-0.60 with the push out)
  (simulations/experiments/RESULTS.md, "Joining").

What travels, what stays: nothing travels. The mapping reads the released encoder and the
market's own catalog; nothing about any source market is needed or learned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from storefed.shared.checkpoint import EncoderCheckpoint, load_encoder
from storefed.shared.config import RunConfig
from storefed.shared.data import Catalog
from storefed.shared.errors import CheckpointError, ConfigError
from storefed.shared.model import ITEM_EMB_KEY, MarketModel, ModelConfig, load_parts
from storefed.shared.node import build_model, model_config

FRESH_INITS = ("category-mean", "random")
# directions of the catalog-negative push ``remove_push`` may take out of the federated item
# rows, picked on the joining market's validation split (0 = the rows as federated): 2-4 picked
# on XMarket `in`/`jp` and 2 on XMRec `s3`, zero-shot valid nDCG@10 higher in every run
PUSH_DIMS_GRID: tuple[int, ...] = (0, 1, 2, 3, 4)
# a row keeping less than this share of its update's norm once the push is out moved (almost)
# only along it: on XMarket the federation's rows of items no source market held kept
# 0.14-0.22, rows of items one market held 0.22-0.37
PUSH_RESIDUAL_MIN = 0.22


@dataclass(frozen=True)
class EncoderMapping:
    """How the checkpoint's item rows were mapped onto the market's catalog."""

    copied: int  # rows taken over from the checkpoint (trained by the federation)
    missing: int  # market-catalog items absent from the checkpoint's catalog (fresh rows)
    untrained: int  # items present in the checkpoint but never trained (fresh rows)
    known: np.ndarray = field(repr=False)  # (n_items,) bool: row came trained from the checkpoint
    same_catalog: bool = False  # checkpoint catalog == market catalog (node can federate)
    push_dims: int = 0  # directions of the catalog-negative push removed (``remove_push``)

    def summary(self) -> dict[str, int | bool]:
        return {"copied": self.copied, "missing": self.missing, "untrained": self.untrained,
                "same_catalog": self.same_catalog, "push_dims": self.push_dims}


def checkpoint_catalog(ck: EncoderCheckpoint) -> Catalog:
    """The catalog an encoder checkpoint indexes."""
    return Catalog(item_ids=tuple(ck.item_ids),
                   item_category=np.asarray(ck.item_category, dtype=np.int64),
                   categories=tuple(ck.categories))


def initial_item_rows(ck: EncoderCheckpoint) -> torch.Tensor | None:
    """(n_items, D) the federation's deterministic initial item rows, rebuilt from the
    checkpoint's own run config; None when the checkpoint lacks one (or it builds another
    shape)."""
    cfg_map = ck.meta.get("config")
    if not isinstance(cfg_map, dict):
        return None
    try:
        cfg = RunConfig.from_mapping(cfg_map, source="checkpoint meta")
    except ConfigError:
        return None
    catalog = checkpoint_catalog(ck)
    if model_config(cfg, catalog) != ck.model:
        return None
    init = build_model(cfg, catalog)  # the server's round-0 encoder (seeded)
    return init.encoder.item_emb.weight.detach()[:ck.model.n_items]


def untrained_rows(ck: EncoderCheckpoint) -> np.ndarray:
    """(n_items,) bool: item rows still equal to the federation's deterministic initial encoder
    (no source market held the item). All False when the checkpoint lacks its run config."""
    return _unchanged_rows(ck, initial_item_rows(ck))


def _unchanged_rows(ck: EncoderCheckpoint, w0: torch.Tensor | None) -> np.ndarray:
    if w0 is None:
        return np.zeros(ck.model.n_items, dtype=bool)
    w = ck.state[ITEM_EMB_KEY].detach()[:ck.model.n_items]
    return torch.all(w == w0, dim=1).numpy()


def remove_push(ck: EncoderCheckpoint, dims: int,
                ) -> tuple[torch.Tensor, np.ndarray] | None:
    """The checkpoint's item rows with the catalog-negative push taken out (module doc).

    ``U = W - W0`` (n_items x D) is what the federation moved each row by. Its top ``dims``
    right singular vectors ``V`` (dims x D) are removed from every row's update:
    ``W' = W0 + U - U V^T V``. A row that kept less than ``PUSH_RESIDUAL_MIN`` of its update's
    norm moved (almost) only along the push: it is reported in the returned (n_items,) bool
    mask, to be treated as untrained. None when the initial rows cannot be rebuilt (no run
    config in the checkpoint): the rows are then used as federated."""
    return _without_push(ck, dims, initial_item_rows(ck))


def _without_push(ck: EncoderCheckpoint, dims: int, w0: torch.Tensor | None,
                  ) -> tuple[torch.Tensor, np.ndarray] | None:
    if w0 is None:
        return None
    n = ck.model.n_items
    w = ck.state[ITEM_EMB_KEY].detach()[:n].double()
    update = w - w0.double()
    norms = update.norm(dim=1)
    if dims == 0 or not bool((norms > 0).any()):
        return w.float(), np.zeros(n, dtype=bool)
    _, _, vh = torch.linalg.svd(update, full_matrices=False)
    v = vh[:dims]  # dims x D
    kept = update - (update @ v.T) @ v
    share = kept.norm(dim=1) / norms.clamp_min(1e-12)
    pushed_only = (norms > 0) & (share < PUSH_RESIDUAL_MIN)
    return (w0.double() + kept).float(), pushed_only.numpy()


def map_encoder(ck: EncoderCheckpoint, catalog: Catalog, fresh_init: str = "category-mean",
                path: str | Path = "checkpoint", push_dims: int = 0,
                ) -> tuple[dict[str, torch.Tensor], ModelConfig, EncoderMapping]:
    """Encoder state for a model over ``catalog`` from checkpoint ``ck`` (see module doc), with
    ``push_dims`` directions of the catalog-negative push removed (``remove_push``; 0 = the rows
    as federated). Raises CheckpointError when the checkpoint shares no item with the
    catalog."""
    src_index = {item: i for i, item in enumerate(ck.item_ids)}
    src_rows = np.asarray([src_index.get(item, -1) for item in catalog.item_ids], dtype=np.int64)
    present = src_rows >= 0
    if not present.any():
        raise CheckpointError(f"encoder checkpoint {path} shares no item with the market's "
                              f"catalog ({catalog.n_items} items): saved for another dataset?")
    w_src = ck.state[ITEM_EMB_KEY].detach().float()
    w0 = initial_item_rows(ck)  # rebuilt once for both uses
    untrained_src = _unchanged_rows(ck, w0)
    pushed = _without_push(ck, push_dims, w0) if push_dims else None
    if pushed is not None:
        w_src = w_src.clone()
        w_src[:ck.model.n_items] = pushed[0]
        untrained_src = untrained_src | pushed[1]
    known = present.copy()
    known[present] = ~untrained_src[src_rows[present]]
    mcfg = dataclasses.replace(ck.model, n_items=catalog.n_items,
                               n_categories=len(catalog.categories))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(catalog.n_items + 1, mcfg.dim, generator=gen) * 0.1
    w[torch.from_numpy(np.flatnonzero(present))] = w_src[torch.from_numpy(src_rows[present])]
    w[catalog.n_items] = 0.0  # padding row
    if fresh_init == "category-mean":
        fresh = np.flatnonzero(~known)
        if len(fresh):
            known_idx = np.flatnonzero(known)
            overall = w[torch.from_numpy(known_idx)].mean(dim=0) if len(known_idx) else \
                torch.zeros(mcfg.dim)
            cats = np.asarray(catalog.item_category, dtype=np.int64)
            for c in np.unique(cats[fresh]).tolist():
                members = known_idx[cats[known_idx] == c]
                mean = w[torch.from_numpy(members)].mean(dim=0) if len(members) else overall
                w[torch.from_numpy(fresh[cats[fresh] == c])] = mean
    state = {k: v.detach().clone() for k, v in ck.state.items()}
    state[ITEM_EMB_KEY] = w
    same = (catalog.n_items == ck.model.n_items
            and catalog.fingerprint() == ck.catalog_fingerprint)
    mapping = EncoderMapping(copied=int(known.sum()), missing=int((~present).sum()),
                             untrained=int((present & ~known).sum()), known=known,
                             same_catalog=same, push_dims=push_dims if pushed else 0)
    return state, mcfg, mapping


def load_join_checkpoint(path: str | Path) -> EncoderCheckpoint:
    """Load + validate a global encoder checkpoint for a join; every failure is a
    CheckpointError naming the file."""
    ck = load_encoder(path)
    probe = MarketModel(ck.model, torch.zeros(ck.model.n_items, dtype=torch.long))
    try:
        load_parts(probe, encoder=ck.state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"encoder checkpoint {path} does not match its own model shape "
                              f"{ck.model}: {exc}") from exc
    if len(ck.item_category) != ck.model.n_items or any(
            not 0 <= c < len(ck.categories) for c in ck.item_category):
        raise CheckpointError(f"encoder checkpoint {path}: item categories do not match its "
                              f"{len(ck.categories)} categories / {ck.model.n_items} items")
    return ck


def load_join_encoder(path: str | Path, catalog: Catalog, fresh_init: str = "category-mean",
                      push_dims: int = 0,
                      ) -> tuple[dict[str, torch.Tensor], ModelConfig, EncoderMapping,
                                 EncoderCheckpoint]:
    """Load + validate a checkpoint and map it onto ``catalog``; every failure is a
    CheckpointError naming the file."""
    ck = load_join_checkpoint(path)
    state, mcfg, mapping = map_encoder(ck, catalog, fresh_init, path, push_dims)
    return state, mcfg, mapping, ck
