"""The storefed model: a shared bottom encoder and private per-category heads.

Read top to bottom:

* ``Encoder`` (shared, federated): item embeddings over the global catalog and a user tower that
  turns a user's interaction history into ``K`` expert representations. There are no per-user
  parameters anywhere, so any user (and any new market) is scorable from history alone.
  ``K = 1`` is hard parameter sharing ("shared-bottom"); ``K > 1`` gives MMoE-style experts.
* ``CategoryHeads`` (private, never leaves the market): per category a softmax gate over the
  experts, a D x D projection (initialised to identity, so fresh heads score by the encoder's
  dot product: useful zero-shot), a category bias, and the market's own item-popularity bias.
  Heads output logits.
* ``MarketModel`` wires the two: ``logits = heads(encoder.users(history), encoder.items(cands))``.

The split/merge helpers at the bottom define what travels (``encoder.*``) and what stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ENCODER_PREFIX = "encoder."
#: the encoder's item-embedding table (I x D): the one tensor with a row per catalog item
ITEM_EMB_KEY = ENCODER_PREFIX + "item_emb.weight"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a model; saved in every checkpoint so mismatches are caught on load."""

    n_items: int
    n_categories: int
    dim: int = 64
    n_experts: int = 1
    history_len: int = 50  # recency weights: one per position counted back from the latest
    history_layers: int = 0  # self-attention blocks over the history before pooling (0 = none)

    def to_dict(self) -> dict[str, int]:
        return {"n_items": self.n_items, "n_categories": self.n_categories, "dim": self.dim,
                "n_experts": self.n_experts, "history_len": self.history_len,
                "history_layers": self.history_layers}


class HistoryBlock(nn.Module):
    """Pre-norm self-attention + feed-forward block over a user's history items (each item
    attends to the user's other items, with a learned embedding of its recency position).
    Both residual branches end in zero-initialised projections: a fresh block is the identity,
    so the encoder starts as the plain pooled model."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        last = nn.Linear(dim, dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), last)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """x B x L x D, pad_mask B x L (True = padding) -> B x L x D."""
        y = self.norm1(x)
        x = x + self.attn(y, y, y, key_padding_mask=pad_mask, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class Encoder(nn.Module):
    """Shared bottom. Item table: (n_items + 1) x D, the last row is the (zero) padding row.

    The user tower pools the history with learned recency weights: the item ``r`` steps back
    from the latest one weighs ``exp(recency[r])`` (positions beyond ``history_len`` share the
    last weight). They start at 0, i.e. a plain (square-root normalised) sum.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pad = cfg.n_items
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.dim, padding_idx=cfg.n_items)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        with torch.no_grad():
            self.item_emb.weight[cfg.n_items].zero_()
        self.recency = nn.Parameter(torch.zeros(max(1, cfg.history_len)))
        self.blocks = nn.ModuleList(HistoryBlock(cfg.dim) for _ in range(cfg.history_layers))
        self.position = (nn.Parameter(torch.zeros(max(1, cfg.history_len), cfg.dim))
                         if cfg.history_layers else None)
        experts = []
        for _ in range(cfg.n_experts):
            first, last = nn.Linear(cfg.dim, cfg.dim), nn.Linear(cfg.dim, cfg.dim)
            nn.init.zeros_(last.weight)  # residual experts start as the identity map
            nn.init.zeros_(last.bias)
            experts.append(nn.Sequential(first, nn.GELU(), last))
        self.experts = nn.ModuleList(experts)

    def pool(self, history: torch.Tensor, recency: torch.Tensor | None = None) -> torch.Tensor:
        """history: B x L item indices (right-padded, oldest first) -> B x D recency-weighted,
        square-root normalised sum of their embeddings (zero for an empty history).
        ``recency``: other weights than ``self.recency`` (the single-task towers' own)."""
        rec = self.recency if recency is None else recency
        mask = (history != self.pad).to(self.item_emb.weight.dtype)
        # steps back from the latest item = items at or after this position, minus one
        back = mask.flip(1).cumsum(1).flip(1) - 1
        back = back.clamp(min=0, max=len(rec) - 1).long()
        weight = torch.exp(rec[back]) * mask  # B x L
        norm = weight.sum(dim=1, keepdim=True).clamp(min=1e-6).sqrt()
        if len(self.blocks) and self.position is not None:
            vecs = self._attend(self.item_emb(history), back, mask)
            return (vecs * weight.unsqueeze(-1)).sum(dim=1) / norm
        # the same weighted sum, fused: never materialises B x L x D (2x faster fwd + bwd)
        summed = F.embedding_bag(history, self.item_emb.weight, per_sample_weights=weight,
                                 mode="sum", padding_idx=self.pad)
        return summed / norm

    def _attend(self, vecs: torch.Tensor, back: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """The history blocks over the (right-padded) history, trimmed to the batch's longest."""
        assert self.position is not None
        length = max(int(mask.sum(dim=1).max().item()), 1)
        x = vecs[:, :length] + self.position[back[:, :length].clamp(max=len(self.position) - 1)]
        pad_mask = mask[:, :length] == 0
        pad_mask[:, 0] = False  # an empty history attends to its (zero) padding: no NaN
        for block in self.blocks:
            x = block(x, pad_mask)
        return torch.cat([x, vecs[:, length:]], dim=1)

    def users(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """history: B x L -> (pooled B x D, experts B x K x D)."""
        h = self.pool(history)
        return h, torch.stack([h + expert(h) for expert in self.experts], dim=1)

    def items(self, items: torch.Tensor) -> torch.Tensor:
        """items: B x C -> B x C x D."""
        return self.item_emb(items)


class CategoryHeads(nn.Module):
    """Private heads: one gate, projection and bias per category, plus market item biases."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        k, d = cfg.n_experts, cfg.dim
        self.gate = nn.Parameter(torch.zeros(cfg.n_categories, k, d))
        self.gate_bias = nn.Parameter(torch.zeros(cfg.n_categories, k))
        self.proj = nn.Parameter(torch.eye(d).repeat(cfg.n_categories, 1, 1))
        self.cat_bias = nn.Parameter(torch.zeros(cfg.n_categories))
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_items + 1))
        # weight of the market's private item-kNN score per category: not trained by the
        # loss but picked on the market's validation split (MarketNode.calibrate_knn); used
        # only when the model has an ``item_sim`` attached (MarketModel.attach_item_similarity)
        self.knn_weight = nn.Parameter(torch.zeros(cfg.n_categories), requires_grad=False)

    def user_vectors(self, pooled: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """pooled B x D, experts B x K x D -> the user's vector per category, B x N x D."""
        gates = torch.softmax(torch.einsum("bd,nkd->bnk", pooled, self.gate) + self.gate_bias,
                              dim=-1)  # B x N x K
        mixed = torch.einsum("bnk,bkd->bnd", gates, experts)  # B x N x D
        return torch.einsum("bnd,nde->bne", mixed, self.proj)  # B x N x D

    def score_all(self, user_per_cat: torch.Tensor, item_vecs: torch.Tensor,
                  items: torch.Tensor, item_cats: torch.Tensor) -> torch.Tensor:
        """user_per_cat B x N x D, item_vecs I x D, items/item_cats I (one shared candidate
        list) -> logits B x I, without materialising B x I x D."""
        bias = self.cat_bias[item_cats] + self.item_bias[items]  # I
        if user_per_cat.shape[1] == 1:  # one category: bias + U @ V^T in one kernel
            return torch.addmm(bias, user_per_cat[:, 0], item_vecs.T)
        dots = user_per_cat.new_zeros(user_per_cat.shape[0], item_vecs.shape[0])
        for c in torch.unique(item_cats).tolist():
            sel = (item_cats == c).nonzero(as_tuple=True)[0]
            dots[:, sel] = user_per_cat[:, c] @ item_vecs[sel].T
        return dots + bias

    def forward(self, pooled: torch.Tensor, experts: torch.Tensor, item_vecs: torch.Tensor,
                items: torch.Tensor, item_cats: torch.Tensor) -> torch.Tensor:
        """pooled B x D, experts B x K x D, item_vecs B x C x D, items/item_cats B x C
        -> logits B x C (each candidate scored by the head of its own category)."""
        return self.score_pairs(self.user_vectors(pooled, experts), item_vecs, items, item_cats)

    def score_pairs(self, user_per_cat: torch.Tensor, item_vecs: torch.Tensor,
                    items: torch.Tensor, item_cats: torch.Tensor) -> torch.Tensor:
        """user_per_cat B x N x D, item_vecs B x C x D, items/item_cats B x C -> logits B x C."""
        idx = item_cats.unsqueeze(-1).expand(-1, -1, user_per_cat.shape[-1])
        user_for_item = torch.gather(user_per_cat, 1, idx)  # B x C x D
        return ((user_for_item * item_vecs).sum(-1) + self.cat_bias[item_cats]
                + self.item_bias[items])


class MarketModel(nn.Module):
    """One market's model: the shared encoder plus that market's private heads."""

    def __init__(self, cfg: ModelConfig, item_category: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.heads = CategoryHeads(cfg)
        cats = torch.as_tensor(item_category, dtype=torch.long)
        # the padding row gets category 0; it is never a candidate
        self.item_category: torch.Tensor
        self.register_buffer("item_category", torch.cat([cats, cats.new_zeros(1)]),
                             persistent=False)
        #: the market's private item-item similarity (shared/itemsim.py); None = not used
        self.item_sim: nn.Module | None = None

    def attach_item_similarity(self, sim: nn.Module | None) -> None:
        """In eval mode, add ``heads.knn_weight[category] * sim.scores(history, item)`` to
        every logit (``sim``: a ``shared.itemsim.ItemSimilarity``, buffers only, never in a
        state). Training never sees it: measured on XMarket validation, the neural score
        trained alone and mixed afterwards beat training the two jointly."""
        self.item_sim = sim

    def knn_scores(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor | float:
        """The weighted item-kNN term of the logits (0 in training or without ``item_sim``)."""
        if self.item_sim is None or self.training:
            return 0.0
        knn = self.item_sim.scores(history, items)  # type: ignore[operator]
        return self.heads.knn_weight[self.item_category[items]] * knn

    def neural_logits(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history B x L, items B x C -> the encoder and heads' logits B x C, without the
        item-kNN term (``forward`` adds it); the model is not modified (safe to share)."""
        pooled, experts = self.encoder.users(history)
        return self.heads(pooled, experts, self.encoder.items(items), items,
                          self.item_category[items])

    def forward(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history B x L, items B x C -> logits B x C."""
        return self.neural_logits(history, items) + self.knn_scores(history, items)

    def score_positive_and_items(self, history: torch.Tensor, pos: torch.Tensor,
                                 items: torch.Tensor) -> torch.Tensor:
        """history B x L, pos B, items I -> logits B x (1 + I): ``forward(history, pos)`` then
        ``score_items(history, items)`` with each row's own positive among ``items`` set to
        -inf (training's full softmax: the positive is column 0 only). The user tower runs
        once and the -inf entries are written in place (O(B), no B x I mask)."""
        pooled, experts = self.encoder.users(history)
        user_per_cat = self.heads.user_vectors(pooled, experts)
        first = self.heads.score_pairs(user_per_cat, self.encoder.items(pos.unsqueeze(1)),
                                       pos.unsqueeze(1), self.item_category[pos.unsqueeze(1)])
        rest = self.heads.score_all(user_per_cat, self.encoder.items(items), items,
                                    self.item_category[items])
        if self.item_sim is not None and not self.training:
            first = first + self.knn_scores(history, pos.unsqueeze(1))
            rest = rest + self.knn_scores(history, items)
        column = torch.full((self.encoder.pad + 1,), -1, dtype=torch.long, device=items.device)
        column[items] = torch.arange(len(items), device=items.device)
        col = column[pos]
        rows = (col >= 0).nonzero(as_tuple=True)[0]
        rest = rest.index_put_((rows, col[rows]), rest.new_tensor(float("-inf")))
        return torch.cat([first, rest], dim=1)

    def score_items(self, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """history B x L, items I (one candidate list shared by the batch) -> logits B x I;
        equals ``forward(history, items.expand(B, -1))`` at a fraction of the memory."""
        pooled, experts = self.encoder.users(history)
        return self.heads.score_all(self.heads.user_vectors(pooled, experts),
                                    self.encoder.items(items), items,
                                    self.item_category[items]) + self.knn_scores(history, items)


# --------------------------------------------------------------------- what travels, what stays
def encoder_state(model: MarketModel) -> dict[str, torch.Tensor]:
    """The tensors that travel to the server (``encoder.*``), detached CPU copies."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if k.startswith(ENCODER_PREFIX)}


def private_state(model: MarketModel) -> dict[str, torch.Tensor]:
    """The tensors that never leave the market (heads and anything else not in the encoder)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.startswith(ENCODER_PREFIX)}


def load_parts(model: MarketModel, encoder: dict[str, torch.Tensor] | None = None,
               private: dict[str, torch.Tensor] | None = None) -> None:
    """Load an encoder state and/or a private state into ``model`` (strict on each part)."""
    own = model.state_dict()
    for part, expected in ((encoder, {k for k in own if k.startswith(ENCODER_PREFIX)}),
                           (private, {k for k in own if not k.startswith(ENCODER_PREFIX)})):
        if part is None:
            continue
        if set(part) != expected:
            missing, extra = sorted(expected - set(part)), sorted(set(part) - expected)
            raise KeyError(f"state keys differ: missing {missing}, unexpected {extra}")
        for k, v in part.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"shape of {k}: expected {tuple(own[k].shape)}, "
                                 f"got {tuple(v.shape)}")
        model.load_state_dict(part, strict=False)


def set_encoder_trainable(model: MarketModel, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) the shared encoder; heads stay trainable."""
    for p in model.encoder.parameters():
        p.requires_grad_(trainable)
