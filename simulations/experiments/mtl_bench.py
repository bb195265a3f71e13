"""``storefed benchmark-mtl``: single-task vs shared-bottom vs MMoE, federated, per category.

For every method (``mtl`` = single-task, shared-bottom, mmoe) and seed, one federated run over
all selected markets (``--engine flower``: Flower's simulation engine, exactly as
``storefed simulate``; ``--engine inprocess``: the same ``MarketNode`` code and the same
sum-of-weighted-deltas aggregation in one process, no transport). Each run's ``metrics.json``
(per market, per category, as sent client -> server) is kept under ``OUT/runs/``. After the
last round every market's final model is scored once more on the same test candidates:

* ``mixed``: the usual protocol (positive vs the 99 sampled negatives of any category); it must
  equal what the federation reported (checked, ``max_mixed_diff``),
* ``within``: the positive vs only the negatives of its own category (no cross-category
  calibration needed: the representation-quality view).

Per category a metric is pooled over all markets' test users whose held-out item is in that
category; "average across categories" is the unweighted mean over categories. Small
categories = bottom third by training examples. Writes ``OUT/benchmark.json`` (methods in the
main benchmark's shape plus ``categories``, ``comparison``) and ``OUT/mtl_compare.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storefed.shared.checkpoint import atomic_write_bytes, load_encoder
from storefed.shared.config import MTL_MODES, RunConfig
from storefed.shared.data import ReaderOptions, load_catalog
from storefed.shared.errors import ConfigError
from storefed.shared.model import load_parts
from storefed.shared.mtl import within_category_metrics
from storefed.shared.node import MarketNode, initial_encoder
from storefed.shared.report import flatten_eval, unflatten_eval, write_metrics
from storefed.shared.wire import ROWWISE_KEY, apply_summed_update, sum_updates
from storefed.simulations.simulate import add_run_options, config_from_args

log = logging.getLogger("storefed")
METHODS = ("single-task", "shared-bottom", "mmoe")
ENGINES = ("flower", "inprocess")
PROTOCOL = ("federated: every market trains each round (fraction-train 1); chronological "
            "leave-one-out, 99 sampled negatives per test user; ndcg@10/hr@10; per category "
            "pooled over the test users of all markets; mean and std (ddof=0) over seeds")


# --------------------------------------------------------------------- one federated run
def run_inprocess(cfg: RunConfig) -> tuple[dict[str, Any], dict[str, MarketNode]]:
    """Federated rounds without a transport: the server's sum/apply on ``MarketNode``s.
    Writes ``OUT/metrics.json`` like the ServerApp; returns (metrics doc, nodes)."""
    catalog = load_catalog(cfg.dataset, cfg.data_dir or None, seed=cfg.seed,
                           options=ReaderOptions.from_run_config(cfg.to_mapping()))
    glob = initial_encoder(cfg, catalog)
    nodes = {m: MarketNode(cfg, m) for m in cfg.market_list}
    rounds: list[dict[str, Any]] = []
    out = Path(cfg.out_dir)
    for rnd in range(1, cfg.num_rounds + 1):
        t0 = time.perf_counter()
        updates, train = [], {}
        for m, node in nodes.items():
            update, metrics = node.train_round(glob, rnd)
            updates.append(update)
            train[m] = metrics
        glob = apply_summed_update(glob, sum_updates(updates))
        t_train = time.perf_counter() - t0
        markets = {}
        for m, node in nodes.items():
            ev = unflatten_eval(flatten_eval(node.evaluate(glob, "test")))  # as on the wire
            markets[m] = {"ndcg@10": ev["ndcg@10"], "hr@10": ev["hr@10"],
                          "examples": ev["examples"], "loss": train[m]["train-loss"],
                          "train_examples": train[m]["num-examples"],
                          "categories": ev["categories"]}
        rounds.append({"round": rnd, "markets": markets, "seconds": time.perf_counter() - t0,
                       "train_seconds": t_train, "rejected": []})
        write_metrics(out / "metrics.json", rounds, extra={"config": cfg.to_mapping()})
        log.info("  round %d/%d %.1fs", rnd, cfg.num_rounds, time.perf_counter() - t0)
    for node in nodes.values():
        load_parts(node.model, encoder=glob)
    doc = json.loads((out / "metrics.json").read_text())
    return doc, nodes


def run_flower(cfg: RunConfig, verbose: bool) -> tuple[dict[str, Any], dict[str, MarketNode]]:
    """``storefed simulate``'s path; final models rebuilt from OUT/encoder.pt + saved heads."""
    from storefed.simulations.simulate import run_federated  # noqa: PLC0415 - pulls in flwr/ray

    doc = run_federated(cfg, verbose=verbose)
    glob = load_encoder(Path(cfg.out_dir) / "encoder.pt").state
    nodes = {}
    for m in cfg.market_list:
        node = MarketNode(cfg, m, cfg.state_dir or Path(cfg.out_dir) / "state")
        if node.restore(None) != "disk":
            raise RuntimeError(f"run {cfg.out_dir}: no saved heads for market {m}")
        load_parts(node.model, encoder=glob)
        nodes[m] = node
    return doc, nodes


def final_scores(nodes: dict[str, MarketNode]) -> dict[str, dict[str, Any]]:
    """Per market ``{"mixed": summary, "within": summary}`` of the final models on test."""
    out = {}
    for m, node in nodes.items():
        ev = node.split.test
        out[m] = within_category_metrics(node.model, node.histories("test"), ev.candidates,
                                         node.catalog.item_category, node.catalog.categories,
                                         node.device)
    return out


def train_examples_per_category(nodes: dict[str, MarketNode]) -> dict[str, int]:
    """Training interactions per category, summed over the markets."""
    node = next(iter(nodes.values()))
    names = node.catalog.categories
    total = np.zeros(len(names), dtype=np.int64)
    for n in nodes.values():
        total += np.bincount(n.catalog.item_category[n.split.train_items], minlength=len(names))
    return {c: int(total[i]) for i, c in enumerate(names)}


# --------------------------------------------------------------------- aggregation
def pooled_categories(per_market: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``summarize``-format per-market summaries -> per category pooled over test users."""
    acc: dict[str, dict[str, float]] = {}
    for summ in per_market.values():
        for cat, v in summ["categories"].items():
            a = acc.setdefault(cat, {"ndcg@10": 0.0, "hr@10": 0.0, "examples": 0.0})
            n = float(v["examples"])
            a["ndcg@10"] += float(v["ndcg@10"]) * n
            a["hr@10"] += float(v["hr@10"]) * n
            a["examples"] += n
    return {c: {"ndcg@10": a["ndcg@10"] / a["examples"], "hr@10": a["hr@10"] / a["examples"],
                "examples": a["examples"]} for c, a in sorted(acc.items()) if a["examples"] > 0}


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def summarize_method(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std over seeds: per market (federation's own metrics), market average, per
    category (mixed and within, pooled), average across categories, timing, bytes."""
    markets: dict[str, dict[str, float]] = {}
    for m in runs[0]["doc"]["final"]["markets"]:
        entry: dict[str, float] = {}
        for k in ("ndcg@10", "hr@10"):
            entry[k], entry[f"{k}_std"] = _mean_std(
                [r["doc"]["final"]["markets"][m][k] for r in runs])
        markets[m] = entry
    average: dict[str, float] = {}
    for k in ("ndcg@10", "hr@10"):
        average[k], average[f"{k}_std"] = _mean_std(
            [r["doc"]["final"]["average"][k] for r in runs])
    cats: dict[str, dict[str, float]] = {}
    cat_avg: dict[str, float] = {}
    for view in ("mixed", "within"):
        per_seed = [pooled_categories({m: s[view] for m, s in r["scores"].items()})
                    for r in runs]
        names = sorted(set.intersection(*(set(p) for p in per_seed)))
        for c in names:
            e = cats.setdefault(c, {"test_users": per_seed[0][c]["examples"]})
            for k in ("ndcg@10", "hr@10"):
                key = k if view == "mixed" else f"within_{k}"
                e[key], e[f"{key}_std"] = _mean_std([p[c][k] for p in per_seed])
        for k in ("ndcg@10", "hr@10"):
            key = k if view == "mixed" else f"within_{k}"
            cat_avg[key], cat_avg[f"{key}_std"] = _mean_std(
                [float(np.mean([p[c][k] for c in names])) for p in per_seed])
    for c, e in cats.items():  # share of top-10 slots vs share of candidates / positives
        shares = []
        for r in runs:
            tot = {k: sum(s["top10"].get(c, {}).get(k, 0) for s in r["scores"].values())
                   for k in ("slots", "candidates")}
            all_slots = sum(v["slots"] for s in r["scores"].values() for v in s["top10"].values())
            all_cands = sum(v["candidates"] for s in r["scores"].values()
                            for v in s["top10"].values())
            shares.append((tot["slots"] / max(all_slots, 1), tot["candidates"] / max(all_cands, 1)))
        e["top10_share"] = float(np.mean([a for a, _ in shares]))
        e["candidate_share"] = float(np.mean([b for _, b in shares]))
    rounds = [rd for r in runs for rd in r["doc"]["rounds"]]
    return {"markets": markets, "average": average, "categories": cats,
            "category_average": cat_avg,
            "seconds_per_round": float(np.mean([rd["seconds"] for rd in rounds])),
            "bytes_per_client_round": runs[0]["bytes"],
            "wall_seconds": float(np.mean([r["wall"] for r in runs])),
            "max_mixed_diff": max(r["mixed_diff"] for r in runs)}


def bytes_per_client_round(cfg: RunConfig) -> int:
    """Download (global encoder, float32) + upload (weighted deltas + their weights)."""
    catalog = load_catalog(cfg.dataset, cfg.data_dir or None, seed=cfg.seed,
                           options=ReaderOptions.from_run_config(cfg.to_mapping()))
    state = initial_encoder(cfg, catalog)
    down = sum(v.numel() * 4 for v in state.values())
    weights = sum((v.shape[0] if (k == ROWWISE_KEY and cfg.aggregation == "rowwise") else 1) * 4
                  for k, v in state.items())
    return int(2 * down + weights)


def mixed_difference(doc: dict[str, Any], scores: dict[str, dict[str, Any]]) -> float:
    """Largest |federation-reported - recomputed| per-category mixed ndcg@10 (should be ~0)."""
    diff = 0.0
    for m, v in doc["final"]["markets"].items():
        for c, cv in v["categories"].items():
            diff = max(diff, abs(cv["ndcg@10"] - scores[m]["mixed"]["categories"][c]["ndcg@10"]))
    return diff


def compare(methods: dict[str, Any], train_examples: dict[str, int]) -> dict[str, Any]:
    """Shared-bottom/mmoe vs single-task per category: relative gains, small categories
    (bottom third by training examples), negative transfer and whether mmoe fixes it."""
    st, sb = methods.get("single-task"), methods.get("shared-bottom")
    if st is None or sb is None:
        return {}
    mm = methods.get("mmoe")
    names = [c for c in sorted(train_examples, key=lambda c: train_examples[c])
             if c in st["categories"] and c in sb["categories"]]
    n_small = max(1, math.ceil(len(names) / 3))
    small = names[:n_small]
    out: dict[str, Any] = {"small_categories": small, "by_category": {}}
    for view, key in (("mixed", "ndcg@10"), ("within", "within_ndcg@10")):
        base_avg = st["category_average"][key]
        res: dict[str, Any] = {
            "shared_bottom_vs_single_task_avg_gain":
                sb["category_average"][key] / base_avg - 1.0 if base_avg > 0 else None}
        if mm is not None:
            res["mmoe_vs_single_task_avg_gain"] = (mm["category_average"][key] / base_avg - 1.0
                                                   if base_avg > 0 else None)
        gains, neg = {}, []
        for c in names:
            b, s = st["categories"][c][key], sb["categories"][c][key]
            g = s / b - 1.0 if b > 0 else float("nan")
            gains[c] = g
            if s < b:
                entry = {"category": c, "single_task": b, "shared_bottom": s,
                         "beyond_std": (b - s) > max(st["categories"][c][f"{key}_std"],
                                                     sb["categories"][c][f"{key}_std"])}
                if mm is not None:
                    entry["mmoe"] = mm["categories"][c][key]
                    entry["mmoe_fixes"] = mm["categories"][c][key] >= b
                neg.append(entry)
            entry_c = out["by_category"].setdefault(c, {"train_examples": train_examples[c]})
            entry_c[f"sb_gain_{view}"] = g
            # share of the remaining error (1 - ndcg) that sharing removes: comparable across
            # categories whose baselines differ (own-category lists differ in length)
            entry_c[f"sb_error_reduction_{view}"] = 1.0 - (1.0 - s) / (1.0 - b) if b < 1 else None
        small_g = [gains[c] for c in small]
        rest_g = [gains[c] for c in names if c not in small]
        res["small_mean_gain"] = float(np.mean(small_g))
        res["rest_mean_gain"] = float(np.mean(rest_g)) if rest_g else None
        res["small_gain_most"] = bool(rest_g) and res["small_mean_gain"] > max(rest_g)
        res["small_gain_more_on_average"] = bool(rest_g) and res["small_mean_gain"] > float(
            np.mean(rest_g))
        red = {c: out["by_category"][c][f"sb_error_reduction_{view}"] for c in names}
        res["small_mean_error_reduction"] = float(np.mean([red[c] for c in small]))
        rest_r = [red[c] for c in names if c not in small]
        res["rest_mean_error_reduction"] = float(np.mean(rest_r)) if rest_r else None
        res["negative_transfer"] = neg
        out[view] = res
    return out


# --------------------------------------------------------------------- plot
def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    methods = doc["methods"]
    train = doc["train_examples"]
    names = sorted((c for c in train if all(c in m["categories"] for m in methods.values())),
                   key=lambda c: train[c])
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.1 * len(names) + 3), 7.5))
    width = 0.8 / max(1, len(methods))
    for ax, (key, title) in zip(axes, (("ndcg@10", "mixed candidates (protocol)"),
                                       ("within_ndcg@10", "own-category candidates only")),
                                strict=True):
        for i, (meth, v) in enumerate(methods.items()):
            xs = np.arange(len(names)) + (i - (len(methods) - 1) / 2) * width
            ax.bar(xs, [v["categories"][c][key] for c in names], width,
                   yerr=[v["categories"][c][f"{key}_std"] for c in names], capsize=2,
                   label=f"{meth} (avg {v['category_average'][key]:.3f})")
        ax.set_xticks(np.arange(len(names)))
        ax.set_xticklabels([f"{c}\n{train[c]}" for c in names], fontsize=8)
        ax.set_ylabel(key)
        ax.set_title(f"{doc['dataset']}: {title}", fontsize=10)
        ax.legend(fontsize=8)
    fig.text(0.5, 0.005, "category (training interactions), smallest left; mean ± std over "
             f"{doc['seeds']} seeds", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------- the command
def _kept_methods(out: Path, base: RunConfig, seeds: int, engine: str,
                  rerun: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, int]]:
    """Methods of an earlier OUT/benchmark.json run with the same settings, minus ``rerun``."""
    path = out / "benchmark.json"
    if not path.is_file():
        return {}, {}
    old = json.loads(path.read_text())
    same = {k: v for k, v in base.to_mapping().items()
            if k not in ("mtl", "seed", "out-dir", "state-dir")}
    if old.get("config") != same or old.get("seeds") != seeds or old.get("engine") != engine:
        raise ConfigError(f"--keep-existing: {path} was made with other settings; use another "
                          "--out or drop --keep-existing")
    kept = {m: v for m, v in old["methods"].items() if m not in rerun}
    return kept, dict(old.get("train_examples", {}))


def mtl_compare(base: RunConfig, seeds: int, out: Path, methods: tuple[str, ...] = METHODS,
                engine: str = "inprocess", verbose: bool = False,
                keep_existing: bool = False) -> dict[str, Any]:
    """Run every method x seed federated; write OUT/benchmark.json and OUT/mtl_compare.png.
    ``keep_existing``: methods already in OUT/benchmark.json (same settings) and not in
    ``methods`` are kept, so one method can be rerun alone."""
    for meth in methods:
        if meth not in MTL_MODES:
            raise ConfigError(f"--methods: unknown method {meth!r}; known: {', '.join(METHODS)}")
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    results: dict[str, Any] = {}
    train_examples: dict[str, int] = {}
    if keep_existing:
        results, train_examples = _kept_methods(out, base, seeds, engine, methods)
    for meth in methods:
        runs = []
        for k in range(seeds):
            seed = base.seed + k
            # item-knn off for all: the single-task model has no item-kNN part (like for like)
            cfg = base.replace(mtl=meth, seed=seed, out_dir=str(out / "runs" / f"{meth}-s{seed}"),
                               state_dir="", item_knn=False)
            log.info("%s seed %d: %d rounds over %d markets (%s)", meth, seed, cfg.num_rounds,
                     len(cfg.market_list), engine)
            t0 = time.perf_counter()
            if engine == "flower":
                doc, nodes = run_flower(cfg, verbose)
            else:
                doc, nodes = run_inprocess(cfg)
            wall = time.perf_counter() - t0
            scores = final_scores(nodes)
            if not train_examples or not k:
                train_examples = train_examples_per_category(nodes)
            runs.append({"doc": doc, "scores": scores, "wall": wall,
                         "mixed_diff": mixed_difference(doc, scores),
                         "bytes": bytes_per_client_round(cfg)})
            del nodes
        results[meth] = summarize_method(runs)
        log.info("%s: avg over categories ndcg@10 %.4f (within %.4f)", meth,
                 results[meth]["category_average"]["ndcg@10"],
                 results[meth]["category_average"]["within_ndcg@10"])
    order = [m for m in METHODS if m in results] + [m for m in results if m not in METHODS]
    results = {m: results[m] for m in order}
    doc_out: dict[str, Any] = {
        "methods": results, "seeds": seeds, "protocol": PROTOCOL, "dataset": base.dataset,
        "markets": base.market_list, "engine": engine, "train_examples": train_examples,
        "config": {k: v for k, v in base.to_mapping().items()
                   if k not in ("mtl", "seed", "out-dir", "state-dir")},
    }
    doc_out["comparison"] = compare(results, train_examples)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "benchmark.json", json.dumps(doc_out, indent=2).encode())
    plot(doc_out, out / "mtl_compare.png")
    return doc_out


def print_report(doc: dict[str, Any]) -> None:
    methods = doc["methods"]
    train = doc["train_examples"]
    names = sorted((c for c in train if all(c in m["categories"] for m in methods.values())),
                   key=lambda c: train[c])
    for key in ("ndcg@10", "within_ndcg@10"):
        print(f"\n{key} per category (mean ± std over {doc['seeds']} seeds)")
        print(f"{'category':<14}{'train':>8}{'users':>7}" + "".join(f"{m:>22}" for m in methods))
        for c in names:
            first = next(iter(methods.values()))["categories"][c]
            row = f"{c:<14}{train[c]:>8}{int(first['test_users']):>7}"
            for v in methods.values():
                row += f"{v['categories'][c][key]:>14.4f} ± {v['categories'][c][key + '_std']:.4f}"
            print(row)
        row = f"{'avg over cats':<29}"
        for v in methods.values():
            a = v["category_average"]
            row += f"{a[key]:>14.4f} ± {a[key + '_std']:.4f}"
        print(row)
    cmp_ = doc.get("comparison") or {}
    for view in ("mixed", "within"):
        r = cmp_.get(view)
        if not r:
            continue
        neg = ", ".join(f"{e['category']}" + (" (mmoe fixes)" if e.get("mmoe_fixes") else "")
                        for e in r["negative_transfer"]) or "none"
        gain = 100 * (r["shared_bottom_vs_single_task_avg_gain"] or 0.0)
        small = 100 * r["small_mean_gain"]
        rest = 100 * (r["rest_mean_gain"] or 0.0)
        print(f"[{view}] shared-bottom vs single-task: {gain:+.1f}% avg ndcg@10; small "
              f"{cmp_['small_categories']} {small:+.1f}% vs rest {rest:+.1f}%; error "
              f"reduction small {100 * r['small_mean_error_reduction']:.1f}% vs rest "
              f"{100 * (r['rest_mean_error_reduction'] or 0.0):.1f}%; negative transfer: {neg}")
    print("\nshare of top-10 slots (calibration across categories) vs share of candidates")
    print(f"{'category':<14}{'cands':>8}" + "".join(f"{m:>16}" for m in methods))
    for c in names:
        first = next(iter(methods.values()))["categories"][c]
        print(f"{c:<14}{first['candidate_share']:>8.3f}"
              + "".join(f"{v['categories'][c]['top10_share']:>16.3f}" for v in methods.values()))


def add_mtl_options(p: argparse.ArgumentParser) -> None:
    """The options of the comparison (``storefed benchmark-mtl``)."""
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated mtl modes to compare (default: all three)")
    p.add_argument("--engine", choices=ENGINES, default="inprocess",
                   help="flower: Flower simulation engine per run; inprocess: same client code "
                        "and aggregation in one process (default, cheaper)")


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("benchmark-mtl", help="single-task vs shared-bottom vs mmoe per category",
                       description="Federated runs of each mtl mode x seed; per-category "
                                   "ndcg@10/hr@10 -> OUT/benchmark.json and OUT/mtl_compare.png.")
    add_run_options(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (seed, seed+1, ...)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs per round")
    p.add_argument("--out", default="runs/mtl", help="output directory")
    add_mtl_options(p)
    p.add_argument("--keep-existing", action="store_true",
                   help="keep the other methods of an earlier OUT/benchmark.json (same "
                        "settings) and rerun only --methods")
    return "benchmark-mtl", _run


def _run(args: argparse.Namespace) -> int:
    base = config_from_args(args, num_rounds=args.rounds, local_epochs=args.local_epochs)
    if base.torch_threads == 0:
        base = base.replace(torch_threads=1)
    torch.set_num_threads(base.torch_threads)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    doc = mtl_compare(base, args.seeds, Path(args.out), methods, args.engine, args.verbose,
                      args.keep_existing)
    print_report(doc)
    print(f"wrote {Path(args.out) / 'benchmark.json'} and {Path(args.out) / 'mtl_compare.png'}")
    return 0

