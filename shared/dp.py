"""Client-level differential privacy for the secure-aggregated encoder (distributed DP).

Each market clips its encoder delta to L2 norm ``dp-clip`` (Flower's ``clip_inputs_inplace``,
the FlatClip of McMahan et al. 2018) and adds Gaussian noise of standard deviation
``dp-noise * dp-clip / sqrt(n)`` where ``n`` is the number of markets sampled for the round. The
server only sees the SecAgg+ sum, whose noise is ``N(0, (dp-noise * dp-clip)^2)`` when all ``n``
contribute: the Gaussian mechanism with noise multiplier ``dp-noise`` on a sum with client-level
sensitivity ``dp-clip``. When some markets drop, the sum holds less noise: the round is
accounted with the effective multiplier ``dp-noise * sqrt(survivors / n)``.

Updates are then unweighted (weight 1 per market, no row counts: counts would reveal which items
a market's users bought and are not bounded by the clip), so the aggregate is the plain mean of
the clipped, noised deltas.

Epsilon: Flower's ``RdpAccountant`` (Renyi DP via Google's ``dp-accounting``), composed once per
round, without sampling amplification (every market takes part in every round), neighbouring
populations = add or remove one market. If ``dp-accounting`` is not installed, the closed-form
RDP of the Gaussian mechanism, ``alpha / (2 sigma^2)`` per release, with the standard conversion
``eps = min_alpha rdp(alpha) + log(1/delta) / (alpha - 1)``, gives a slightly looser epsilon.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm


def privatize(local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor], clip: float,
              noise_std: float, rng: np.random.Generator,
              ) -> tuple[dict[str, torch.Tensor], float]:
    """``global + clip(local - global) + N(0, noise_std^2)`` per coordinate; returns the new
    local state and the delta's L2 norm before clipping."""
    keys = sorted(global_)
    deltas = [(local[k].double() - global_[k].double()).cpu().numpy() for k in keys]
    norm = get_norm(deltas)
    if clip > 0 and norm > 0:
        clip_inputs_inplace(deltas, clip)
    out: dict[str, torch.Tensor] = {}
    for k, d in zip(keys, deltas, strict=True):
        if noise_std > 0:
            d = d + rng.normal(0.0, noise_std, size=d.shape)
        out[k] = (global_[k].double() + torch.from_numpy(d)).to(global_[k].dtype)
    return out, float(norm)


def delta_norm(local: dict[str, torch.Tensor], global_: dict[str, torch.Tensor]) -> float:
    """L2 norm of ``local - global`` over every tensor. In torch, not ``np.linalg.norm``: a
    BLAS dot product wakes OpenBLAS's threads, whose spinning nearly doubled the CPU time of a
    SecAgg+ round on 2 cores (``storefed benchmark-secagg --engine inprocess``)."""
    total = 0.0
    for k in sorted(global_):
        d = local[k].double() - global_[k].double()
        total += float((d * d).sum())
    return math.sqrt(total)


def client_noise_std(noise_multiplier: float, clip: float, n_sampled: int) -> float:
    """Per-client noise so that the sum over ``n_sampled`` clients has std ``sigma * clip``."""
    return noise_multiplier * clip / math.sqrt(max(1, n_sampled))


def effective_multiplier(noise_multiplier: float, n_sampled: int, n_summed: int) -> float:
    """Noise multiplier of the sum when only ``n_summed`` of ``n_sampled`` noise shares arrive."""
    return noise_multiplier * math.sqrt(n_summed / max(1, n_sampled))


def closed_form_epsilon(multipliers: list[float], delta: float) -> float:
    """Epsilon of composed Gaussian releases (no sampling) from their RDP curves."""
    if not multipliers:
        return 0.0
    if min(multipliers) <= 0:
        return math.inf
    inv = sum(1.0 / (2.0 * s * s) for s in multipliers)
    orders = [1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 512))
    return min(a * inv + math.log(1.0 / delta) / (a - 1.0) for a in orders)


def epsilon_spent(multipliers: list[float], delta: float, population: int) -> dict[str, Any]:
    """Cumulative (epsilon, delta) of one Gaussian release per entry of ``multipliers``."""
    if not multipliers:
        return {"epsilon": 0.0, "delta": delta, "releases": 0, "method": "none"}
    if min(multipliers) <= 0:
        return {"epsilon": math.inf, "delta": delta, "releases": len(multipliers),
                "method": "no noise"}
    try:
        from flwr.serverapp import RdpAccountant  # noqa: PLC0415 - needs dp-accounting
        from flwr.supercore.privacy_accounting import (  # noqa: PLC0415
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )

        acc = RdpAccountant(PrivacyConfig(
            target_delta=delta, population_size=max(1, population),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        for s in multipliers:
            acc.compose(GaussianPrivacyEvent(noise_multiplier=s, sample_size=max(1, population),
                                             population_size=max(1, population)))
        spent = acc.get_privacy_spent()
        return {"epsilon": spent.epsilon, "delta": delta, "releases": len(multipliers),
                "method": "flwr RdpAccountant"}
    except ImportError:
        return {"epsilon": closed_form_epsilon(multipliers, delta), "delta": delta,
                "releases": len(multipliers), "method": "closed-form Gaussian RDP"}
