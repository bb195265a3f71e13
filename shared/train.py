"""Local training and evaluation of one market's model (used by clients, baselines and join)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from storefed.shared.metrics import ndcg_hr_at_k, summarize
from storefed.shared.model import MarketModel


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(name)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 512
    lr: float = 0.003
    encoder_lr_scale: float = 1.0
    weight_decay: float = 0.0
    negatives: int = 4
    loss: str = "bce"
    proximal_mu: float = 0.0
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimiser steps (learning curves)
    # "causal": a positive's input is the user's items *before* it (what the test sees);
    # "bag": all the user's other training items (order-free, leave-one-out)
    history: str = "bag"
    history_dropout: float = 0.0  # drop each input history item with this probability


@dataclass(frozen=True)
class TrainResult:
    loss: float
    examples: int
    steps: int
    seconds: float


HISTORY_MODES = ("causal", "bag")
#: ``full-softmax`` over a market with more items than this scores a uniform sample of this
#: many of them per batch (shared by the batch) instead: same estimator, bounded cost
FULL_SOFTMAX_MAX_ITEMS = 2048


def adam(params: list[torch.nn.Parameter] | list[dict[str, object]], lr: float = 0.003,
         weight_decay: float = 0.0) -> torch.optim.Adam:
    """torch's Adam in its fused form (one kernel for every parameter; on CPU ~8x faster per
    step than the default per-tensor loop over the 8k x 64 item table, same update rule)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def ranking_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """logits: B x (1 + n) with the positive in column 0 -> scalar loss. ``full-softmax``
    is softmax cross-entropy like ``softmax`` (its columns are then every market item)."""
    if kind == "bce":
        target = torch.zeros_like(logits)
        target[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bpr":
        return -F.logsigmoid(logits[:, :1] - logits[:, 1:]).mean()
    if kind in ("softmax", "full-softmax"):
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long,
                                                    device=logits.device))
    raise ValueError(f"unknown loss {kind!r}")


def train_local(
    model: MarketModel,
    train_users: np.ndarray,
    train_items: np.ndarray,
    train_histories: np.ndarray,
    market_items: np.ndarray,
    settings: TrainSettings,
    device: torch.device,
    global_encoder: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train on a market's interactions: each (user, item) is a positive scored against
    ``settings.negatives`` items drawn uniformly from the market's items; the user's history
    with the target masked out is the input. Only parameters with ``requires_grad`` move.
    ``global_encoder`` with ``proximal_mu > 0`` adds FedProx's mu/2 * ||w - w_global||^2."""
    t0 = time.perf_counter()
    model.to(device).train()
    gen = torch.Generator().manual_seed(settings.seed)
    users = torch.as_tensor(train_users, dtype=torch.long)
    items = torch.as_tensor(train_items, dtype=torch.long)
    hist_all = torch.as_tensor(train_histories, dtype=torch.long).to(device)
    pool = torch.as_tensor(market_items, dtype=torch.long).to(device)
    enc_params = [p for p in model.encoder.parameters() if p.requires_grad]
    head_params = [p for n, p in model.named_parameters()
                   if not n.startswith("encoder.") and p.requires_grad]
    groups = [{"params": head_params, "lr": settings.lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": settings.lr * settings.encoder_lr_scale})
    opt = adam(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    prox = None
    if global_encoder is not None and settings.proximal_mu > 0:
        prox = {n: global_encoder[f"encoder.{n}"].to(device)
                for n, p in model.encoder.named_parameters() if p.requires_grad}
    n = len(users)
    total, steps, seen = 0.0, 0, 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, settings.batch_size):
            if settings.max_steps is not None and steps >= settings.max_steps:
                break
            idx = order[start:start + settings.batch_size]
            u = users[idx].to(device)
            pos = items[idx].to(device)
            hist = input_histories(hist_all[u], pos, model.encoder.pad, settings.history)
            hist = drop_history(hist, model.encoder.pad, settings.history_dropout, gen)
            loss = ranking_loss(batch_logits(model, hist, pos, pool, settings, gen),
                                settings.loss)
            if prox is not None:
                loss = loss + settings.proximal_mu / 2 * sum(
                    ((p - prox[n_]) ** 2).sum() for n_, p in model.encoder.named_parameters()
                    if n_ in prox)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
    return TrainResult(loss=total / max(seen, 1), examples=seen, steps=steps,
                       seconds=time.perf_counter() - t0)


def train_joint(
    models: list[MarketModel],
    data: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    settings: TrainSettings,
    device: torch.device,
) -> TrainResult:
    """Pooled ("central") training of several markets' models that share parameters (e.g. one
    encoder object): per epoch every market's batches, interleaved in a random order, under a
    single optimiser. ``data[k]`` = (train_users, train_items, train_histories, market_items)
    of ``models[k]``; batches, inputs and losses are built exactly as in ``train_local``."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    params: dict[int, torch.nn.Parameter] = {}
    for m in models:
        m.to(device).train()
        for p in m.parameters():
            if p.requires_grad:
                params.setdefault(id(p), p)
    opt = adam(list(params.values()), lr=settings.lr, weight_decay=settings.weight_decay)
    tensors = [(torch.as_tensor(u, dtype=torch.long), torch.as_tensor(i, dtype=torch.long),
                torch.as_tensor(h, dtype=torch.long).to(device),
                torch.as_tensor(pool, dtype=torch.long).to(device)) for u, i, h, pool in data]
    total, steps, seen = 0.0, 0, 0
    for _ in range(settings.epochs):
        batches = []
        for k, (users, _, _, _) in enumerate(tensors):
            order = torch.randperm(len(users), generator=gen)
            batches += [(k, order[s:s + settings.batch_size])
                        for s in range(0, len(users), settings.batch_size)]
        for j in torch.randperm(len(batches), generator=gen).tolist():
            k, idx = batches[j]
            users, items, hist_all, pool = tensors[k]
            model = models[k]
            pos = items[idx].to(device)
            hist = input_histories(hist_all[users[idx].to(device)], pos, model.encoder.pad,
                                   settings.history)
            hist = drop_history(hist, model.encoder.pad, settings.history_dropout, gen)
            loss = ranking_loss(batch_logits(model, hist, pos, pool, settings, gen),
                                settings.loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            steps += 1
    return TrainResult(loss=total / max(seen, 1), examples=seen, steps=steps,
                       seconds=time.perf_counter() - t0)


def drop_history(hist: torch.Tensor, pad: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """Training-time item dropout: each history entry becomes padding with probability ``p``
    (``p = 0``: ``hist`` unchanged, and no random numbers are drawn)."""
    if p <= 0:
        return hist
    drop = torch.rand(hist.shape, generator=gen).to(hist.device) < p
    return torch.where(drop, pad, hist)


def input_histories(hist: torch.Tensor, pos: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """The model input for positives ``pos`` (B,) of users whose histories are ``hist`` (B x L,
    oldest first, right-padded). ``bag``: the history without the positive. ``causal``: only
    the items before the positive; a positive not in the window (it is older than the window)
    falls back to ``bag``."""
    at = hist == pos.unsqueeze(1)
    if mode == "bag":
        return torch.where(at, pad, hist)
    if mode != "causal":
        raise ValueError(f"unknown history mode {mode!r}; known: {', '.join(HISTORY_MODES)}")
    found = at.any(dim=1, keepdim=True)
    before = at.long().cumsum(dim=1) == 0  # strictly before the positive's position
    return torch.where(torch.where(found, before, ~at), hist, pad)


def batch_logits(model: torch.nn.Module, hist: torch.Tensor, pos: torch.Tensor,
                 pool: torch.Tensor, settings: TrainSettings,
                 gen: torch.Generator) -> torch.Tensor:
    """B x (1 + n) logits, positive first: ``full-softmax`` scores every item of ``pool`` (the
    positive's own column masked out) when the model can (``score_items``), otherwise (and for
    the other losses) ``settings.negatives`` items drawn uniformly from ``pool``."""
    if (settings.loss == "full-softmax" and isinstance(model, MarketModel)
            and type(model).forward is MarketModel.forward):
        if len(pool) > FULL_SOFTMAX_MAX_ITEMS:
            pick = torch.randperm(len(pool), generator=gen)[:FULL_SOFTMAX_MAX_ITEMS]
            pool = pool[pick.to(pool.device)]
        return model.score_positive_and_items(hist, pos, pool)  # B x (1 + I), own col -inf
    neg = pool[torch.randint(len(pool), (len(pos), settings.negatives),
                             generator=gen).to(pool.device)]
    return model(hist, torch.cat([pos.unsqueeze(1), neg], dim=1))




@torch.no_grad()
def score_candidates(model: MarketModel, histories: np.ndarray, candidates: np.ndarray,
                     device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """histories U x L, candidates U x C -> logits U x C (CPU)."""
    model.to(device).eval()
    out = []
    for s in range(0, len(candidates), batch_size):
        h = torch.as_tensor(histories[s:s + batch_size], dtype=torch.long, device=device)
        c = torch.as_tensor(candidates[s:s + batch_size], dtype=torch.long, device=device)
        out.append(model(h, c).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, candidates.shape[1])


def evaluate(model: MarketModel, histories: np.ndarray, candidates: np.ndarray,
             item_category: np.ndarray, category_names: tuple[str, ...],
             device: torch.device) -> dict[str, object]:
    """nDCG@10 / HR@10 overall and per category of the held-out positive (column 0)."""
    return summarize_scores(score_candidates(model, histories, candidates, device), candidates,
                            item_category, category_names)


def summarize_scores(scores: torch.Tensor, candidates: np.ndarray, item_category: np.ndarray,
                     category_names: tuple[str, ...]) -> dict[str, object]:
    """U x C candidate scores (positive in column 0) -> ``evaluate``'s dict."""
    if len(candidates) == 0:
        return summarize(np.zeros(0), np.zeros(0))
    ndcg, hr = ndcg_hr_at_k(scores, 10)
    return summarize(ndcg.numpy(), hr.numpy(), item_category[candidates[:, 0]], category_names)
