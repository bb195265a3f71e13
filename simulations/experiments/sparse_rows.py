"""Lab: how item rows are weighted under secure aggregation, and what each choice costs.

A row of the item table that only one market trained is, in the secure sum, that market's own
delta (and with row-wise weights its own interaction count). Each candidate below runs the
federated round loop in one process (``simulations.experiments.local.run_inprocess``: the
same training,
update format and aggregation as a Flower run, without Flower; SecAgg+ decodes the same sums to
within its fixed-point grid) on every market of the dataset, and reports the average nDCG@10 on
the validation and the test split per seed:

* ``rowwise``           row weights = the market's interaction counts, negatives from its own
                        items (the former default; a single market's row and count are released)
* ``scalar``            one example-count weight per market, own-item negatives (a row only one
                        market trained is still that market's delta exactly)
* ``scalar-catalog``    one weight per market, negatives from the whole public catalog: every
                        market's update moves every item row, so every released row is a sum over
                        all sampled markets (the private default)
* ``rowwise-catalog``   row-wise weights with catalog negatives (rows are sums, weights are not)
* ``k3-catalog``        scalar-catalog, but a row is released only when at least 3 markets had
                        interactions with the item (the rest keep their global value)
* ``uniform-catalog``   scalar-catalog with weight 1 per market (as under DP)

``python -m storefed.simulations.experiments.sparse_rows --dataset xmarket --data-dir DIR --seeds 3
--out OUT``
writes ``OUT/sparse_rows.json`` and prints one line per candidate.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import storefed.shared.node as node_module
import storefed.simulations.experiments.local as local
from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig
from storefed.shared.data import available_markets
from storefed.shared.wire import ROWWISE_KEY, WEIGHT_PREFIX, sum_updates

CANDIDATES: dict[str, dict[str, Any]] = {
    "rowwise": {"aggregation": "rowwise", "negative_pool": "market"},
    "scalar": {"aggregation": "fedavg", "negative_pool": "market"},
    "scalar-catalog": {"aggregation": "fedavg", "negative_pool": "catalog"},
    "rowwise-catalog": {"aggregation": "rowwise", "negative_pool": "catalog"},
    "k3-catalog": {"aggregation": "fedavg", "negative_pool": "catalog", "_k": 3},
    "uniform-catalog": {"aggregation": "fedavg", "negative_pool": "catalog", "_uniform": True},
}


def _k_threshold_sum(k: int, counts: list[np.ndarray]) -> Callable[..., dict[str, np.ndarray]]:
    """``sum_updates`` that zeroes (numerator and weight) every item row fewer than ``k``
    markets had interactions with: those rows keep their global value."""
    held = (np.stack([c > 0 for c in counts]).sum(0) >= k)

    def summed(updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = sum_updates(updates)
        out[ROWWISE_KEY] = out[ROWWISE_KEY] * held[:, None]
        w = out[WEIGHT_PREFIX + ROWWISE_KEY]
        if w.size > 1:
            out[WEIGHT_PREFIX + ROWWISE_KEY] = w * held
        return out

    return summed


def run_candidate(name: str, base: RunConfig) -> dict[str, Any]:
    """One candidate, one seed: average and per-market nDCG@10 on valid and test."""
    spec = dict(CANDIDATES[name])
    k, uniform = spec.pop("_k", None), spec.pop("_uniform", False)
    cfg = base.replace(secagg=False, **spec)
    real_sum, real_update, real_doc = local.sum_updates, node_module.make_update, local._doc
    try:
        if k is not None:
            nodes = local.make_nodes(cfg)
            counts = [node_module.item_counts(n.split, n.catalog.n_items) for n in nodes]
            setattr(local, "sum_updates", _k_threshold_sum(int(k), counts))  # noqa: B010
            held = int((np.stack([c > 0 for c in counts]).sum(0) >= k).sum())
        if uniform:
            setattr(node_module, "make_update",  # noqa: B010
                    lambda loc, glob, n, counts: real_update(loc, glob, 1, counts))
        docs: dict[str, dict[str, Any]] = {}

        def both_splits(nodes: list[Any], *args: Any) -> dict[str, Any]:
            # the same trained models evaluated on valid and on test
            seconds, rounds, sent, examples, train_s = args[:5]
            for which in ("valid", "test"):
                docs[which] = real_doc(nodes, seconds, rounds, sent, examples, train_s, which)
            return docs["test"]

        setattr(local, "_doc", both_splits)  # noqa: B010
        t0 = time.perf_counter()
        local.run_inprocess(cfg, evaluate_every_round=False)
        seconds = (time.perf_counter() - t0) / cfg.num_rounds
        out: dict[str, Any] = {
            which: {"ndcg@10": doc["average"]["ndcg@10"],
                    "markets": {m: v["ndcg@10"] for m, v in doc["markets"].items()}}
            for which, doc in docs.items()}
        out["seconds_per_round"] = seconds
        out["bytes_per_client_round"] = docs["test"]["bytes_per_client_round"]
        if k is not None:
            out["rows_released"] = held
        return out
    finally:
        setattr(local, "sum_updates", real_sum)  # noqa: B010
        setattr(node_module, "make_update", real_update)  # noqa: B010
        setattr(local, "_doc", real_doc)  # noqa: B010


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="xmarket")
    p.add_argument("--data-dir", default="")
    p.add_argument("--markets", default="")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--out", default="runs/sparse-rows")
    args = p.parse_args(argv)
    markets = args.markets or ",".join(available_markets(args.dataset, args.data_dir or None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in [c.strip() for c in args.candidates.split(",") if c.strip()]:
        runs = []
        for seed in range(args.seeds):
            base = RunConfig(dataset=args.dataset, data_dir=args.data_dir, markets=markets,
                             seed=seed)
            runs.append(run_candidate(name, base))
            print(name, seed, f"valid {runs[-1]['valid']['ndcg@10']:.4f} "
                  f"test {runs[-1]['test']['ndcg@10']:.4f}", flush=True)
        results[name] = {
            "runs": runs,
            "valid": float(np.mean([r["valid"]["ndcg@10"] for r in runs])),
            "test": float(np.mean([r["test"]["ndcg@10"] for r in runs])),
        }
        atomic_write_bytes(out / "sparse_rows.json", json.dumps(results, indent=1).encode())
        print(f"{name:<16} valid {results[name]['valid']:.4f}  test {results[name]['test']:.4f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
