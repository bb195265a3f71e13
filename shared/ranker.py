"""A market's private ranker: LambdaMART over its model's score and its own statistics.

Decision record. The joined market's model scores ``neural + w * knn`` (shared/itemsim.py), one
weight picked on its validation split. The WSDM-Cup 2022 cross-market fusions gained 0.02-0.03
nDCG@10 over their best single model with a LightGBM ranker over CF scores and popularity,
trained on the target market's validation candidates. Measured on the three joined ``s3``
models (simulations/experiments/RESULTS.md, ``join_rerank``): a LambdaMART ranker over the
features below, trained on the market's own validation split, lifts the official valid_run
nDCG@10 by about +0.008 over the linear mix, each interval above zero; EASE on the market's
own rows carries half the gain. Features relative to the candidate list (rank, gap to the
best) did no better, and would mean something else when the service ranks every item, so
every feature here is pointwise: a (history, candidate) pair scores the same in a 100-item
evaluation list and in the service's full catalog.

The candidate's embedding norm (``emb_norm``) carries what the federation knows of an item at
no further cost to privacy: over the joined ``s3``'s 2,922 items its rank correlation with the
source markets' item counts is -0.68 (with the market's own counts -0.28; median norm 1.44 for
the items the sources hold, 2.59 for the others), a popularity signal the joining market's own
counts lack. By nested cross-validation on the joined ``s3``'s validation users it added
+0.0011 / +0.0028 / +0.0035 nDCG@10 over the seeds (RESULTS.md, ``join_ranker_variants``),
about what a SecAgg+ sum of the sources' item counts (``fed_pop``, not built) added, and on top
of it that sum adds within noise.
Since the join takes the catalog-negative push out of the rows (shared/encoder_map.py), a
joined model's norms follow the sources' popularity less; the norms of the rows as federated
in their place measured within noise on XMarket `jp` (+0.0011 test nDCG@10 over 10 seeds,
``join_ranker_norm``), so the feature stays the model's own.

What travels, what stays: nothing travels. The features are the market's model score without
its kNN term, statistics of the market's own training rows (item-kNN similarities, EASE at
three ridge strengths, popularity) and the model's own item embeddings (their best cosine to
the history, and the candidate's embedding norm); the ranker trains on the market's
validation split (each user's held-out last-but-one row and its 99 negatives),
never on the split it is evaluated on, and is saved beside the heads (``ranker.json``, private
to the market) with the version of the model it was fitted to: a ranker never scores a model
it was not fitted to (``load_ranker`` refuses it).

Boosting rounds and the ranker itself: 5-fold cross-validation over the validation users, early
stopping on each held-out fold; the ranker is the five fold boosters, each cut at its own best
round, scoring by their mean. The earlier refit of one booster on every user with the folds'
mean round was worse: the folds' best rounds spread 19-400 on the joined ``s3``, and by nested
cross-validation on the validation users (simulations/experiments/RESULTS.md,
``join_ranker_variants``) the mean of the fold boosters scored +0.002-0.003 nDCG@10 above the
refit. The cross-validated nDCG@10 (each user scored by the booster that never saw it) is
reported and decides whether the market keeps the ranker; the mean of five such boosters is
expected to do at least as well.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from storefed.shared.baselines import Ease, ItemKNN, fit_ease, fit_itemknn, market_counts
from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.data import MarketSplit
from storefed.shared.errors import CheckpointError
from storefed.shared.metrics import ndcg_hr_at_k
from storefed.shared.model import MarketModel, encoder_state, private_state
from storefed.shared.serving_state import model_version

if TYPE_CHECKING:
    from storefed.shared.node import MarketNode

log = logging.getLogger("storefed")

RANKER_FORMAT = "storefed-ranker/2"  # /1: one refit booster, without emb_norm
RANKER_FILE = "ranker.json"
EASE_LAMBDAS: tuple[float, ...] = (50.0, 200.0, 1000.0)
FEATURES: tuple[str, ...] = (
    "neural", "knn", "knn_max", "knn_mean", "knn_last", "knn_last3",
    *(f"ease{lam:g}" for lam in EASE_LAMBDAS), "pop", "emb_max", "emb_norm", "hist_len")
PARAMS: dict[str, Any] = {
    "objective": "lambdarank", "metric": "ndcg", "eval_at": [10], "learning_rate": 0.03,
    "num_leaves": 15, "min_data_in_leaf": 100, "feature_fraction": 0.8,
    "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0, "verbose": -1,
    "deterministic": True, "force_row_wise": True}


@dataclass(frozen=True)
class MarketStats:
    """What the features need of the market's own training rows (rebuilt, never saved)."""

    knn: ItemKNN
    eases: tuple[Ease, ...]  # one per EASE_LAMBDAS
    log_pop: np.ndarray  # (n_items + 1,) log(1 + training count)

    @classmethod
    def from_split(cls, split: MarketSplit, n_items: int) -> MarketStats:
        knn = fit_itemknn([split], n_items)
        return cls(knn=knn, eases=tuple(fit_ease(knn, lam) for lam in EASE_LAMBDAS),
                   log_pop=np.log1p(market_counts(split, n_items)))


def _recent(histories: np.ndarray, pad: int, k: int) -> np.ndarray:
    """U x k: each user's k most recent items (right-padded, oldest first), ``pad`` if short."""
    n = (histories != pad).sum(axis=1)
    idx = n[:, None] - 1 - np.arange(k)[None, :]
    got = np.take_along_axis(histories, np.maximum(idx, 0), axis=1)
    return np.where(idx >= 0, got, pad)


def features(model: MarketModel, stats: MarketStats, histories: np.ndarray,
             candidates: np.ndarray, device: torch.device, cells: int = 4_000_000
             ) -> np.ndarray:
    """histories U x L (right-padded), candidates U x C -> U x C x len(FEATURES) float32;
    the U x L x C similarity terms in row blocks of at most ``cells`` entries (a service ranking
    a whole catalog per user stays within a few hundred MB)."""
    pad = stats.knn.n_rows - 1
    batch = max(1, cells // max(histories.shape[1] * candidates.shape[1], 1))
    model.to(device).eval()
    with torch.no_grad():  # the neural score, without the kNN term; ``model`` is not modified
        neural = torch.cat([model.neural_logits(
            torch.as_tensor(histories[s:s + 1024], dtype=torch.long, device=device),
            torch.as_tensor(candidates[s:s + 1024], dtype=torch.long, device=device)
        ).float().cpu() for s in range(0, len(candidates), 1024)]).double().numpy() \
            if len(candidates) else np.zeros(candidates.shape)
    raw = model.encoder.item_emb.weight.detach().float().cpu()
    emb, norm = torch.nn.functional.normalize(raw, dim=1), raw.norm(dim=1).numpy()
    out = np.zeros(candidates.shape + (len(FEATURES),), dtype=np.float32)
    for s in range(0, len(candidates), batch):
        h, c = histories[s:s + batch], candidates[s:s + batch]
        mask = h != pad
        n_hist = np.maximum(mask.sum(axis=1, keepdims=True), 1)
        hb = np.broadcast_to(h[:, :, None], h.shape + (c.shape[1],))
        cb = np.broadcast_to(c[:, None, :], (c.shape[0], h.shape[1], c.shape[1]))
        sim = np.where(mask[:, :, None], stats.knn.similarity(hb, cb), 0.0)  # U x L x C
        recent = _recent(h, pad, 3)
        recent_sim = np.stack([np.where((recent[:, k] != pad)[:, None], stats.knn.similarity(
            np.broadcast_to(recent[:, k:k + 1], c.shape), c), 0.0) for k in range(3)], axis=2)
        th, tc = torch.as_tensor(h), torch.as_tensor(c)
        cos = torch.einsum("uld,ucd->ulc", emb[th], emb[tc])
        cos = torch.where(torch.as_tensor(mask)[:, :, None], cos, torch.tensor(-1.0))
        cols = [neural[s:s + batch], sim.sum(axis=1), sim.max(axis=1),
                sim.sum(axis=1) / n_hist, recent_sim[:, :, 0], recent_sim.sum(axis=2),
                *(e.scores(h, c) for e in stats.eases), stats.log_pop[c],
                cos.max(dim=1).values.numpy(), norm[c], np.broadcast_to(n_hist, c.shape)]
        out[s:s + batch] = np.stack(cols, axis=2)
    return out


@dataclass(frozen=True)
class Ranker:
    """A fitted LightGBM ranker (the fold boosters, scoring by their mean) and what it was
    fitted to."""

    boosters: tuple[Any, ...]  # lightgbm.Booster, each used up to its fold_rounds entry
    model_version: str  # shared/serving_state.model_version of the model it ranks for
    fold_rounds: tuple[int, ...]
    cv_valid_ndcg: float  # cross-validated nDCG@10 on the validation users

    def beats(self, model_valid_ndcg: float) -> bool:
        """Keep it? Only when its cross-validated valid nDCG@10 is above the model's own."""
        return self.cv_valid_ndcg > model_valid_ndcg

    def scores(self, x: np.ndarray) -> np.ndarray:
        """U x C x F features -> U x C scores: the mean of the boosters' scores."""
        flat = x.reshape(-1, x.shape[2])
        return np.mean([np.asarray(b.predict(flat, num_iteration=r)) for b, r in zip(
            self.boosters, self.fold_rounds, strict=True)], axis=0).reshape(x.shape[:2])

    def model_strings(self) -> list[str]:
        """Each booster as LightGBM's text model, cut at its round."""
        return [b.model_to_string(num_iteration=r) for b, r in zip(
            self.boosters, self.fold_rounds, strict=True)]

    def rank(self, model: MarketModel, stats: MarketStats, histories: np.ndarray,
             candidates: np.ndarray, device: torch.device) -> torch.Tensor:
        """U x C scores of ``model``'s candidates (float64, CPU); refuses another model."""
        version = version_of(model)
        if version != self.model_version:
            raise CheckpointError(f"this ranker was fitted to model version "
                                  f"{self.model_version}, not {version}")
        return torch.from_numpy(self.scores(features(model, stats, histories, candidates,
                                                     device)))


def version_of(model: MarketModel) -> str:
    """The model's content version (the one its serving file carries)."""
    return model_version(encoder_state(model), private_state(model))


def ranking_dataset(x: np.ndarray, seed: int, names: tuple[str, ...]) -> Any:
    """U x C x F features (the positive in column 0) as a LightGBM ranking dataset.
    Candidates shuffled within each user: LightGBM's own nDCG breaks ties by input order,
    which would favour the positive (column 0) and stop boosting after one round."""
    import lightgbm as lgb

    u, c, f = x.shape
    order = np.argsort(np.random.default_rng(seed).random((u, c)), axis=1)
    xs = np.take_along_axis(x, order[:, :, None], axis=1)
    return lgb.Dataset(xs.reshape(u * c, f), label=(order == 0).astype(np.float64).ravel(),
                       group=np.full(u, c), feature_name=list(names), free_raw_data=False)


def train_booster(x: np.ndarray, seed: int = 0, folds: int = 5, max_rounds: int = 1000,
                  threads: int = 0, names: tuple[str, ...] = FEATURES,
                  params: dict[str, Any] | None = None
                  ) -> tuple[tuple[Any, ...], tuple[int, ...], float]:
    """LambdaMART on U x C x F features (the positive in column 0), ``folds``-fold
    cross-validation over the users, early stopping on each held-out fold -> (the fold
    boosters, each one's best round, cross-validated nDCG@10). ``params``: overrides of
    ``PARAMS``."""
    import lightgbm as lgb

    if len(x) < 2 * folds:
        raise ValueError(f"{len(x)} users, too few to fit a ranker with {folds}-fold "
                         "cross-validation")
    params = {**PARAMS, "seed": seed, "num_threads": threads, **(params or {})}
    fold = np.random.default_rng(seed).permutation(len(x)) % folds
    boosters: list[Any] = []
    fold_rounds: list[int] = []
    cv = np.zeros(len(x))
    for k in range(folds):
        train, held = x[fold != k], x[fold == k]
        booster = lgb.train(params, ranking_dataset(train, seed, names),
                            num_boost_round=max_rounds,
                            valid_sets=[ranking_dataset(held, seed + 1, names)],
                            callbacks=[lgb.early_stopping(100, verbose=False)])
        best = max(int(booster.best_iteration), 1)
        boosters.append(booster)
        fold_rounds.append(best)
        s = np.asarray(booster.predict(held.reshape(-1, held.shape[2]), num_iteration=best))
        cv[fold == k] = ndcg_hr_at_k(torch.from_numpy(s.reshape(held.shape[:2])), 10)[0].numpy()
    return tuple(boosters), tuple(fold_rounds), float(cv.mean())


def fit_ranker(model: MarketModel, split: MarketSplit, stats: MarketStats,
               device: torch.device, seed: int = 0, folds: int = 5,
               max_rounds: int = 1000, threads: int = 0) -> Ranker:
    """Fit on the validation split only (``split.test`` is never read)."""
    x = features(model, stats, split.valid.histories, split.valid.candidates, device)
    try:
        boosters, fold_rounds, cv = train_booster(x, seed, folds, max_rounds, threads)
    except ValueError as exc:
        raise ValueError(f"market {split.market}: {exc}") from None
    return Ranker(boosters=boosters, model_version=version_of(model), fold_rounds=fold_rounds,
                  cv_valid_ndcg=cv)


def save_ranker(path: str | Path, ranker: Ranker, market: str) -> None:
    """``ranker.json``: the boosters (LightGBM's text models) and what they were fitted to."""
    doc = {"format": RANKER_FORMAT, "market": market, "model_version": ranker.model_version,
           "features": list(FEATURES), "fold_rounds": list(ranker.fold_rounds),
           "cv_valid_ndcg@10": ranker.cv_valid_ndcg, "boosters": ranker.model_strings()}
    atomic_write_bytes(path, json.dumps(doc).encode())


def load_ranker(path: str | Path, market: str) -> Ranker:
    """Read ``save_ranker``'s file (CheckpointError naming the file and what is wrong)."""
    import lightgbm as lgb

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"ranker file {path}: unreadable ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != RANKER_FORMAT:
        raise CheckpointError(f"ranker file {path}: format "
                              f"{doc.get('format') if isinstance(doc, dict) else None!r}, "
                              f"expected {RANKER_FORMAT!r}")
    if doc.get("market") != market:
        raise CheckpointError(f"ranker file {path} belongs to market {doc.get('market')!r}, "
                              f"not {market!r}")
    if doc.get("features") != list(FEATURES):
        raise CheckpointError(f"ranker file {path}: features {doc.get('features')} are not "
                              f"this version's {list(FEATURES)}")
    try:
        boosters = tuple(lgb.Booster(model_str=str(b)) for b in doc["boosters"])
        rounds = tuple(int(r) for r in doc["fold_rounds"])
        if len(boosters) != len(rounds) or not boosters:
            raise ValueError(f"{len(boosters)} boosters for {len(rounds)} fold rounds")
        return Ranker(boosters=boosters, model_version=str(doc["model_version"]),
                      fold_rounds=rounds, cv_valid_ndcg=float(doc["cv_valid_ndcg@10"]))
    except (KeyError, TypeError, ValueError, lgb.basic.LightGBMError) as exc:
        raise CheckpointError(f"ranker file {path}: missing or malformed field ({exc})") from exc


def write_node_ranker(node: MarketNode) -> Path | None:
    """A market node that ranks (node config ``ranker = true``): after its evaluation, fit the
    ranker to the model just evaluated and keep it as ``<state-dir>/<market>/ranker.json`` when
    its cross-validated valid nDCG@10 beats the model's own; otherwise remove an earlier
    round's. Call it before ``write_node_serving``, so the service finds the ranker of the model
    it loads. Nothing without a state directory or for the single-task model."""
    if node.state_path is None or not isinstance(node.model, MarketModel) \
            or node.cfg.mtl == "single-task":
        return None
    path = node.state_path.parent / RANKER_FILE
    own = float(node.evaluate(None, "valid")["ndcg@10"])  # type: ignore[arg-type]
    stats = MarketStats.from_split(node.split, node.catalog.n_items)
    ranker = fit_ranker(node.model, node.split, stats, node.device, seed=node.cfg.seed)
    if ranker.beats(own):
        save_ranker(path, ranker, node.market)
        log.info("market %s: ranker kept (cross-validated valid nDCG@10 %.4f > the model's "
                 "%.4f)", node.market, ranker.cv_valid_ndcg, own)
        return path
    path.unlink(missing_ok=True)
    log.info("market %s: ranker not kept (cross-validated valid nDCG@10 %.4f <= the model's "
             "%.4f)", node.market, ranker.cv_valid_ndcg, own)
    return None
