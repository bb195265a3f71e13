"""Per-market metrics on the wire (flat MetricRecord keys) and in ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from storefed.shared.checkpoint import atomic_write_bytes

CAT_PREFIX = "cat/"
METRIC_NAMES = ("ndcg@10", "hr@10", "examples")
# a market's validation figures travel as ``valid/<name>`` beside its test figures, and land in
# metrics.json as ``valid_<name>``: runs choose rounds on them, never on test
VALID_METRICS = ("ndcg@10", "hr@10")


def flatten_eval(summary: dict[str, Any]) -> dict[str, float]:
    """``summarize()`` output -> flat numeric keys (``cat/<name>/ndcg@10`` for categories)."""
    flat = {k: float(summary[k]) for k in METRIC_NAMES}
    for cat, vals in summary.get("categories", {}).items():
        for k in METRIC_NAMES:
            flat[f"{CAT_PREFIX}{cat}/{k}"] = float(vals[k])
    return flat


def unflatten_eval(flat: dict[str, float]) -> dict[str, Any]:
    """Inverse of ``flatten_eval``; other keys (loss, timings) are kept as they are."""
    out: dict[str, Any] = {}
    cats: dict[str, dict[str, float | int]] = {}
    for k, v in flat.items():
        if k.startswith(CAT_PREFIX):
            cat, name = k[len(CAT_PREFIX):].rsplit("/", 1)
            cats.setdefault(cat, {})[name] = int(v) if name == "examples" else float(v)
        else:
            out[k] = int(v) if k == "examples" else float(v)
    out["categories"] = dict(sorted(cats.items()))
    return out


def average(markets: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean over markets (each market counts once, as in the XMarket papers); the
    validation figures too when every market has them."""
    if not markets:
        return {"ndcg@10": 0.0, "hr@10": 0.0}
    keys = ["ndcg@10", "hr@10"] + [f"valid_{k}" for k in VALID_METRICS
                                   if all(m.get(f"valid_{k}") is not None
                                          for m in markets.values())]
    return {k: sum(float(m[k]) for m in markets.values()) / len(markets) for k in keys}


def write_metrics(path: str | Path, rounds: list[dict[str, Any]],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``metrics.json`` atomically; ``final`` is the last round's per-market metrics."""
    final_markets = rounds[-1]["markets"] if rounds else {}
    doc: dict[str, Any] = {"rounds": rounds,
                           "final": {"markets": final_markets, "average": average(final_markets)}}
    if extra:
        doc.update(extra)
    atomic_write_bytes(path, json.dumps(doc, indent=2, sort_keys=False).encode())
    return doc
