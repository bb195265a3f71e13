"""Where the catalog-negative push sits in a federated item table (lab diagnosis; holds every
source market's data, which no product path does).

    python -m storefed.simulations.experiments.join_push --data-dir DATA \
        --encoder runs/join-xmarket-v2-seed0/fed/encoder.pt \
        --rowwise-encoder runs/diag-plainfed-seed0/encoder.pt --join in,jp

For the encoder's item-table update ``U = W - W0`` (W0 rebuilt from the checkpoint's run
config): its leading singular values, and per joining market, its items bucketed by how many
source markets hold them, the mean norm of their update and, against an encoder federated from
the same initial rows with row-wise weights (no push: a market that did not hold an item gives
its row no weight), the cosine between the two updates, before and after ``remove_push`` takes
out ``k`` directions, and the share of its update each row keeps (``remove_push`` counts a row
under ``PUSH_RESIDUAL_MIN`` as untrained). Prints a table; ``--out`` writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storefed.shared.checkpoint import atomic_write_bytes, load_encoder
from storefed.shared.data import DATASETS, ReaderOptions, load_market
from storefed.shared.encoder_map import initial_item_rows, remove_push
from storefed.shared.errors import ConfigError
from storefed.shared.model import ITEM_EMB_KEY
from storefed.simulations.command import run_command


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()) if len(a) else 0.0


def run(args: argparse.Namespace) -> int:
    ck, rw = load_encoder(args.encoder), load_encoder(args.rowwise_encoder)
    if ck.item_ids != rw.item_ids:
        raise ConfigError("the two encoders index different catalogs")
    w0 = initial_item_rows(ck)
    if w0 is None:
        raise ConfigError(f"{args.encoder}: no run config to rebuild the initial rows from")
    n = ck.model.n_items
    update = ck.state[ITEM_EMB_KEY][:n].double() - w0.double()
    row_update = rw.state[ITEM_EMB_KEY][:n].double() - w0.double()
    sv = torch.linalg.svdvals(update)
    removed = remove_push(ck, args.k)
    assert removed is not None
    kept = removed[0].double() - w0.double()
    share = kept.norm(dim=1) / update.norm(dim=1).clamp_min(1e-12)
    options = ReaderOptions.from_run_config(ck.meta.get("config", {}))
    index = {item: i for i, item in enumerate(ck.item_ids)}

    def rows_of(market: str) -> np.ndarray:
        catalog, split = load_market(args.dataset, args.data_dir, market, seed=args.seed,
                                     options=options)
        held = np.unique(np.asarray(split.train_items))
        return np.asarray([index[catalog.item_ids[j]] for j in held
                           if catalog.item_ids[j] in index], dtype=np.int64)

    sources = [m for m in args.sources.split(",") if m]
    holders = np.zeros(n, dtype=np.int64)
    for m in sources:
        holders[rows_of(m)] += 1
    doc: dict[str, Any] = {"singular_values": [round(float(x), 2) for x in sv[:8]],
                           "k": args.k, "markets": {}}
    print(f"singular values of the item update: {doc['singular_values']}")
    print("market  holders  items  |update|  |row-wise|  cos before  cos after  share kept "
          "(10/50/90%)")
    for m in [m for m in args.join.split(",") if m]:
        rows = rows_of(m)
        doc["markets"][m] = []
        for h in range(len(sources) + 1):
            sel = torch.from_numpy(rows[holders[rows] == h])
            if not len(sel):
                continue
            q = np.quantile(share[sel].numpy(), [0.1, 0.5, 0.9]).round(3).tolist()
            line = {"holders": h, "items": len(sel),
                    "update_norm": float(update[sel].norm(dim=1).mean()),
                    "rowwise_norm": float(row_update[sel].norm(dim=1).mean()),
                    "cos_before": _cos(update[sel], row_update[sel]),
                    "cos_after": _cos(kept[sel], row_update[sel]), "share_kept": q}
            doc["markets"][m].append(line)
            print(f"{m:6s}  {h:7d}  {len(sel):5d}  {line['update_norm']:8.3f}  "
                  f"{line['rowwise_norm']:10.3f}  {line['cos_before']:10.2f}  "
                  f"{line['cos_after']:9.2f}  {q}")
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(doc, indent=2).encode())
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storefed.simulations.experiments.join_push",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dataset", choices=DATASETS, default="xmarket")
    p.add_argument("--data-dir", default=os.environ.get("STOREFED_DATA_DIR", ""))
    p.add_argument("--encoder", required=True, help="encoder federated under secure aggregation")
    p.add_argument("--rowwise-encoder", required=True,
                   help="the same federation with plain FedAvg and row-wise item weights")
    p.add_argument("--sources", default="ca,de,fr,mx,uk")
    p.add_argument("--join", default="in,jp")
    p.add_argument("--k", type=int, default=2, help="push directions removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    return run_command("join_push", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
