"""Does the private ranker miss the federated rows' norms once the push is out? (lab probe)

    python -m storefed.simulations.experiments.join_ranker_norm --data-dir DATA --market jp \
        --runs runs/join-xmarket-v7-seed0,runs/join-xmarket-v7-seed1 --seeds 0,1

The ranker's ``emb_norm`` feature is the candidate's row norm in the joined model. Before the
join took the catalog-negative push out of the rows (shared/encoder_map.py, ``remove_push``), that
norm followed the source markets' popularity; after, much less. Per joined run, the ranker is
fitted as the product fits it (5-fold CV on the valid split) twice: with the model's norms, and
with the norms of the federated rows as the checkpoint released them (mapped, nothing
removed). Prints each fit's cross-validated valid nDCG@10 and its test nDCG@10.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from storefed.shared.data import DATASETS, load_market
from storefed.shared.encoder_map import load_join_checkpoint, map_encoder
from storefed.shared.metrics import ndcg_hr_at_k
from storefed.shared.model import ITEM_EMB_KEY
from storefed.shared.ranker import FEATURES, MarketStats, features, train_booster
from storefed.simulations.command import run_command
from storefed.simulations.recommend import load_state, use_knn


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    cpu = torch.device("cpu")
    col = FEATURES.index("emb_norm")
    runs = [r for r in args.runs.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out: dict[str, list[float]] = {"model": [], "federated": []}
    for run_dir, seed in zip(runs, seeds, strict=True):
        encoder = json.loads(Path(run_dir, "summary.json").read_text())["encoders"]["plain"]
        state = load_state(f"{run_dir}/{args.market}", args.market)
        catalog, split = load_market(args.dataset, args.data_dir, args.market, seed=seed)
        use_knn(state, split)
        stats = MarketStats.from_split(split, catalog.n_items)
        fed = map_encoder(load_join_checkpoint(encoder), catalog)[0][ITEM_EMB_KEY]
        fed_norm = fed.norm(dim=1).numpy()
        line = []
        xv_model = features(state.model, stats, split.valid.histories, split.valid.candidates,
                            cpu)
        xt_model = features(state.model, stats, split.test.histories, split.test.candidates, cpu)
        for name in ("model", "federated"):
            xv, xt = xv_model.copy(), xt_model.copy()  # the same features, one column swapped
            if name == "federated":
                xv[:, :, col] = fed_norm[split.valid.candidates]
                xt[:, :, col] = fed_norm[split.test.candidates]
            boosters, rounds, cv = train_booster(xv, seed=seed)
            flat = xt.reshape(-1, xt.shape[2])
            scores = np.mean([np.asarray(b.predict(flat, num_iteration=r))
                              for b, r in zip(boosters, rounds, strict=True)], axis=0)
            test = float(ndcg_hr_at_k(torch.from_numpy(scores.reshape(xt.shape[:2])),
                                      10)[0].mean())
            out[name].append(test)
            line.append(f"{name}: cv valid {cv:.4f} test {test:.4f}")
        print(f"{run_dir} ({args.market}): " + "; ".join(line), flush=True)
    print(f"mean test: model {np.mean(out['model']):.4f}, federated norms "
          f"{np.mean(out['federated']):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storefed.simulations.experiments.join_ranker_norm",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dataset", choices=DATASETS, default="xmarket")
    p.add_argument("--data-dir", default=os.environ.get("STOREFED_DATA_DIR", ""))
    p.add_argument("--market", required=True)
    p.add_argument("--runs", required=True, help="comma list of join_experiment outputs")
    p.add_argument("--seeds", required=True, help="their seeds, same order")
    p.add_argument("--threads", type=int, default=1)
    return run_command("join_ranker_norm", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
