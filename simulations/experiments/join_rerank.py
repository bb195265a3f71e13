"""Would a learned ranker lift a joining market, and would federated item-item sums add to it?

Measured on joined models (``join_experiment`` outputs, ``OUT/<market>`` holds the model): the
product's linear mix ``neural + w * knn`` (``w`` picked on valid) against the market's private
ranker (shared/ranker.py: LambdaMART over ``FEATURES``, trained on the market's own validation
split) and against the same ranker with two more features a SecAgg+ sum over the source
markets could deliver (never one source's data): ``fed_knn``, the cosine item-kNN over the
sources' co-occurrence and degree sums plus the market's own, and ``fed_ease``, EASE (lambda
500) over the summed Gram matrices ``sum_m X_m^T X_m``. Each candidate is scored on the
evaluation split (s3: the official ``valid_run``) with its paired difference to the linear mix
(per-user nDCG@10, 95% bootstrap interval over users).

``python -m storefed.simulations.experiments.join_rerank --data-dir XMREC --sources s1,s2
--join s3 --runs runs/join-xmrec-v2-seed0,... --seeds 0,...`` (each run's seed decides its
split's negatives).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from storefed.shared.baselines import fit_ease, fit_itemknn
from storefed.shared.data import MarketSplit, load_market
from storefed.shared.metrics import ndcg_hr_at_k, paired_bootstrap
from storefed.shared.ranker import FEATURES, MarketStats, Ranker, features, train_booster
from storefed.simulations.experiments.join_itemitem import GRID, runs_parser
from storefed.simulations.recommend import load_state

FED: tuple[str, ...] = ("fed_knn", "fed_ease")


def all_features(run: Path, market: str, splits: dict[str, MarketSplit], sources: list[str],
                 n_items: int) -> dict[str, np.ndarray]:
    """``{split: U x C x (FEATURES + FED)}`` for the joined model saved under ``run/market``."""
    state = load_state(run / market, market)
    stats = MarketStats.from_split(splits[market], n_items)
    fed = fit_itemknn([splits[m] for m in [*sources, market]], n_items)
    fed_ease = fit_ease(fed, 500.0)
    out = {}
    for which in ("valid", "test"):
        ev = splits[market].eval_set(which)
        h, c = ev.histories, ev.candidates
        own = features(state.model, stats, h, c, torch.device("cpu"))
        extra = np.stack([fed.scores(h, c), fed_ease.scores(h, c)], axis=2).astype(np.float32)
        out[which] = np.concatenate([own, extra], axis=2)
    return out


def linear(x: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """The product's mix ``neural + w * knn``, ``w`` picked on valid: w, per-user test nDCG@10."""
    ni, ki = FEATURES.index("neural"), FEATURES.index("knn")

    def nd(which: str, w: float) -> np.ndarray:
        s = x[which][:, :, ni].astype(np.float64) + w * x[which][:, :, ki]
        return ndcg_hr_at_k(torch.as_tensor(s), 10)[0].numpy()

    best = max(GRID, key=lambda w: (float(nd("valid", w).mean()), -w))
    return best, nd("test", best)


def main(argv: list[str] | None = None) -> None:
    """Print one block per run; write ``--out`` JSON."""
    p = runs_parser(__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--params", default="{}",
                   help="LightGBM parameters over shared.ranker.PARAMS, as JSON")
    args = p.parse_args(argv)
    params = json.loads(args.params)
    sources = args.sources.split(",")
    runs = [Path(r) for r in args.runs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    if len(seeds) != len(runs):
        p.error(f"--seeds names {len(seeds)} seeds for {len(runs)} --runs")
    names = (*FEATURES, *FED)
    sets = {"private": FEATURES, "private+fed": names}
    doc: dict[str, object] = {}
    for run, seed in zip(runs, seeds, strict=True):
        splits = {m: load_market(args.dataset, args.data_dir, m, seed=seed)[1]
                  for m in [*sources, args.join]}
        n_items = load_market(args.dataset, args.data_dir, args.join, seed=seed)[0].n_items
        x = all_features(run, args.join, splits, sources, n_items)
        w, base = linear(x)
        print(f"{run.name}: linear mix w={w} test {base.mean():.4f}")
        row: dict[str, object] = {"linear": {"w": w, "test": float(base.mean())}}
        for set_name, feats in sets.items():
            idx = [names.index(f) for f in feats]
            boosters, folds, cv = train_booster(x["valid"][:, :, idx], seed, names=feats,
                                                params=params)
            ranker = Ranker(boosters=boosters, model_version="", fold_rounds=folds,
                            cv_valid_ndcg=cv)
            s = ranker.scores(x["test"][:, :, idx])
            test = ndcg_hr_at_k(torch.as_tensor(s), 10)[0].numpy()
            diff = paired_bootstrap(test, base)
            gain = sum(b.feature_importance("gain", iteration=r)
                       for b, r in zip(boosters, folds, strict=True))
            share = {f: float(g / gain.sum()) for f, g in zip(feats, gain, strict=True)}
            top = sorted(share.items(), key=lambda kv: -kv[1])[:5]
            print(f"  {set_name:12} fold rounds {list(folds)} cv-valid {cv:.4f} "
                  f"test {test.mean():.4f}  - linear {diff['mean']:+.4f} "
                  f"[{diff['ci95_low']:+.4f}, {diff['ci95_high']:+.4f}]  top: "
                  + ", ".join(f"{n} {g:.2f}" for n, g in top))
            row[set_name] = {"fold_rounds": list(folds), "cv_valid": cv,
                             "test": float(test.mean()), "test_minus_linear": diff,
                             "importance": share}
        doc[run.name] = row
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
