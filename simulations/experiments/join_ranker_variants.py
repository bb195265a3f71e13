"""Which changes to the market's private ranker win on its validation split?

On joined models (``join_experiment`` outputs), every variant is judged by nested
cross-validation on the market's validation users only: an outer 5-fold split over the
validation users; on each outer training part the ranker is fitted as the product fits it
(5-fold CV for the rounds) and scores the outer held-out users. The test split (s3: the
official ``valid_run``) is printed beside it and never chooses.

Variants: ``refit`` (the product: one booster refit on every user with the folds' mean round),
``bag`` (the mean of the five fold boosters' scores, each at its own early-stopped round, no
refit); feature sets: the product's ``FEATURES``, plus RP3beta (``rp3b``: random-walk item-item
with popularity penalty beta 0.5, on the market's own rows), plus a user-kNN score (``uknn``:
cosine over users' item sets, the market's own rows), plus the sources' summed popularity
(``fed_pop``: what a SecAgg+ sum of item counts could deliver; a lab probe, not built), plus
the norm of the candidate's embedding in the joined model (``emb_norm``, now one of the
product's ``FEATURES``; ``base`` is the set without it).

``python -m storefed.simulations.experiments.join_ranker_variants --data-dir XMREC --sources
s1,s2 --join s3 --runs runs/join-xmrec-v3-seed0,... --seeds 0,...``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from storefed.shared.baselines import market_counts
from storefed.shared.data import MarketSplit, load_market
from storefed.shared.metrics import ndcg_hr_at_k
from storefed.shared.ranker import (
    FEATURES,
    PARAMS,
    MarketStats,
    Ranker,
    features,
    ranking_dataset,
    train_booster,
)
from storefed.simulations.experiments.join_itemitem import runs_parser
from storefed.simulations.recommend import load_state

EXTRA: tuple[str, ...] = ("rp3b", "uknn", "fed_pop")


def _matrix(split: MarketSplit, n_rows: int) -> sp.csr_matrix:
    """users x items binary matrix of the market's training rows."""
    x = sp.csr_matrix((np.ones(len(split.train_users)), (split.train_users, split.train_items)),
                      shape=(split.n_users, n_rows))
    x.data[:] = 1.0
    return x


def _history_matrix(h: np.ndarray, n_rows: int) -> sp.csr_matrix:
    pad = n_rows - 1
    u, col = np.nonzero(h != pad)
    m = sp.csr_matrix((np.ones(len(u)), (u, h[u, col])), shape=(len(h), n_rows))
    m.data[:] = 1.0
    return m


def extra_features(split: MarketSplit, sources: list[MarketSplit], n_items: int,
                   h: np.ndarray, c: np.ndarray) -> np.ndarray:
    """U x C x len(EXTRA)."""
    n_rows = n_items + 1
    x = _matrix(split, n_rows)
    held = np.flatnonzero(np.asarray(x.sum(axis=0)).ravel() > 0)
    xh = x[:, held].tocsc()
    deg_u = np.maximum(np.asarray(xh.sum(axis=1)).ravel(), 1)
    deg_i = np.maximum(np.asarray(xh.sum(axis=0)).ravel(), 1)
    p_ui = sp.diags(1.0 / deg_u) @ xh
    p_iu = sp.diags(1.0 / deg_i) @ xh.T
    w = np.asarray((p_iu @ p_ui).todense()) * (deg_i[None, :] ** -0.5)
    np.fill_diagonal(w, 0.0)
    index = np.full(n_rows, len(held), dtype=np.int64)
    index[held] = np.arange(len(held))
    wz = np.zeros((len(held) + 1, len(held) + 1))
    wz[:-1, :-1] = w
    hi, ci = index[h], index[c]
    rp3 = np.zeros(c.shape)
    for s in range(0, len(c), 256):
        rp3[s:s + 256] = wz[hi[s:s + 256][:, :, None], ci[s:s + 256][:, None, :]].sum(axis=1)
    # user-kNN: cosine between the evaluated user's history and every training user
    q = _history_matrix(h, n_rows)
    qn = np.sqrt(np.maximum(np.asarray(q.sum(axis=1)).ravel(), 1))
    xn = np.sqrt(np.maximum(np.asarray(x.sum(axis=1)).ravel(), 1))
    sim = sp.diags(1.0 / qn) @ (q @ x.T) @ sp.diags(1.0 / xn)  # U x n_users
    sim = sim.tocsr()
    uk = np.zeros(c.shape)
    xc = x.tocsc()
    for s in range(0, len(c), 256):
        srow = sim[s:s + 256].toarray()
        cols = xc[:, np.unique(c[s:s + 256])]
        uniq = np.unique(c[s:s + 256])
        block = srow @ cols.toarray()  # b x len(uniq)
        pos = np.searchsorted(uniq, c[s:s + 256])
        uk[s:s + 256] = np.take_along_axis(block, pos, axis=1)
    fed = np.log1p(sum(market_counts(m, n_items) for m in sources))
    return np.stack([rp3, uk, fed[c]], axis=2).astype(np.float32)


def fit_variant(x: np.ndarray, seed: int, names: tuple[str, ...], mode: str) -> Any:
    """A scorer ``U x C x F -> U x C`` fitted on ``x`` (positive in column 0)."""
    import lightgbm as lgb

    boosters, rounds, cv = train_booster(x, seed, names=names)
    if mode == "bag":  # the product's ranker
        return Ranker(boosters=boosters, model_version="", fold_rounds=rounds,
                      cv_valid_ndcg=cv).scores
    final = lgb.train({**PARAMS, "seed": seed, "num_threads": 0},
                      ranking_dataset(x, seed, names),
                      num_boost_round=max(int(round(float(np.mean(rounds)))), 1))
    return lambda z: np.asarray(final.predict(z.reshape(-1, z.shape[2]))).reshape(z.shape[:2])


def nested(x: np.ndarray, seed: int, names: tuple[str, ...], mode: str) -> float:
    """Outer 5-fold estimate of the variant's valid nDCG@10."""
    outer = np.random.default_rng(seed + 100).permutation(len(x)) % 5
    nd = np.zeros(len(x))
    for k in range(5):
        f = fit_variant(x[outer != k], seed, names, mode)
        nd[outer == k] = ndcg_hr_at_k(torch.as_tensor(f(x[outer == k])), 10)[0].numpy()
    return float(nd.mean())


def main(argv: list[str] | None = None) -> None:
    """Print one block per run; write ``--out`` JSON."""
    p = runs_parser(__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--cache", default="runs/ranker-variants-cache")
    p.add_argument("--variants", default="",
                   help="comma-separated SET/MODE to run (default: every one)")
    args = p.parse_args(argv)
    sources = args.sources.split(",")
    runs = [Path(r) for r in args.runs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    names = (*FEATURES, *EXTRA)
    base = tuple(f for f in FEATURES if f != "emb_norm")  # the ranker before emb_norm
    sets = {"base": base, "+rp3b": (*base, "rp3b"), "+uknn": (*base, "uknn"),
            "+rp3b+uknn": (*base, "rp3b", "uknn"), "+fed_pop": (*base, "fed_pop"),
            "+emb_norm": FEATURES, "+emb_norm+fed_pop": (*FEATURES, "fed_pop")}
    doc: dict[str, object] = {}
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    for run, seed in zip(runs, seeds, strict=True):
        cache = Path(args.cache) / f"{run.name}-{args.join}.npz"
        z = np.load(cache) if cache.exists() else None
        if z is not None and z["valid"].shape[2] == len(names):
            xs = {"valid": z["valid"], "test": z["test"]}
        else:  # none yet, or written before this version's features
            splits = {m: load_market(args.dataset, args.data_dir, m, seed=seed)[1]
                      for m in [*sources, args.join]}
            n_items = load_market(args.dataset, args.data_dir, args.join, seed=seed)[0].n_items
            state = load_state(run / args.join, args.join)
            stats = MarketStats.from_split(splits[args.join], n_items)
            xs = {}
            for which in ("valid", "test"):
                ev = splits[args.join].eval_set(which)
                own = features(state.model, stats, ev.histories, ev.candidates,
                               torch.device("cpu"))
                ext = extra_features(splits[args.join], [splits[m] for m in sources], n_items,
                                     ev.histories, ev.candidates)
                xs[which] = np.concatenate([own, ext], axis=2)
            np.savez(cache, **xs)
        row: dict[str, object] = {}
        for set_name, feats in sets.items():
            idx = [names.index(f) for f in feats]
            xv, xt = xs["valid"][:, :, idx], xs["test"][:, :, idx]
            for mode in ("refit", "bag"):
                if args.variants and f"{set_name}/{mode}" not in args.variants.split(","):
                    continue
                est = nested(xv, seed, feats, mode)
                f = fit_variant(xv, seed, feats, mode)
                test = float(ndcg_hr_at_k(torch.as_tensor(f(xt)), 10)[0].numpy().mean())
                print(f"{run.name} {set_name:12} {mode:5} nested-valid {est:.4f} "
                      f"test {test:.4f}", flush=True)
                row[f"{set_name}/{mode}"] = {"nested_valid": est, "test": test}
        doc[run.name] = row
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
