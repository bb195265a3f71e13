"""The single-task baseline (``mtl = "single-task"``): one independent model per category.

Multi-task storefed (``shared-bottom``, ``mmoe``) shares one encoder across categories. Its
baseline keeps categories apart completely: category ``c``'s model sees only category ``c``:

* its **input** is the user's history restricted to category-``c`` items (the most recent
  ``max_history`` of them; ``category_histories``),
* its **parameters** are the item-embedding rows of category-``c`` items (every item belongs to
  exactly one category, so the one item table is N disjoint per-category tables), its own user
  tower (``encoder.recencies.<c>`` pooling weights, ``encoder.experts.<c>`` MLP) and its own
  head slice (projection, category bias, item biases),
* it is **trained** on category-``c`` interactions only, against negatives drawn from the
  market's category-``c`` items, in its own pass with its own seed (``train_single_task``); a
  pass starts from the round's snapshot and keeps only what category ``c`` owns, so weight
  decay or a proximal term cannot leak between categories either,
* it is **federated** on its own: the wire update weights tower ``c`` by the market's number of
  category-``c`` examples and item rows by their own counts (``single_task_update``), so a
  market with no data in ``c`` does not dilute ``c``'s tower.

Evaluation uses the same candidate lists as the multi-task models: each candidate is scored by
the model of its own category. ``within_category_metrics`` also ranks the positive only against
the candidates of its own category, which separates representation quality from the
cross-category calibration an independent model cannot learn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

import numpy as np
import torch

from storefed.shared.data import MarketSplit, pad_histories
from storefed.shared.metrics import ndcg_hr_at_k, summarize
from storefed.shared.model import Encoder, MarketModel, ModelConfig
from storefed.shared.train import TrainResult, TrainSettings, score_candidates, train_local
from storefed.shared.wire import ROWWISE_KEY, WEIGHT_PREFIX

PER_CATEGORY_PREFIXES = ("encoder.experts.", "encoder.recencies.")  # then "<c>" or "<c>.*"


class SingleTaskEncoder(Encoder):
    """The item table plus, per category c, its own user tower: recency weights
    ``recencies[c]`` for pooling and the residual MLP ``experts[c]`` (no shared ``recency``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(dataclasses.replace(cfg, n_experts=cfg.n_categories))
        n_pos = len(self.recency)
        del self.recency
        self.recencies = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(n_pos)) for _ in range(cfg.n_categories)])

    def category_user(self, history: torch.Tensor, category: int) -> torch.Tensor:
        """history B x L (category-``category`` items only) -> B x D user vector."""
        h = self.pool(history, self.recencies[category])
        return h + self.experts[category](h)


class SingleTaskModel(MarketModel):
    """N independent per-category models behind the ``MarketModel`` interface.

    ``forward(history, items)`` takes per-category histories ``B x N x L``
    (``category_histories``); a plain ``B x L`` history is filtered per category on the fly
    (exact only when it is not truncated). Each candidate is scored by its category's model.
    """

    encoder: SingleTaskEncoder

    def __init__(self, cfg: ModelConfig, item_category: torch.Tensor) -> None:
        super().__init__(dataclasses.replace(cfg, n_experts=1), item_category)
        self.encoder = SingleTaskEncoder(cfg)

    def category_logits(self, history: torch.Tensor, items: torch.Tensor,
                        category: int) -> torch.Tensor:
        """history B x L, items B x C all of category ``category`` -> logits B x C."""
        user = self.encoder.category_user(history, category)  # B x D
        user = user @ self.heads.proj[category]
        return ((self.encoder.items(items) * user.unsqueeze(1)).sum(-1)
                + self.heads.cat_bias[category] + self.heads.item_bias[items])

    def score_items(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history B x (N x) L, items I shared by the batch -> logits B x I."""
        return self.forward(history, items.unsqueeze(0).expand(history.shape[0], -1))

    def forward(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        n = self.cfg.n_categories
        if history.dim() == 2:
            cats = self.item_category[history]
            history = torch.stack([torch.where(cats == c, history, self.encoder.pad)
                                   for c in range(n)], dim=1)
        users = torch.stack([self.encoder.category_user(history[:, c], c) for c in range(n)],
                            dim=1)  # B x N x D
        users = torch.einsum("bnd,nde->bne", users, self.heads.proj)
        item_cats = self.item_category[items]
        idx = item_cats.unsqueeze(-1).expand(-1, -1, users.shape[-1])
        user_for_item = torch.gather(users, 1, idx)  # B x C x D
        return ((user_for_item * self.encoder.items(items)).sum(-1)
                + self.heads.cat_bias[item_cats] + self.heads.item_bias[items])


class _EncoderView(torch.nn.Module):
    """Category c's encoder parameters under the owner's names (``item_emb``, ``experts.c``,
    ``recencies.c``), so train_local's optimiser and proximal term see exactly those."""

    def __init__(self, owner: SingleTaskEncoder, category: int) -> None:
        super().__init__()
        self.pad = owner.pad
        self.item_emb = owner.item_emb
        self.experts = torch.nn.ModuleDict({str(category): owner.experts[category]})
        self.recencies = torch.nn.ParameterDict({str(category): owner.recencies[category]})


class _CategoryView(torch.nn.Module):
    """What ``train_local`` trains in category c's pass: c's tower and heads, c-only inputs."""

    def __init__(self, owner: SingleTaskModel, category: int) -> None:
        super().__init__()
        self.encoder = _EncoderView(owner.encoder, category)
        self.heads = owner.heads
        self._owner = (owner,)  # a tuple: not registered twice as a submodule
        self.category = category

    def forward(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self._owner[0].category_logits(history, items, self.category)


# --------------------------------------------------------------------- per-category inputs
def _user_sequences(split: MarketSplit, which: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, items, n_rows): interaction sequences, grouped by row and chronological, whose
    tails are the histories of ``which``: "train" = every user's train items (row = user),
    "valid" = an eval user's train items, "test" = those plus the valid item (row = eval row)."""
    users, items = split.train_users, split.train_items
    if which == "train":
        return users, items, split.n_users
    if which not in ("valid", "test"):
        raise ValueError(f"which must be train, valid or test, got {which!r}")
    ev = split.valid if which == "valid" else split.test
    row_of = np.full(split.n_users, -1, dtype=np.int64)
    row_of[ev.users] = np.arange(len(ev.users))
    rows = row_of[users]
    keep = rows >= 0
    rows, items = rows[keep], items[keep]
    if which == "test":  # the valid positive comes right after the train items
        rows = np.concatenate([rows, np.arange(len(ev.users))])
        items = np.concatenate([items, split.valid.candidates[:, 0]])
        order = np.argsort(rows, kind="stable")
        rows, items = rows[order], items[order]
    return rows, items, len(ev.users)


def category_histories(split: MarketSplit, which: str, item_category: np.ndarray,
                       n_categories: int, max_history: int, pad: int) -> np.ndarray:
    """``(rows, N, max_history)`` int64: per row (user for "train", eval user for "valid" /
    "test") and category, the most recent ``max_history`` items of that category the row's
    history holds, right-padded with ``pad``. Depends on category c's items only."""
    rows, items, n_rows = _user_sequences(split, which)
    cats = np.asarray(item_category)[items]
    out = np.full((n_rows, n_categories, max_history), pad, dtype=np.int64)
    for c in range(n_categories):
        sel = cats == c
        r, it = rows[sel], items[sel]
        counts = np.bincount(r, minlength=n_rows)
        seqs = np.split(it, np.cumsum(counts)[:-1])
        out[:, c] = pad_histories(seqs, max_history, pad)
    return out


def center_item_bias(model: SingleTaskModel, split: MarketSplit, counts: np.ndarray) -> None:
    """Start item biases at log-popularity centred within each category (so a category's bias
    does not depend on the other categories' popularity). ``counts``: (n_items + 1,)."""
    bias = torch.log1p(torch.as_tensor(counts, dtype=torch.float32))
    cats = model.item_category
    market = torch.as_tensor(split.items, dtype=torch.long)
    for c in range(model.cfg.n_categories):
        in_c = market[cats[market] == c]
        if len(in_c):
            bias[cats == c] -= bias[in_c].mean()
    bias[model.cfg.n_items] = 0.0
    with torch.no_grad():
        model.heads.item_bias.copy_(bias)


# --------------------------------------------------------------------- training and the wire
def _tower_category(key: str) -> int | None:
    """The category whose tower holds state key ``key`` (None: not a per-category tensor)."""
    for prefix in PER_CATEGORY_PREFIXES:
        if key.startswith(prefix):
            return int(key[len(prefix):].split(".", 1)[0])
    return None


def _owned_mask(key: str, tensor: torch.Tensor, category: int,
                item_category: torch.Tensor) -> torch.Tensor | None:
    """Which entries of a state tensor belong to ``category`` (None: none of it)."""
    if key in (ROWWISE_KEY, "heads.item_bias"):
        mask = item_category == category
        mask[-1] = False  # padding row
        return mask
    owner = _tower_category(key)
    if owner is not None:
        return torch.ones((), dtype=torch.bool) if owner == category else None
    if key.startswith("heads."):  # proj, cat_bias, gate, gate_bias: dim 0 is the category
        mask = torch.zeros(tensor.shape[0], dtype=torch.bool)
        mask[category] = True
        return mask
    return None


def train_single_task(model: SingleTaskModel, split: MarketSplit, max_history: int,
                      settings_for: Callable[[int], TrainSettings], device: torch.device,
                      global_encoder: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """One local round of every category's model, each in its own isolated pass (see module
    doc). ``settings_for(c)`` gives category c's settings (its seed must depend on c only)."""
    model.to(device)
    n_cat = model.cfg.n_categories
    cats = model.item_category.cpu()
    hist = category_histories(split, "train", cats.numpy(), n_cat, max_history,
                              model.encoder.pad)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = {k: v.clone() for k, v in snapshot.items()}
    train_cats = cats[torch.as_tensor(split.train_items, dtype=torch.long)].numpy()
    market_cats = cats[torch.as_tensor(split.items, dtype=torch.long)].numpy()
    loss, examples, steps, seconds = 0.0, 0, 0, 0.0
    for c in range(n_cat):
        sel = train_cats == c
        if not sel.any():
            continue
        model.load_state_dict(snapshot)
        view = cast(MarketModel, _CategoryView(model, c))  # duck-typed: what train_local uses
        res = train_local(view, split.train_users[sel],
                          split.train_items[sel], hist[:, c], split.items[market_cats == c],
                          settings_for(c), device, global_encoder=global_encoder)
        trained = model.state_dict()
        for k, v in merged.items():
            mask = _owned_mask(k, v, c, cats.to(v.device))
            if mask is None:
                continue
            if mask.dim() == 0:
                v.copy_(trained[k])
            else:
                v[mask] = trained[k][mask]
        loss += res.loss * res.examples
        examples += res.examples
        steps += res.steps
        seconds += res.seconds
    model.load_state_dict(merged)
    return TrainResult(loss=loss / max(examples, 1), examples=examples, steps=steps,
                       seconds=seconds)


def single_task_update(local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor],
                       split: MarketSplit, item_category: np.ndarray,
                       row_counts: np.ndarray | None) -> dict[str, np.ndarray]:
    """The wire update (``shared.wire`` format) with per-category weights: tower ``c`` is
    weighted by this market's number of category-c training examples, the item table by
    ``row_counts`` (rowwise) or by all examples, any other tensor by all examples."""
    if set(local) != set(global_):
        raise KeyError(f"encoder keys differ: {sorted(set(local) ^ set(global_))}")
    per_cat = np.bincount(np.asarray(item_category)[split.train_items],
                          minlength=int(np.max(item_category, initial=0)) + 1)
    out: dict[str, np.ndarray] = {}
    for k in sorted(local):
        delta = (local[k].float() - global_[k].float()).cpu().numpy()
        if k == ROWWISE_KEY and row_counts is not None:
            w = np.asarray(row_counts, dtype=np.float32)
            out[k] = (delta * w[:, None]).astype(np.float32)
        else:
            n = float(split.n_train)
            c = _tower_category(k)
            if c is not None:
                n = float(per_cat[c]) if c < len(per_cat) else 0.0
            w = np.asarray([n], dtype=np.float32)
            out[k] = (delta * w[0]).astype(np.float32)
        out[WEIGHT_PREFIX + k] = w
    return out


# --------------------------------------------------------------------- evaluation
def within_category_scores(scores: torch.Tensor, candidates: np.ndarray,
                           item_category: np.ndarray) -> torch.Tensor:
    """Scores with every candidate outside the positive's category pushed to -inf, so the
    positive is ranked only against negatives of its own category."""
    cats = torch.as_tensor(np.asarray(item_category)[candidates])
    same = cats == cats[:, :1]
    return torch.where(same, scores, torch.full_like(scores, -torch.inf))


def within_category_metrics(model: MarketModel, histories: np.ndarray, candidates: np.ndarray,
                            item_category: np.ndarray, category_names: tuple[str, ...],
                            device: torch.device) -> dict[str, dict[str, object]]:
    """``{"mixed": summary, "within": summary, "top10": counts}`` on the same candidate lists:
    mixed = the usual protocol, within = own-category negatives only (``summarize`` format,
    per category); top10 = per category, how many of all users' top-10 slots its items take
    and how many candidates it had (a calibration check across categories)."""
    if len(candidates) == 0:
        empty = summarize(np.zeros(0), np.zeros(0))
        return {"mixed": empty, "within": empty, "top10": {}}
    scores = score_candidates(model, histories, candidates, device)
    cand_cat = np.asarray(item_category)[candidates]
    pos_cat = cand_cat[:, 0]
    out: dict[str, dict[str, object]] = {}
    for name, s in (("mixed", scores),
                    ("within", within_category_scores(scores, candidates, item_category))):
        ndcg, hr = ndcg_hr_at_k(s, 10)
        out[name] = summarize(ndcg.numpy(), hr.numpy(), pos_cat, category_names)
    top = np.take_along_axis(cand_cat, torch.topk(scores, min(10, scores.shape[1]),
                                                  dim=1).indices.numpy(), axis=1)
    n = len(category_names)
    slots, cands = np.bincount(top.ravel(), minlength=n), np.bincount(cand_cat.ravel(),
                                                                      minlength=n)
    out["top10"] = {category_names[c]: {"slots": int(slots[c]), "candidates": int(cands[c])}
                    for c in range(n) if cands[c]}
    return out
