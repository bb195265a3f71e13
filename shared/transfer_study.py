"""The join's comparison against a market that starts from nothing: what ``storefed join``
reports beside the joined model, and what the lab's join studies pool over seeds.

* ``scratch_model``: the baseline, a freshly initialised model with the same
  popularity-initialised heads as the joined one (same data, same schedule).
* ``Adversary``: the ``adversarial`` variant's domain-adversarial term (DANN): a discriminator
  behind a gradient-reversal layer on the encoder's pooled user vectors, pseudo-source users
  drawn from the items the federation trained.
* ``steps_to_target`` / ``steps_target_met``: how many local steps each curve needs to reach
  scratch's best, and the target that transfer needs at most a third of scratch's.
* ``user_ndcg``: per-user nDCG@10, for the paired bootstrap of the two kept models.

``shared/transfer.py`` (the join itself) uses these; nothing here joins a market.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from storefed.shared.data import Catalog, MarketSplit
from storefed.shared.metrics import ndcg_hr_at_k
from storefed.shared.model import MarketModel, ModelConfig
from storefed.shared.node import KnnScores, init_heads_from_data, split_scores


# --------------------------------------------------------------------------- the baseline
def scratch_model(mcfg: ModelConfig, catalog: Catalog, split: MarketSplit,
                  seed: int) -> MarketModel:
    """The baseline: a freshly initialised model with the same popularity-initialised heads."""
    torch.manual_seed(seed)
    model = MarketModel(mcfg, torch.as_tensor(np.asarray(catalog.item_category)))
    init_heads_from_data(model, split)
    return model



def user_ndcg(model: MarketModel, split: MarketSplit, which: str, device: torch.device,
              knn: KnnScores | None = None) -> np.ndarray:
    """Per-user nDCG@10 (U,) of ``model`` on the market's valid or test set, scored as
    ``evaluate_split`` scores it."""
    return ndcg_hr_at_k(split_scores(model, split, which, device, knn), 10)[0].numpy()


# ---------------------------------------------------------------- the adversarial variant
class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN401
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN401
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward."""
    out: torch.Tensor = _GradReverse.apply(x, scale)
    return out


class DomainDiscriminator(nn.Module):
    """Source-vs-target classifier on pooled user vectors (logit > 0: source)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


@dataclass
class Adversary:
    """Domain-adversarial term: pseudo-source users from federation-trained items."""

    disc: DomainDiscriminator
    source_items: torch.Tensor  # item indices whose rows the federation trained
    weight: float

    def loss(self, model: MarketModel, target_hist: torch.Tensor,
             gen: torch.Generator) -> torch.Tensor:
        pad = model.encoder.pad
        lengths = (target_hist != pad).sum(dim=1).clamp(min=1)
        b, width = target_hist.shape
        pick = torch.randint(len(self.source_items), (b, width), generator=gen)
        src = self.source_items[pick].to(target_hist.device)
        cols = torch.arange(width, device=target_hist.device).unsqueeze(0)
        src = torch.where(cols < lengths.unsqueeze(1), src, pad)
        feats = torch.cat([model.encoder.pool(src), model.encoder.pool(target_hist)])
        labels = torch.cat([torch.ones(b), torch.zeros(b)]).to(feats.device)
        logits = self.disc(grad_reverse(feats, 1.0))
        return self.weight * F.binary_cross_entropy_with_logits(logits, labels)



# --------------------------------------------------------------------------- steps to the target
def steps_target_met(reach: dict[str, int | None]) -> bool:
    """The issue's steps target on ``{"transfer": a, "scratch": b}`` steps to scratch's best:
    ``a <= b / 3``, with ``a`` reached at all (so ``0 vs 0`` meets it: scratch's best was its
    untrained step 0 and transfer was there at once)."""
    t, s = reach["transfer"], reach["scratch"]
    return t is not None and s is not None and 3 * t <= s


def steps_to_target(curve: list[list[float]], target: float) -> int | None:
    """First step count whose metric reaches ``target`` (None if never)."""
    for steps, value in curve:
        if value >= target - 1e-12:
            return int(steps)
    return None
