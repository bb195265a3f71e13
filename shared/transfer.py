"""A new market joins: transfer-initialise from the global encoder, evaluate zero-shot, then
fine-tune, and measure the head start against a model trained from scratch on the same data.

Read top to bottom:

* ``shared/encoder_map.py`` maps the global encoder checkpoint onto the market's catalog
  (``map_encoder``), with the catalog-negative push taken out of the item rows
  (``remove_push``).
* ``join_model``: the new market's ``MarketModel``: mapped encoder + fresh heads whose item bias
  is the market's log-popularity (``init_heads_from_data``; no training).
* ``calibrate_heads``: the scales of those fresh heads' two terms (dot product, popularity) and
  the item-kNN weight, picked on the market's validation split (no optimiser step);
  ``zero_shot_model`` does it for each number of push directions and keeps the best.
* ``run_curve``: one optimiser loop over a schedule of phases (heads only with the encoder frozen
  via ``set_encoder_trainable``, then optionally the encoder at a low lr scale), evaluating every
  ``eval_every`` local optimiser steps -> ``[[steps, ndcg@10], ...]``. The ``adversarial``
  variant adds a domain discriminator behind a gradient-reversal layer on the encoder's pooled
  user vectors (DANN): source-domain inputs are pseudo-users whose histories are drawn from the
  items the federation trained (the only view of the source markets a joining market has,
  since their data never leaves them), target inputs are the new market's users.
* ``join_market``: zero-shot + transfer curve + scratch curve (same data; scratch's heads
  popularity-initialised; the transfer model fine-tuned with its encoder's federated loss,
  scratch with the loss that suits it best on valid) -> the ``join.json`` document, plus the
  two kept models' per-user nDCG@10 (``user_ndcg``) and their paired difference
  (``paired_bootstrap``) in the details; ``simulations/experiments/join_seeds.py`` pools
  those over seeds.

The comparison's parts (the scratch baseline, the adversarial variant, the steps-to-target
bookkeeping, per-user nDCG) live in ``shared/transfer_study.py``; this module is the join.

The Reptile-style meta-learned initialisation is a property of how the encoder was produced
(the federation's server step, run-config key ``server-lr``), so ``join`` accepts any encoder;
``simulations/experiments/join_experiment.py`` compares encoders produced with and without it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storefed.shared.checkpoint import EncoderCheckpoint, save_encoder, save_private
from storefed.shared.config import LOSSES, RunConfig
from storefed.shared.data import Catalog, MarketSplit
from storefed.shared.encoder_map import (
    FRESH_INITS,
    PUSH_DIMS_GRID,
    EncoderMapping,
    load_join_checkpoint,
    map_encoder,
)
from storefed.shared.errors import ConfigError
from storefed.shared.itemsim import KNN_WEIGHT_GRID, calibrate_weight
from storefed.shared.metrics import ndcg_hr_at_k, paired_bootstrap
from storefed.shared.model import (
    MarketModel,
    ModelConfig,
    encoder_state,
    load_parts,
    private_state,
    set_encoder_trainable,
)
from storefed.shared.node import (
    KnnScores,
    attach_knn,
    calibrate_knn,
    evaluate_split,
    init_heads_from_data,
    neural_scores,
)
from storefed.shared.progress import bar
from storefed.shared.ranker import RANKER_FILE, MarketStats, Ranker, fit_ranker, save_ranker
from storefed.shared.train import (
    HISTORY_MODES,
    TrainSettings,
    adam,
    batch_logits,
    evaluate,
    input_histories,
    ranking_loss,
    summarize_scores,
)
from storefed.shared.transfer_study import (
    Adversary,
    DomainDiscriminator,
    scratch_model,
    steps_to_target,
    user_ndcg,
)

VARIANTS = ("plain", "adversarial")
SELECTIONS = ("valid", "none")
HEAD_INITS = ("calibrated", "popularity")
# the calibrated heads' overall scale among those that rank alike: as the grid picked it ("grid":
# ties go to the unscaled heads, else the smallest scale), or the one whose full softmax over the
# market's items fits the valid positives best ("valid-loss": temperature scaling, the kNN
# weight scaled alike)
HEAD_TEMPERATURES = ("grid", "valid-loss")
TEMPERATURE_GRID: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
# the item-kNN weights the join picks from, at the calibration and at every evaluation of both
# curves: the federation's grid extended. The calibrated heads often start at a small scale (dot
# 0.5-1 on `s3`), against which the market's kNN wanted the federation grid's ceiling; with the
# extension `s3`'s transfer was higher on valid and XMarket's unchanged (RESULTS.md, Joining).
# The temperature (``valid_temperature``) keeps ``c x w`` on it
JOIN_KNN_GRID: tuple[float, ...] = (*KNN_WEIGHT_GRID, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0)
# the scratch baseline's loss is either fixed or "auto": each of these, the better on valid kept
SCRATCH_AUTO_LOSSES: tuple[str, ...] = ("bce", "full-softmax")
SCRATCH_LOSSES = ("auto", *LOSSES)
# fresh heads' scales searched by ``calibrate_heads``: the user-item dot product (projection =
# scale x identity) and the market's log-popularity bias
DOT_SCALE_GRID: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
POP_SCALE_GRID: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class JoinSettings:
    """How a market joins. Steps are local optimiser steps (one mini-batch each)."""

    variant: str = "plain"  # plain | adversarial
    # Defaults chosen on the *valid* split of XMarket in/jp (encoder federated over
    # ca,de,fr,mx,uk): a heads-only warm-up (encoder frozen) and a low encoder lr both slowed
    # the transfer curve (steps to scratch's best x1.3-1.7 for 20 frozen steps, x2.4-3.7 for
    # 50 frozen + scale 0.3, x5.7-8 for 150 frozen + scale 0.1), so the default fine-tunes
    # everything at once; --head-steps/--encoder-lr-scale keep the PEFT schedule.
    head_steps: int = 0  # phase 1: heads only, encoder frozen
    encoder_steps: int = 300  # phase 2: encoder unfrozen at lr * encoder_lr_scale (0 = skip)
    encoder_lr_scale: float = 1.0
    scratch_steps: int = 600  # scratch budget (0 = the transfer budget); long enough to peak
    eval_every: int = 10
    # the federation's mini-batch (run-config batch-size). Both curves at the same batch: at 128
    # they were noisy enough that on XMarket `in` (239 test users) scratch's best was a spike
    # (README, "A new market joins", for the measurements)
    batch_size: int = RunConfig.batch_size
    lr: float = 0.003
    weight_decay: float = 0.0
    negatives: int = 4
    # the transfer model is fine-tuned with the loss its encoder was federated with (run-config
    # ``loss``; ``storefed join`` reads it from the checkpoint): on the joining markets' valid
    # split full-softmax gave a higher best than BCE in 11 of 12 runs (`in`/`jp` seeds 0-4, `s3`
    # seeds 0-1) and reached the BCE scratch model's best on `s3` at step 20 instead of 80-100
    loss: str = RunConfig.loss
    # the scratch baseline's loss: "auto" trains it with each of SCRATCH_AUTO_LOSSES and keeps
    # the one whose kept model scores higher on the valid split (BCE was better on `jp` in ten
    # seeds of ten and `s3` in four of five, full-softmax on `in` in six of ten), so the target
    # is scratch at its best
    scratch_loss: str = "auto"
    seed: int = 0
    adv_weight: float = 0.1  # weight of the domain loss (gradient reversal strength)
    fresh_init: str = "category-mean"  # category-mean | random (keep checkpoint/random rows)
    eval_split: str = "test"  # test | valid
    # a positive's input history, as in train_local (run-config train-history; default causal)
    history: str = RunConfig.train_history
    # the market's private item-kNN term, as in the federation (run-config item-knn): attached
    # to both curves' models, its weight re-picked on the valid split at every evaluation
    item_knn: bool = RunConfig.item_knn
    # each curve point is the model one would keep by then: the checkpoint with the best
    # validation nDCG@10 so far ("valid"), or simply the latest weights ("none"). Both curves
    # alike; the raw per-checkpoint curves go to join_details.json either way
    select: str = "valid"
    # the transfer model's fresh heads: the market's log-popularity as item bias and identity
    # projections ("popularity"), then ("calibrated") the scale of each of the two (and the kNN
    # weight) picked on the market's validation split, no optimiser step (``calibrate_heads``).
    # The scratch model keeps the popularity heads: its encoder is random, so a dot-product
    # scale picked for it would be fitted to noise
    head_init: str = "calibrated"
    # the calibrated heads' temperature (HEAD_TEMPERATURES; ``calibrate_heads``)
    head_temperature: str = "grid"
    # the item-kNN weights every evaluation of both curves (and the calibration) picks from
    knn_grid: tuple[float, ...] = JOIN_KNN_GRID
    # after fine-tuning, the market's private ranker (shared/ranker.py: LambdaMART over the kept
    # model's score and the market's own statistics, fitted on its valid split) scores its
    # candidates: +0.008 nDCG@10 on the joined s3 models' official valid_run, every seed
    ranker: bool = True
    # directions of the catalog-negative push removed from the federated item rows
    # (``remove_push``); None: each of PUSH_DIMS_GRID tried, the best zero-shot model on the
    # valid split kept (ties: fewer directions)
    push_dims: int | None = None

    def __post_init__(self) -> None:
        for name, choices in (("variant", VARIANTS), ("fresh_init", FRESH_INITS),
                              ("history", HISTORY_MODES), ("select", SELECTIONS),
                              ("head_init", HEAD_INITS), ("loss", LOSSES),
                              ("head_temperature", HEAD_TEMPERATURES),
                              ("scratch_loss", SCRATCH_LOSSES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"join {name.replace('_', '-')} must be one of "
                                  f"{', '.join(choices)}; got {getattr(self, name)!r}")
        if self.eval_split not in ("test", "valid"):
            raise ConfigError(f"join eval split must be test or valid; got {self.eval_split!r}")
        for name in ("head_steps", "encoder_steps", "scratch_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"join {name.replace('_', '-')} must be >= 0")
        for name in ("eval_every", "batch_size", "negatives"):
            if getattr(self, name) < 1:
                raise ConfigError(f"join {name.replace('_', '-')} must be >= 1")
        if self.push_dims is not None and self.push_dims not in PUSH_DIMS_GRID:
            raise ConfigError(f"join push-dims must be one of "
                              f"{', '.join(map(str, PUSH_DIMS_GRID))} or auto; "
                              f"got {self.push_dims!r}")
        if not self.knn_grid or min(self.knn_grid) < 0:
            raise ConfigError("join kNN grid must be non-empty weights >= 0")
        if self.lr <= 0 or self.encoder_lr_scale < 0 or self.adv_weight < 0:
            raise ConfigError("join lr must be > 0, encoder-lr-scale and adv-weight >= 0")

    @property
    def total_steps(self) -> int:
        return self.head_steps + self.encoder_steps

    @property
    def scratch_budget(self) -> int:
        return self.scratch_steps or self.total_steps


@dataclass(frozen=True)
class Phase:
    steps: int
    encoder_trainable: bool
    encoder_lr_scale: float = 1.0


def join_model(encoder: dict[str, torch.Tensor], mcfg: ModelConfig, catalog: Catalog,
               split: MarketSplit) -> MarketModel:
    """The joining market's model: mapped encoder, popularity-initialised fresh heads."""
    model = MarketModel(mcfg, torch.as_tensor(np.asarray(catalog.item_category)))
    load_parts(model, encoder=encoder)
    init_heads_from_data(model, split)
    return model


def calibrate_heads(model: MarketModel, split: MarketSplit, device: torch.device,
                    knn: KnnScores | None = None, temperature: bool = False,
                    knn_grid: tuple[float, ...] = JOIN_KNN_GRID) -> dict[str, float]:
    """Scale fresh heads on the market's validation split, without an optimiser step.

    The source markets trained their own private heads against the shared encoder, so the
    encoder's dot products carry no fixed temperature a fresh identity head would match; nor is
    there one right weight of the popularity bias against them. The score of a candidate is
    ``a * dot + b * bias (+ w * knn)``; ``a`` from ``DOT_SCALE_GRID`` and ``b`` from
    ``POP_SCALE_GRID`` are picked for the best validation nDCG@10 (``w``, the item-kNN weight,
    picked from ``knn_grid`` per pair as ``calibrate_knn`` does), then folded into the heads:
    projections x ``a``, category and item biases x ``b``. Ties keep the unscaled heads.

    Scaling every term by one ``c`` ranks alike, and ties keep the grid's first pick (the
    unscaled heads, else the smallest scale): often a flat full softmax, whose first fine-tuning
    steps go into the scale. With
    ``temperature``, ``c`` from ``TEMPERATURE_GRID`` (those keeping the kNN weight on its grid)
    minimises the full-softmax loss of the valid positives over the market's items, the
    fine-tuning loss (temperature scaling). Returns the picked values."""
    ev = split.valid
    heads = model.heads
    neural = neural_scores(model, ev.histories, ev.candidates, device).double()
    cands = torch.as_tensor(ev.candidates, dtype=torch.long)
    bias = (heads.item_bias.detach().cpu()[cands]
            + heads.cat_bias.detach().cpu()[model.item_category.cpu()[cands]]).double()
    dot = neural - bias
    knn_valid = knn.get("valid").double() if knn is not None else None
    grid = [(1.0, 1.0)] + [(a, b) for a in DOT_SCALE_GRID for b in POP_SCALE_GRID]
    best = (-1.0, 1.0, 1.0, 0.0)
    for a, b in grid:
        scores = a * dot + b * bias
        w = (calibrate_weight(scores, knn_valid, knn_grid) if knn_valid is not None
             else 0.0)
        if knn_valid is not None:
            scores = scores + w * knn_valid
        nd = float(ndcg_hr_at_k(scores, 10)[0].mean()) if len(scores) else 0.0
        if nd > best[0] + 1e-12:
            best = (nd, a, b, w)
    _, a, b, w = best
    with torch.no_grad():
        heads.proj.mul_(a)
        heads.cat_bias.mul_(b)
        heads.item_bias.mul_(b)
        if model.item_sim is not None:
            heads.knn_weight.fill_(w)
    picked = {"dot_scale": a, "pop_scale": b, "knn_weight": w, "valid_ndcg@10": best[0]}
    if temperature:
        c = valid_temperature(model, split, device, w, knn_grid)
        with torch.no_grad():
            heads.proj.mul_(c)
            heads.cat_bias.mul_(c)
            heads.item_bias.mul_(c)
            heads.knn_weight.mul_(c)
        picked.update(temperature=c, knn_weight=w * c)
    return picked


def valid_temperature(model: MarketModel, split: MarketSplit, device: torch.device,
                      knn_weight: float, grid: tuple[float, ...] = JOIN_KNN_GRID) -> float:
    """The ``c`` of ``TEMPERATURE_GRID`` whose ``c x`` logits give the market's valid positives
    the lowest full-softmax loss over its items (the fine-tuning loss, kNN term aside: training
    never sees it); only those with ``c x knn_weight`` on the kNN ``grid``, so the ranking
    stays."""
    temps = [c for c in TEMPERATURE_GRID if knn_weight == 0 or c * knn_weight in grid]
    ev = split.valid
    if len(ev.users) == 0:
        return 1.0
    pool = torch.as_tensor(split.items, dtype=torch.long, device=device)
    sim, model.item_sim = model.item_sim, None
    model.to(device).eval()
    totals = torch.zeros(len(temps), dtype=torch.float64)
    try:
        with torch.no_grad():
            for s in range(0, len(ev.users), 512):
                hist = torch.as_tensor(ev.histories[s:s + 512], dtype=torch.long, device=device)
                pos = torch.as_tensor(ev.candidates[s:s + 512, 0], dtype=torch.long,
                                      device=device)
                logits = model.score_positive_and_items(hist, pos, pool).double().cpu()
                for i, c in enumerate(temps):
                    totals[i] += -(c * logits).log_softmax(dim=1)[:, 0].sum()
    finally:
        model.item_sim = sim
    return temps[int(totals.argmin())]


@dataclass
class ZeroShot:
    """The joining market's model before any optimiser step, and how it was picked."""

    model: MarketModel
    mapping: EncoderMapping
    knn: KnnScores | None
    head_scales: dict[str, float] | None
    push_valid: dict[int, float]  # push directions tried -> zero-shot valid nDCG@10


def zero_shot_model(ck: EncoderCheckpoint, catalog: Catalog, split: MarketSplit,
                    settings: JoinSettings, device: torch.device,
                    path: str | Path = "checkpoint") -> ZeroShot:
    """Map ``ck`` onto the market (``settings.push_dims`` directions of the push removed, or
    each of ``PUSH_DIMS_GRID`` when None), build fresh heads, calibrate them
    (``settings.head_init``) and keep the model with the best validation nDCG@10 (ties: fewer
    directions). No optimiser step: the market's own valid split picks scalars only."""
    grid = PUSH_DIMS_GRID if settings.push_dims is None else (settings.push_dims,)
    knn: KnnScores | None = None
    best: ZeroShot | None = None
    valid: dict[int, float] = {}
    for dims in grid:
        state, mcfg, mapping = map_encoder(ck, catalog, settings.fresh_init, path, dims)
        if dims and mapping.push_dims == 0:
            break  # no run config in the checkpoint: nothing to remove (module doc)
        model = join_model(state, mcfg, catalog, split)
        if settings.item_knn:
            attach_knn(model, split, catalog.n_items)
            assert model.item_sim is not None
            if knn is None:  # the market's own data: the same for every candidate model
                knn = KnnScores(model.item_sim, split, device)
        if settings.head_init == "calibrated":
            scales: dict[str, float] | None = calibrate_heads(
                model, split, device, knn, settings.head_temperature == "valid-loss",
                settings.knn_grid)
            assert scales is not None
            score = scales["valid_ndcg@10"]
        else:
            scales = None
            calibrate_knn(model, split, device, knn, settings.knn_grid)
            score = float(evaluate_split(model, split, catalog, "valid", device,  # type: ignore[arg-type]
                                         knn=knn)["ndcg@10"])
        valid[dims] = score
        if best is None or score > valid[best.mapping.push_dims] + 1e-12:
            best = ZeroShot(model, mapping, knn, scales, valid)
    assert best is not None
    best.knn = knn
    return best


# --------------------------------------------------------------------------- training curves
Evaluator = Callable[[MarketModel], float]


def split_evaluator(split: MarketSplit, catalog: Catalog, which: str,
                    device: torch.device) -> Callable[[MarketModel], dict[str, object]]:
    """model -> evaluate() dict on the market's valid or test set."""
    ev = split.eval_set(which)

    def run(model: MarketModel) -> dict[str, object]:
        return evaluate(model, ev.histories, ev.candidates, catalog.item_category,
                        catalog.categories, device)

    return run


def run_curve(model: MarketModel, split: MarketSplit, phases: list[Phase],
              settings: JoinSettings, device: torch.device, evaluator: Evaluator,
              adversary: Adversary | None = None, selector: Evaluator | None = None,
              raw: list[list[float]] | None = None, progress: str = "") -> list[list[float]]:
    """Train through ``phases`` (one continuous stream of shuffled mini-batches, a new Adam per
    phase since the trainable set changes) and return ``[[steps, metric], ...]`` evaluated at
    step 0, every ``eval_every`` steps and at the end. Batches are built by ``train_local``'s
    helpers (``shared/train.py``): the input history per ``settings.history`` (``causal``: the
    user's items before the positive) and the positive scored against ``negatives`` uniform
    market items (or all of them for ``full-softmax``).

    With a ``selector`` (the market's validation nDCG@10), the curve is that of the model one
    would keep: at each evaluation, the checkpoint with the best selector value so far, and its
    ``evaluator`` value; ``model`` ends as that checkpoint. ``raw`` (if given) receives every
    checkpoint's own ``evaluator`` value. ``progress``: a bar with an ETA on stderr, so named."""
    model.to(device)
    gen = torch.Generator().manual_seed(settings.seed)
    users = torch.as_tensor(split.train_users, dtype=torch.long)
    items = torch.as_tensor(split.train_items, dtype=torch.long)
    hist_all = torch.as_tensor(split.train_histories, dtype=torch.long).to(device)
    pool = torch.as_tensor(split.items, dtype=torch.long).to(device)
    recipe = TrainSettings(batch_size=settings.batch_size, lr=settings.lr,
                           weight_decay=settings.weight_decay, negatives=settings.negatives,
                           loss=settings.loss, seed=settings.seed, history=settings.history)
    n = len(users)
    kept: dict[str, Any] = {}

    def measure(step: int) -> float:
        value = evaluator(model)
        if raw is not None:
            raw.append([step, value])
        if selector is None:
            return value
        score = selector(model)
        if not kept or score > kept["score"]:
            kept.update(score=score, value=value,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return float(kept["value"])

    curve: list[list[float]] = [[0, measure(0)]]
    if n == 0:
        return curve
    steps, order, cursor = 0, torch.randperm(n, generator=gen), 0
    if adversary is not None:
        adversary.disc.to(device)
    pbar = bar(sum(p.steps for p in phases), progress, enabled=bool(progress))
    for phase in phases:
        if phase.steps == 0:
            continue
        set_encoder_trainable(model, phase.encoder_trainable)
        head_params = [p for k, p in model.named_parameters()
                       if not k.startswith("encoder.") and p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": head_params, "lr": settings.lr}]
        if phase.encoder_trainable:
            groups.append({"params": list(model.encoder.parameters()),
                           "lr": settings.lr * phase.encoder_lr_scale})
        use_adv = adversary is not None and phase.encoder_trainable
        if use_adv:
            assert adversary is not None
            groups.append({"params": list(adversary.disc.parameters()), "lr": settings.lr})
        opt = adam(groups, lr=settings.lr, weight_decay=settings.weight_decay)
        for _ in range(phase.steps):
            model.train()
            if cursor >= n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + settings.batch_size]
            cursor += settings.batch_size
            u, pos = users[idx].to(device), items[idx].to(device)
            hist = input_histories(hist_all[u], pos, model.encoder.pad, recipe.history)
            loss = ranking_loss(batch_logits(model, hist, pos, pool, recipe, gen), recipe.loss)
            if use_adv:
                assert adversary is not None
                loss = loss + adversary.loss(model, hist, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            pbar.update(1)
            if steps % settings.eval_every == 0:
                curve.append([steps, measure(steps)])
    pbar.close()
    set_encoder_trainable(model, True)
    if curve[-1][0] != steps:
        curve.append([steps, measure(steps)])
    if kept:
        model.load_state_dict(kept["state"])
    return curve


def transfer_phases(settings: JoinSettings) -> list[Phase]:
    return [Phase(settings.head_steps, encoder_trainable=False),
            Phase(settings.encoder_steps, encoder_trainable=True,
                  encoder_lr_scale=settings.encoder_lr_scale)]


# --------------------------------------------------------------------------- the join
@dataclass
class JoinOutcome:
    doc: dict[str, Any]  # the join.json document (exact issue shape)
    details: dict[str, Any]  # everything else (mapping, settings, timings, hr curves)
    model: MarketModel  # the fine-tuned transfer model
    mapping: EncoderMapping
    ranker: Ranker | None = None  # the market's private ranker over ``model`` (settings.ranker)


def join_market(encoder_path: str | Path, catalog: Catalog, split: MarketSplit,
                settings: JoinSettings, device: torch.device,
                with_scratch: bool = True, progress: bool = False) -> JoinOutcome:
    """Zero-shot, transfer fine-tuning curve and scratch curve for one market (``progress``: a
    bar with an ETA on stderr for each curve)."""
    t0 = time.perf_counter()
    ck = load_join_checkpoint(encoder_path)
    start = zero_shot_model(ck, catalog, split, settings, device, encoder_path)
    model, mapping, knn, head_scales = start.model, start.mapping, start.knn, start.head_scales
    mcfg = model.cfg

    def full_eval(m: MarketModel) -> dict[str, object]:
        calibrate_knn(m, split, device, knn, settings.knn_grid)  # no-op without item-kNN
        return evaluate_split(m, split, catalog, settings.eval_split, device, knn=knn)

    zero = full_eval(model)
    zero_shot = {"ndcg@10": float(zero["ndcg@10"]),  # type: ignore[arg-type]
                 "hr@10": float(zero["hr@10"])}  # type: ignore[arg-type]

    def ndcg(m: MarketModel) -> float:
        return float(full_eval(m)["ndcg@10"])  # type: ignore[arg-type]

    def valid_ndcg(m: MarketModel) -> float:  # after ndcg(m): the kNN weight is calibrated
        return float(evaluate_split(m, split, catalog, "valid", device,  # type: ignore[arg-type]
                                    knn=knn)["ndcg@10"])

    selector = valid_ndcg if settings.select == "valid" else None
    raw: dict[str, list[list[float]]] = {"transfer": [], "scratch": []}

    adversary = None
    if settings.variant == "adversarial":
        torch.manual_seed(settings.seed)
        adversary = Adversary(DomainDiscriminator(mcfg.dim),
                              torch.from_numpy(np.flatnonzero(mapping.known)), settings.adv_weight)
    t1 = time.perf_counter()
    transfer = run_curve(model, split, transfer_phases(settings), settings, device, ndcg,
                         adversary, selector, raw["transfer"],
                         progress=f"{split.market}: fine-tuning" if progress else "")
    t2 = time.perf_counter()
    scratch: list[list[float]] = []
    base: MarketModel | None = None
    by_loss: dict[str, dict[str, Any]] = {}  # each scratch loss tried: its kept model on valid
    picked: str | None = None
    if with_scratch:
        losses = (SCRATCH_AUTO_LOSSES if settings.scratch_loss == "auto"
                  else (settings.scratch_loss,))
        for loss in losses:
            candidate = scratch_model(mcfg, catalog, split, settings.seed)
            if settings.item_knn:
                attach_knn(candidate, split, catalog.n_items)
            raw_c: list[list[float]] = []
            curve = run_curve(candidate, split, [Phase(settings.scratch_budget, True, 1.0)],
                              dataclasses.replace(settings, loss=loss), device, ndcg,
                              selector=selector, raw=raw_c,
                              progress=f"{split.market}: scratch ({loss})" if progress else "")
            calibrate_knn(candidate, split, device, knn, settings.knn_grid)  # as evaluations
            kept_valid = valid_ndcg(candidate)
            best_c = max(v for _, v in curve)
            by_loss[loss] = {"valid_ndcg@10": kept_valid, "best": best_c,
                             "steps_to_best": steps_to_target(curve, best_c), "curve": curve}
            if picked is None or kept_valid > by_loss[picked]["valid_ndcg@10"]:  # ties: first
                picked, base, scratch, raw["scratch"] = loss, candidate, curve, raw_c
    t3 = time.perf_counter()
    # the two kept models on the same users: is transfer's edge (or deficit) beyond noise?
    ev_users = split.eval_set(settings.eval_split).users
    per_user = ({"transfer": user_ndcg(model, split, settings.eval_split, device, knn),
                 "scratch": user_ndcg(base, split, settings.eval_split, device, knn)}
                if base is not None else None)
    paired = (paired_bootstrap(per_user["transfer"], per_user["scratch"], seed=settings.seed)
              if per_user is not None else None)
    best_s = max(v for _, v in scratch) if scratch else None
    best_t = max(v for _, v in transfer)
    doc: dict[str, Any] = {
        "zero_shot": zero_shot,
        "transfer": [[int(s), float(v)] for s, v in transfer],
        "scratch": [[int(s), float(v)] for s, v in scratch],
        "best": {"transfer": best_t, "scratch": best_s},
        "steps_to_target": {
            "transfer": steps_to_target(transfer, best_s) if best_s is not None else None,
            "scratch": steps_to_target(scratch, best_s) if best_s is not None else None},
    }
    seconds = {"load": t1 - t0, "transfer": t2 - t1, "scratch": t3 - t2}
    per_user_doc: dict[str, list[Any]] | None = (
        None if per_user is None else {"users": [split.user_ids[u] for u in ev_users.tolist()],
                                       **{k: v.tolist() for k, v in per_user.items()}})
    details = {"market": split.market, "encoder": str(encoder_path), "encoder_round": ck.round,
               "mapping": mapping.summary(), "settings": asdict(settings),
               # zero-shot valid nDCG@10 per number of push directions removed (the best kept)
               "push_dims_valid_ndcg@10": {str(k): v for k, v in start.push_valid.items()},
               "train_examples": split.n_train, "eval_users": int(len(ev_users)),
               "raw_curves": raw, "head_scales": head_scales,
               # the scratch baseline's loss (picked on valid under scratch_loss "auto") and
               # every loss tried: the kept model's valid nDCG@10, its curve, best and steps
               "scratch_loss": picked, "scratch_by_loss": by_loss,
               "transfer_minus_scratch_ndcg@10": paired,
               # the same two kept models user by user, for pooling seeds (the lab's join_seeds)
               "per_user_ndcg@10": per_user_doc,
               "seconds": seconds}
    ranker = None
    if settings.ranker:  # last: the ranker is fitted to the model exactly as it is saved
        ranker, doc["ranked"], details["ranked_minus_transfer_ndcg@10"], ranked_users = \
            rank_joined(model, split, catalog, settings, device,
                        None if per_user is None else per_user["transfer"])
        if ranked_users is not None and per_user_doc is not None:
            # the ranker's own per-user figures, kept or not (what the market scores from now
            # on is these where it was kept, else the model's "transfer" figures)
            per_user_doc["ranked"] = ranked_users.tolist()
        # what the market scores from now on: the ranker where it was kept, else its model
        doc["best"]["ranked"] = doc["ranked"]["ndcg@10" if ranker is not None
                                              else "model_ndcg@10"]
        seconds["ranker"] = time.perf_counter() - t3
    return JoinOutcome(doc=doc, details=details, model=model, mapping=mapping, ranker=ranker)


def rank_joined(model: MarketModel, split: MarketSplit, catalog: Catalog,
                settings: JoinSettings, device: torch.device, own: np.ndarray | None = None
                ) -> tuple[Ranker | None, dict[str, Any], dict[str, float] | None,
                           np.ndarray | None]:
    """Fit the market's private ranker on its valid split over the kept ``model`` and keep it
    only when its cross-validated valid nDCG@10 beats the model's own on valid (a market with
    few validation users may not have enough to learn from); its figures on the evaluation split
    (with ``eval_split`` "valid", the ranker's own training split, only the cross-validated
    figure), its per-user difference to the model's own scores there (``own``: the model's
    per-user nDCG@10 on the evaluation split when already computed) and its per-user nDCG@10
    there (None with ``eval_split`` "valid")."""
    stats = MarketStats.from_split(split, catalog.n_items)
    ranker = fit_ranker(model, split, stats, device, seed=settings.seed)
    own_valid = float(user_ndcg(model, split, "valid", device).mean())
    kept = ranker.beats(own_valid)
    doc: dict[str, Any] = {"kept": kept, "cv_valid_ndcg@10": ranker.cv_valid_ndcg,
                           "model_valid_ndcg@10": own_valid,
                           "fold_rounds": list(ranker.fold_rounds)}
    if settings.eval_split == "valid":
        return (ranker if kept else None), {**doc, "ndcg@10": ranker.cv_valid_ndcg,
                                            "hr@10": None, "model_ndcg@10": own_valid}, \
            None, None
    ev = split.eval_set(settings.eval_split)
    scores = ranker.rank(model, stats, ev.histories, ev.candidates, device)
    res = summarize_scores(scores, ev.candidates, catalog.item_category, catalog.categories)
    if own is None:
        own = user_ndcg(model, split, settings.eval_split, device)
    ranked_users = ndcg_hr_at_k(scores, 10)[0].numpy()
    diff = paired_bootstrap(ranked_users, own, seed=settings.seed)
    doc |= {"ndcg@10": float(res["ndcg@10"]), "hr@10": float(res["hr@10"]),  # type: ignore[arg-type]
            "model_ndcg@10": float(own.mean())}
    return (ranker if kept else None), doc, diff, ranked_users


def save_joined(out: str | Path, outcome: JoinOutcome, catalog: Catalog,
                config: dict[str, Any]) -> dict[str, str]:
    """Write the joined market's state under ``out`` in the layout a federation run uses:
    ``out/encoder.pt`` (the encoder the heads were tuned with, over ``catalog``) and
    ``out/state/<market>/private.pt`` (the heads, ``save_private``), so ``recommend`` reads it
    and a node started with ``state-dir=out/state`` restores the heads (when the catalog is the
    federation's: ``mapping.same_catalog``)."""
    out = Path(out)
    market = str(outcome.details["market"])
    enc_path, priv_path = out / "encoder.pt", out / "state" / market / "private.pt"
    model = outcome.model
    save_encoder(enc_path, encoder_state(model), model.cfg, catalog.item_ids, catalog.categories,
                 np.asarray(catalog.item_category).tolist(), catalog.fingerprint(), 0,
                 meta={"config": config, "joined_market": market})
    save_private(priv_path, private_state(model), market, catalog.fingerprint(), 0)
    paths = {"encoder": str(enc_path), "private": str(priv_path)}
    if outcome.ranker is not None:
        paths["ranker"] = str(priv_path.parent / RANKER_FILE)
        save_ranker(paths["ranker"], outcome.ranker, market)
    return paths
