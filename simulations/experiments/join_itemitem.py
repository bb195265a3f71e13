"""Would the federation's item-item knowledge lift a joining market? Measured on joined models.

A joined market scores ``neural + w * knn_own`` (its private item-kNN, shared/itemsim.py). The
candidates measured here, each with its weights picked on the market's validation split (grid
``GRID``) and the paired difference to the product's score on the evaluation split (per-user
nDCG@10, 95% bootstrap interval over users):

* ``pooled``: the kNN term over the co-occurrence and degree *sums* of the source markets plus
  the market's own, exactly what a SecAgg+ sum of the sources' co-occurrence would hand the
  joining market (its upper bound: no sketching, no noise);
* ``own+emb`` / ``pooled+emb``: a third term, the summed cosine similarity of the encoder's
  item embeddings between the user's history and the candidate (item-item knowledge the joined
  encoder already carries, nothing new travels);
* ``own-a0.65`` / ``pooled-a0.65``: asymmetric cosine ``c_ij / (d_i^0.65 d_j^0.35)`` (``i`` a
  history item) instead of ``sqrt(d_i d_j)``;
* with several runs, their joined models' neural scores averaged (an ensemble), scored on the
  first run's split.

Run after ``join_experiment`` (its ``OUT/<market>`` holds the joined model):
``python -m storefed.simulations.experiments.join_itemitem --dataset xmrec --data-dir XMREC
--sources s1,s2 --join s3 --runs runs/join-xmrec-extra-seed0,... --seeds 0,...`` (each run's
seed, which decides its split's negatives).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from storefed.shared.baselines import fit_itemknn
from storefed.shared.data import MarketSplit, load_market
from storefed.shared.metrics import ndcg_hr_at_k, paired_bootstrap
from storefed.shared.node import neural_scores
from storefed.simulations.recommend import load_state

GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
# the embedding term is rescaled to the neural score's spread on valid, so its weights are
# fractions of the neural score
EMB_GRID: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
CANDIDATES: dict[str, tuple[str, ...]] = {
    "pooled": ("pooled",), "own+emb": ("own", "emb"), "pooled+emb": ("pooled", "emb"),
    "own-a0.65": ("own-a0.65",), "pooled-a0.65": ("pooled-a0.65",)}


def terms(run: Path, market: str, splits: dict[str, MarketSplit], sources: list[str],
          n_items: int) -> dict[str, dict[str, np.ndarray]]:
    """{split: {term: U x C scores}} for the joined model saved under ``run/market``."""
    state = load_state(run / market, market)
    own = fit_itemknn([splits[market]], n_items)
    pooled = fit_itemknn([splits[m] for m in [*sources, market]], n_items)
    emb = torch.nn.functional.normalize(state.model.encoder.item_emb.weight.detach(), dim=1)
    out: dict[str, dict[str, np.ndarray]] = {}
    for which in ("valid", "test"):
        ev = splits[market].eval_set(which)
        h, c = torch.as_tensor(ev.histories), torch.as_tensor(ev.candidates)
        mask = (h != n_items).float()
        out[which] = {
            "neural": neural_scores(state.model, ev.histories, ev.candidates,
                                    torch.device("cpu")).double().numpy(),
            "own": own.scores(ev.histories, ev.candidates),
            "pooled": pooled.scores(ev.histories, ev.candidates),
            "emb": torch.einsum("uld,ucd,ul->uc", emb[h], emb[c], mask).double().numpy(),
            "own-a0.65": own.scores(ev.histories, ev.candidates, alpha=0.65),
            "pooled-a0.65": pooled.scores(ev.histories, ev.candidates, alpha=0.65)}
    scale = out["valid"]["neural"].std() / max(float(out["valid"]["emb"].std()), 1e-12)
    for which in out:
        out[which]["emb"] = out[which]["emb"] * scale
    return out


def fused(scores: dict[str, dict[str, np.ndarray]], names: tuple[str, ...]
          ) -> tuple[tuple[float, ...], float, np.ndarray]:
    """Weights picked on valid (ties: the earlier, smaller grid point), valid nDCG@10 and the
    per-user test nDCG@10 of ``neural + sum(w * term)``."""
    def mix(which: str, ws: tuple[float, ...]) -> np.ndarray:
        return scores[which]["neural"] + sum(
            (w * scores[which][n] for w, n in zip(ws, names, strict=True)),
            np.zeros_like(scores[which]["neural"]))

    best: tuple[float, tuple[float, ...]] = (-1.0, ())
    for ws in itertools.product(*(EMB_GRID if n == "emb" else GRID for n in names)):
        nd = float(ndcg_hr_at_k(torch.as_tensor(mix("valid", ws)), 10)[0].mean())
        if nd > best[0] + 1e-12:
            best = (nd, ws)
    test = ndcg_hr_at_k(torch.as_tensor(mix("test", best[1])), 10)[0].numpy()
    return best[1], best[0], test


def runs_parser(description: str | None) -> argparse.ArgumentParser:
    """The flags of a lab script measured on ``join_experiment`` outputs."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", default="xmrec")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--sources", required=True)
    p.add_argument("--join", required=True)
    p.add_argument("--runs", required=True, help="comma-separated join_experiment outputs")
    p.add_argument("--seeds", required=True, help="each run's seed, in the same order")
    p.add_argument("--out", default="")
    return p


def main(argv: list[str] | None = None) -> None:
    """Print one line per run and candidate; write ``--out`` JSON."""
    p = runs_parser(__doc__.splitlines()[0] if __doc__ else None)
    args = p.parse_args(argv)
    sources = args.sources.split(",")
    doc: dict[str, object] = {}
    runs = [Path(r) for r in args.runs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    if len(seeds) != len(runs):
        p.error(f"--seeds names {len(seeds)} seeds for {len(runs)} --runs")
    for run, seed in zip(runs, seeds, strict=True):
        splits = {m: load_market(args.dataset, args.data_dir, m, seed=seed)[1]
                  for m in [*sources, args.join]}
        n_items = load_market(args.dataset, args.data_dir, args.join, seed=seed)[0].n_items
        scores = terms(run, args.join, splits, sources, n_items)
        ws, valid, base = fused(scores, ("own",))
        row: dict[str, object] = {"own": {"weights": ws, "valid": valid,
                                          "test": float(base.mean())}}
        print(f"{run.name}: own (the product) w={ws} valid {valid:.4f} test {base.mean():.4f}")
        for name, names in CANDIDATES.items():
            ws, valid, test = fused(scores, names)
            diff = paired_bootstrap(test, base)
            row[name] = {"weights": ws, "valid": valid, "test": float(test.mean()),
                         "test_minus_own": diff}
            print(f"  {name:13} w={ws} valid {valid:.4f} test {test.mean():.4f}  "
                  f"test - own {diff['mean']:+.4f} [{diff['ci95_low']:+.4f}, "
                  f"{diff['ci95_high']:+.4f}]")
        doc[run.name] = row
    if len(runs) > 1:
        doc["ensemble"] = ensemble(runs, seeds[0], args)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))


def ensemble(runs: list[Path], seed: int, args: argparse.Namespace) -> dict[str, object]:
    """The runs' joined models averaged (neural scores), plus the own item-kNN term, on the
    first run's split: what training several joined models and averaging them would give."""
    sources = args.sources.split(",")
    splits = {m: load_market(args.dataset, args.data_dir, m, seed=seed)[1]
              for m in [*sources, args.join]}
    n_items = load_market(args.dataset, args.data_dir, args.join, seed=seed)[0].n_items
    per_run = [terms(run, args.join, splits, sources, n_items) for run in runs]
    scores = {w: {"neural": np.mean([t[w]["neural"] for t in per_run], axis=0),
                  "own": per_run[0][w]["own"]} for w in ("valid", "test")}
    single = [fused(t, ("own",))[2] for t in per_run]
    ws, valid, test = fused(scores, ("own",))
    diff = paired_bootstrap(test, single[0])
    print(f"ensemble of {len(runs)} joined models + own kNN w={ws} valid {valid:.4f} test "
          f"{test.mean():.4f} (single models {', '.join(f'{x.mean():.4f}' for x in single)}); "
          f"- the first {diff['mean']:+.4f} [{diff['ci95_low']:+.4f}, {diff['ci95_high']:+.4f}]")
    return {"weights": ws, "valid": valid, "test": float(test.mean()),
            "single": [float(x.mean()) for x in single], "minus_first": diff}


if __name__ == "__main__":
    main()
