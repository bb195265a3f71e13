"""``storefed recommend``: top-k items for a user from a market's saved state.

``--state DIR`` is a run or join output directory: ``DIR/encoder.pt`` (the encoder with its
catalog and run config) and ``DIR/state/<market>/private.pt`` (the market's heads). A known user
is looked up in the market's data (dataset/data-dir from the checkpoint's run config unless
given); a cold user is scored from ``--history`` alone. When the market's data is at hand and
its heads carry an item-kNN weight, the private item-kNN term is added as in the node's
evaluation; when ``DIR/state/<market>/ranker.json`` holds the market's private ranker
(``storefed join`` fits one, shared/ranker.py) and it was fitted to this very model, it ranks
instead. Items the user already has are never recommended; candidates are the market's items
(or the whole catalog with ``--all-items``).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storefed.shared.checkpoint import load_encoder, load_private
from storefed.shared.data import (
    DATASETS,
    Catalog,
    MarketSplit,
    ReaderOptions,
    load_market,
    pad_histories,
)
from storefed.shared.encoder_map import checkpoint_catalog
from storefed.shared.errors import CheckpointError, DataError
from storefed.shared.model import MarketModel, load_parts
from storefed.shared.node import attach_knn
from storefed.shared.ranker import RANKER_FILE, MarketStats, Ranker, load_ranker, version_of

log = logging.getLogger("storefed")


@dataclass
class MarketState:
    model: MarketModel
    catalog: Catalog
    config: dict[str, Any]
    # the market's private ranker and the statistics of its own rows it reads (``use_ranker``)
    ranker: tuple[Ranker, MarketStats] | None = None


def load_state(state_dir: str | Path, market: str) -> MarketState:
    """The market's model (encoder + its heads) from a run/join output directory."""
    d = Path(state_dir)
    enc_path, priv_path = d / "encoder.pt", d / "state" / market / "private.pt"
    ck = load_encoder(enc_path)
    catalog = checkpoint_catalog(ck)
    if catalog.fingerprint() != ck.catalog_fingerprint:
        raise CheckpointError(f"encoder checkpoint {enc_path}: stored catalog does not match "
                              "its fingerprint")
    heads, _ = load_private(priv_path, market, ck.catalog_fingerprint)
    model = MarketModel(ck.model, torch.as_tensor(catalog.item_category))
    try:
        load_parts(model, encoder=ck.state, private=heads)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{priv_path} does not fit {enc_path}: {exc}") from exc
    model.eval()
    cfg = ck.meta.get("config")
    return MarketState(model=model, catalog=catalog, config=dict(cfg) if isinstance(
        cfg, dict) else {})


def use_knn(state: MarketState, split: MarketSplit) -> bool:
    """Score as the market's node does: when its saved heads carry a nonzero item-kNN weight
    (the node ran with item-knn on), attach the private item-kNN rebuilt from the market's own
    training data (never saved, see shared/itemsim.py). Returns whether it was attached."""
    if float(state.model.heads.knn_weight.abs().max()) == 0.0:
        return False
    attach_knn(state.model, split, state.catalog.n_items)
    return True


def use_ranker(state: MarketState, state_dir: str | Path, market: str,
               split: MarketSplit) -> bool:
    """Rank with the market's private ranker when ``state_dir`` holds one fitted to this model
    (its statistics rebuilt from the market's own training rows); a ranker fitted to another
    model is left out, with a warning. Returns whether it is used."""
    path = Path(state_dir) / "state" / market / RANKER_FILE
    if not path.is_file():
        return False
    ranker = load_ranker(path, market)
    if ranker.model_version != version_of(state.model):
        log.warning("%s was fitted to model version %s, not this model's %s: ranking without "
                    "it", path, ranker.model_version, version_of(state.model))
        return False
    state.ranker = (ranker, MarketStats.from_split(split, state.catalog.n_items))
    return True


def user_items(split: MarketSplit, user: str) -> np.ndarray:
    """All known items of ``user`` in chronological order (train, then valid, then test)."""
    try:
        u = split.user_ids.index(user)
    except ValueError:
        examples = ", ".join(split.user_ids[:3])
        raise DataError(f"market {split.market}: unknown user {user!r}; known users look like "
                        f"{examples} (`storefed recommend ... --list-users` lists them; pass "
                        "--history for a cold user)") from None
    items = list(split.train_items[split.train_users == u].tolist())
    rows = np.flatnonzero(split.test.users == u)
    if len(rows):
        r = int(rows[0])
        items += [int(split.valid.candidates[r, 0]), int(split.test.candidates[r, 0])]
    return np.asarray(items, dtype=np.int64)


def parse_history(catalog: Catalog, history: str) -> np.ndarray:
    """Comma-separated raw item ids -> catalog indices (DataError naming an unknown id)."""
    index = catalog.index_of()
    out = []
    for raw in (h.strip() for h in history.split(",")):
        if not raw:
            continue
        if raw not in index:
            raise DataError(f"--history: item {raw!r} is not in the catalog")
        out.append(index[raw])
    return np.asarray(out, dtype=np.int64)


@torch.no_grad()
def recommend(state: MarketState, history: np.ndarray, candidates: np.ndarray, k: int,
              max_history: int = 50) -> list[tuple[str, float]]:
    """Top-k (item id, score) among ``candidates`` minus ``history``."""
    pool = np.setdiff1d(np.asarray(candidates, dtype=np.int64), history)
    if len(pool) == 0:
        return []
    hist = pad_histories([history], max_history, state.catalog.pad_index)
    if state.ranker is not None:
        ranker, stats = state.ranker
        scores = ranker.rank(state.model, stats, hist, pool[None, :], torch.device("cpu"))[0]
    else:
        scores = state.model(torch.as_tensor(hist), torch.as_tensor(pool).unsqueeze(0))[0]
    top = torch.topk(scores, min(k, len(pool)))
    return [(state.catalog.item_ids[int(pool[i])], float(s))
            for s, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("recommend", help="top-k items for a user from a market's saved state",
                       description="Top-k item ids for a known user (--user) or a cold user "
                                   "(--history), excluding items the user already has.")
    p.add_argument("--run-dir", dest="state", default=None,
                   help="the --out directory of `storefed simulate` or `storefed join` "
                        "(encoder.pt + state/<market>/private.pt)")
    p.add_argument("--state", dest="state", help=argparse.SUPPRESS)  # former name
    p.add_argument("--market", required=True)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id of the market")
    who.add_argument("--history", help="comma-separated item ids of a cold user")
    who.add_argument("--list-users", action="store_true",
                     help="print the market's user ids, one a line, and exit")
    p.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: from the checkpoint's run config")
    p.add_argument("--data-dir", default=None, help="default: from the checkpoint's run config")
    p.add_argument("--all-items", action="store_true",
                   help="rank the whole catalog instead of the market's items")
    p.add_argument("--json", action="store_true", help="print JSON")
    return "recommend", run


def run(args: argparse.Namespace) -> int:
    if not args.state:
        raise DataError("--run-dir is required (the --out directory of `storefed simulate` or "
                        "`storefed join`)")
    if args.k < 1:
        raise DataError(f"-k must be >= 1, got {args.k}")
    state = load_state(args.state, args.market)
    cfg = state.config
    max_history = int(cfg.get("max-history", 50))
    split = None
    if args.user is not None or args.list_users or not args.all_items:
        dataset = args.dataset or str(cfg.get("dataset", ""))
        data_dir = args.data_dir if args.data_dir is not None else str(cfg.get("data-dir", ""))
        if dataset not in DATASETS:
            raise DataError(f"{args.state}: no dataset in the checkpoint's config; pass "
                            "--dataset/--data-dir (or --all-items for a cold user)")
        catalog, split = load_market(dataset, data_dir or None, args.market,
                                     seed=int(cfg.get("seed", 0)), max_history=max_history,
                                     options=ReaderOptions.from_run_config(cfg))
        if catalog.fingerprint() != state.catalog.fingerprint():
            raise CheckpointError(f"{args.state}/encoder.pt was saved for another catalog "
                                  f"than {dataset} {data_dir}")
        use_knn(state, split)
        use_ranker(state, args.state, args.market, split)
    if args.list_users:
        assert split is not None
        print("\n".join(split.user_ids))
        return 0
    if args.user is not None:
        assert split is not None
        history = user_items(split, args.user)
    else:
        history = parse_history(state.catalog, args.history)
    candidates = (np.arange(state.catalog.n_items) if args.all_items or split is None
                  else split.items)
    top = recommend(state, history, candidates, args.k, max_history)
    if args.json:
        print(json.dumps({"market": args.market, "user": args.user,
                          "items": [{"item": i, "score": s} for i, s in top]}))
    else:
        for rank, (item, score) in enumerate(top, 1):
            print(f"{rank:>3}  {item}  {score:.4f}")
    return 0
