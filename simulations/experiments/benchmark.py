"""``storefed benchmark``: every method on the same splits, negatives, protocol and seeds.

Methods form a registry (``METHODS``: name -> small function), so other commands can add
theirs. Neural methods share one model family and budget (``num_rounds x local_epochs``):

* ``local``        each market alone (``simulations.experiments.local.run_local``);
* ``central``      all markets pooled in one process (``run_central``): the quality ceiling;
* ``fedavg-full``  FedAvg over the whole model, heads averaged too (``run_inprocess`` with
  ``share_heads``: the same client training and the same ``shared.wire`` sums as the Flower
  server, run in one process; the Flower app federates only the encoder by design);
* ``storefed``     the product: Flower simulation, encoder-only federation, private heads;
* ``storefed-secagg`` the same under SecAgg+ (reported "unavailable" if that path fails);
* ``popularity``, ``itemknn-pooled``, ``bpr-mf-local``: classical floors (shared/baselines.py);
  ``ease-pooled`` (EASE) and ``lightgcn-pooled`` (LightGCN, shared/lightgcn.py): over every
  market's data pooled, centralised references, on request (``--methods``).

Writes ``OUT/benchmark.json`` (shape in ``build_document``), a table on stdout (with the
published per-market nDCG@10 of the ECIR 2023 efficient-xmrec study for XMarket) and
``OUT/benchmark.png``. Overhead figures (seed 0): a Flower run's wall time vs the same
federated training in one process, and ``train_local`` throughput vs a bare torch loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storefed.shared.baselines import (
    run_bpr_mf_local,
    run_ease_pooled,
    run_itemknn_pooled,
    run_lightgcn_pooled,
    run_popularity,
)
from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig
from storefed.shared.data import ReaderOptions, load_dataset
from storefed.shared.errors import ConfigError
from storefed.shared.model import ITEM_EMB_KEY
from storefed.shared.node import build_model, init_heads_from_data, train_settings
from storefed.shared.progress import bar
from storefed.shared.train import adam, batch_logits, input_histories, ranking_loss, train_local
from storefed.simulations.experiments.local import run_central, run_inprocess, run_local
from storefed.simulations.simulate import add_run_options, config_from_args

log = logging.getLogger("storefed")

#: best single-model nDCG@10 per market reproduced in the ECIR 2023 "Market Aware Models for
#: Efficient Cross Market Recommendation" study (their own negatives: a sanity line only)
PUBLISHED_NDCG10 = {"de": 0.3415, "jp": 0.2083, "in": 0.4595, "fr": 0.3271, "ca": 0.3158,
                    "mx": 0.5590, "uk": 0.4702}
PROTOCOL = ("chronological leave-one-out per user (last = test, second-to-last = valid), "
            "test positive ranked against {neg} negatives drawn uniformly from the market's "
            "items the user never touched (official valid_run candidates where the dataset has "
            "them); nDCG@10 / HR@10 with expected-value tie handling (classical baselines break "
            "ties by market popularity); neural methods: {rounds} rounds x {epochs} local "
            "epochs (with item-knn on, each market adds its own item-kNN score with a weight "
            "picked on its validation split); mean and std over {seeds} seed(s)")


# --------------------------------------------------------------------------- method registry
MethodResult = dict[str, Any]  # {"markets": {m: summary}, "seconds_per_round", "bytes..."}
Method = Callable[[RunConfig, Path], MethodResult]
METHODS: dict[str, Method] = {}


def method(name: str) -> Callable[[Method], Method]:
    """Register ``fn(cfg, out_dir) -> MethodResult`` under ``name``."""
    def wrap(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return wrap


def _neural(doc: dict[str, Any]) -> MethodResult:
    return {"markets": doc["markets"], "seconds_per_round": doc["seconds_per_round"],
            "bytes_per_client_round": doc["bytes_per_client_round"],
            "wall_seconds": doc["seconds"]}


@method("local")
def _local(cfg: RunConfig, out: Path) -> MethodResult:
    return _neural(run_local(cfg))


@method("central")
def _central(cfg: RunConfig, out: Path) -> MethodResult:
    return _neural(run_central(cfg))


@method("fedavg-full")
def _fedavg_full(cfg: RunConfig, out: Path) -> MethodResult:
    return _neural(run_inprocess(cfg, share_heads=True, evaluate_every_round=False))


def _flower(cfg: RunConfig, out: Path) -> MethodResult:
    from storefed.simulations.simulate import lab_policy, run_federated  # noqa: PLC0415 - Flower

    # the lab holds every simulated market: plain FedAvg (the `storefed` row) is the
    # not-private reference, so its markets get a policy that lets plain updates out
    doc = run_federated(cfg.replace(out_dir=str(out), state_dir=""),
                        policy=lab_policy(cfg.secagg, len(cfg.market_list)))
    rounds = doc.get("rounds", [])
    final = doc["final"]["markets"]
    n_rounds = max(len(rounds), 1)
    return {"markets": final, "seconds_per_round": doc["wall_seconds"] / n_rounds,
            "bytes_per_client_round": _encoder_bytes(cfg), "wall_seconds": doc["wall_seconds"],
            "round_seconds": [r.get("seconds") for r in rounds]}


def _encoder_bytes(cfg: RunConfig) -> float:
    """Bytes of one client's update per round: plain FedAvg sends every encoder tensor
    (float32) and its weights; SecAgg+ one int64 per slot of its masked vector."""
    from storefed.shared.data import load_catalog  # noqa: PLC0415
    from storefed.shared.node import initial_encoder  # noqa: PLC0415
    from storefed.shared.secagg import VectorLayout  # noqa: PLC0415

    enc = initial_encoder(cfg, load_catalog(cfg.dataset, cfg.data_dir or None, seed=cfg.seed,
                                            options=ReaderOptions.from_run_config(cfg.to_mapping())))
    if cfg.secagg:
        return float(VectorLayout.for_encoder(enc).size * 8)
    total = 0
    for k, v in enc.items():
        total += v.numel() * 4
        rows = v.shape[0] if (cfg.aggregation == "rowwise"
                              and k == ITEM_EMB_KEY) else 1
        total += rows * 4
    return float(total)


@method("storefed")
def _storefed(cfg: RunConfig, out: Path) -> MethodResult:
    return _flower(cfg.replace(secagg=False), out)


@method("storefed-secagg")
def _storefed_secagg(cfg: RunConfig, out: Path) -> MethodResult:
    return _flower(cfg.replace(secagg=True), out)


def _baseline(fn: Callable[..., dict[str, dict[str, object]]],
              **kwargs: Any) -> Method:
    def run(cfg: RunConfig, out: Path) -> MethodResult:
        ds = load_dataset(cfg.dataset, cfg.data_dir or None, cfg.market_list, seed=cfg.seed,
                          n_neg=cfg.eval_negatives, max_history=cfg.max_history,
                          options=ReaderOptions.from_run_config(cfg.to_mapping()))
        t0 = time.perf_counter()
        args = {"seed": cfg.seed} if "seed" in kwargs else {}
        markets = fn(ds.markets, ds.catalog.n_items, **args)
        return {"markets": markets, "seconds_per_round": 0.0, "bytes_per_client_round": 0.0,
                "wall_seconds": time.perf_counter() - t0}
    return run


METHODS["popularity"] = _baseline(run_popularity)
METHODS["itemknn-pooled"] = _baseline(run_itemknn_pooled)
METHODS["ease-pooled"] = _baseline(run_ease_pooled)  # centralised reference (pools all data)
METHODS["bpr-mf-local"] = _baseline(run_bpr_mf_local, seed=True)
METHODS["lightgcn-pooled"] = _baseline(run_lightgcn_pooled, seed=True)  # centralised reference

DEFAULT_METHODS = ("popularity", "itemknn-pooled", "bpr-mf-local", "local", "central",
                   "fedavg-full", "storefed", "storefed-secagg")
#: methods allowed to fail softly (reported "unavailable" with the reason)
OPTIONAL_METHODS = {"storefed-secagg"}


# --------------------------------------------------------------------------- aggregation
def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=0)) if len(arr) > 1 else 0.0


TUNING_KEYS = ("tuned", "ease_lambda")


def aggregate_method(runs: list[MethodResult]) -> dict[str, Any]:
    """Per market mean/std over seeds, the average over markets, time and bytes."""
    markets: dict[str, dict[str, float]] = {}
    for m in runs[0]["markets"]:
        nd = [float(r["markets"][m]["ndcg@10"]) for r in runs]
        hr = [float(r["markets"][m]["hr@10"]) for r in runs]
        (nd_m, nd_s), (hr_m, hr_s) = _mean_std(nd), _mean_std(hr)
        markets[m] = {"ndcg@10": nd_m, "ndcg@10_std": nd_s, "hr@10": hr_m, "hr@10_std": hr_s}
    k = max(len(markets), 1)
    # what a tuned method picked on validation, per seed and market (EASE's lambda, LightGCN's
    # and BPR-MF's settings): the references' tuning belongs beside their figures
    tuning = [{m: {key: v[key] for key in TUNING_KEYS if key in v}
               for m, v in r["markets"].items() if any(key in v for key in TUNING_KEYS)}
              for r in runs]
    return {
        **({"tuning": tuning} if any(tuning) else {}),
        "markets": markets,
        "average": {"ndcg@10": sum(v["ndcg@10"] for v in markets.values()) / k,
                    "hr@10": sum(v["hr@10"] for v in markets.values()) / k},
        "seconds_per_round": float(np.mean([r["seconds_per_round"] for r in runs])),
        "bytes_per_client_round": float(np.mean([r["bytes_per_client_round"] for r in runs])),
        "wall_seconds": float(np.sum([r.get("wall_seconds", 0.0) for r in runs])),
    }


def build_document(results: dict[str, list[MethodResult] | str], cfg: RunConfig, seeds: int,
                   overhead: dict[str, Any] | None) -> dict[str, Any]:
    """``{"methods": {name: {"markets": {m: {"ndcg@10", "ndcg@10_std", "hr@10",
    "hr@10_std"}}, "average": {...}, "seconds_per_round", "bytes_per_client_round"}}, "seeds",
    "protocol", ...}``; a method that could not run is ``{"unavailable": reason}``."""
    methods: dict[str, Any] = {}
    for name, runs in results.items():
        methods[name] = {"unavailable": runs} if isinstance(runs, str) else aggregate_method(runs)
    doc: dict[str, Any] = {
        "methods": methods, "seeds": seeds,
        "protocol": PROTOCOL.format(neg=cfg.eval_negatives, rounds=cfg.num_rounds,
                                    epochs=cfg.local_epochs, seeds=seeds),
        "dataset": cfg.dataset, "markets": cfg.market_list, "config": cfg.to_mapping(),
    }
    if cfg.dataset == "xmarket":
        doc["published_ndcg@10"] = {m: PUBLISHED_NDCG10[m] for m in cfg.market_list
                                    if m in PUBLISHED_NDCG10}
    doc["targets"] = _targets(methods, doc.get("published_ndcg@10", {}))
    if overhead is not None:
        doc["overhead"] = overhead
    return doc


def _targets(methods: dict[str, Any], published: dict[str, float]) -> dict[str, Any]:
    """Where storefed lands against the issue's bars."""
    def avg(name: str) -> float | None:
        m = methods.get(name)
        return None if m is None or "average" not in m else float(m["average"]["ndcg@10"])

    sf = avg("storefed")
    if sf is None:
        return {}
    floors = {n: avg(n) for n in ("local", "popularity", "itemknn-pooled", "bpr-mf-local")}
    best = max((v for v in floors.values() if v is not None), default=None)
    out: dict[str, Any] = {"storefed_ndcg@10": sf}
    if best is not None:
        out["best_floor"] = best
        out["gain_over_best_floor"] = sf / best - 1.0 if best > 0 else math.inf
    central = avg("central")
    if central is not None:
        out["gap_to_central"] = 1.0 - sf / central if central > 0 else 0.0
    if published:
        mk = methods["storefed"]["markets"]
        out["markets_at_or_above_published"] = sorted(
            m for m, ref in published.items() if m in mk and mk[m]["ndcg@10"] >= ref)
    return out


# --------------------------------------------------------------------------- overhead
def bare_loop_throughput(cfg: RunConfig, market: str, epochs: int = 1,
                         repeats: int = 3) -> dict[str, Any]:
    """Examples/s of ``train_local`` vs a bare torch loop (same model, tensors, batches and
    loss; inputs and negatives prepared up front, no bookkeeping) on one market.

    One untimed epoch of each first (allocator, lazy imports), then ``repeats`` alternating
    timed runs of each; the ratio is of the fastest of each (noise on a shared machine only
    slows a run down)."""
    from storefed.shared.node import MarketNode  # noqa: PLC0415

    node = MarketNode(cfg, market, None)
    s = node.split
    settings = train_settings(cfg, 0)
    settings = type(settings)(**{**settings.__dict__, "epochs": epochs})

    def ours() -> float:
        res = train_local(node.model, s.train_users, s.train_items, s.train_histories,
                          s.items, settings, node.device)
        return res.examples / max(res.seconds, 1e-9)

    model = build_model(cfg, node.catalog).to(node.device)
    init_heads_from_data(model, s)
    gen = torch.Generator().manual_seed(0)
    users = torch.as_tensor(s.train_users)
    items = torch.as_tensor(s.train_items)
    hist_all = torch.as_tensor(s.train_histories)
    pool = torch.as_tensor(s.items)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(len(users), generator=gen)
        for st in range(0, len(users), cfg.batch_size):
            idx = order[st:st + cfg.batch_size]
            pos = items[idx]
            batches.append((input_histories(hist_all[users[idx]], pos, model.encoder.pad,
                                            settings.history), pos))
    opt = adam(list(model.parameters()), lr=cfg.lr)  # train_local's optimiser
    model.train()

    def bare() -> float:
        t0 = time.perf_counter()
        n = 0
        for hist, pos in batches:
            loss = ranking_loss(batch_logits(model, hist, pos, pool, settings, gen),
                                settings.loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(pos)
        return n / max(time.perf_counter() - t0, 1e-9)

    ours(), bare()  # warm-up, untimed
    ours_runs, bare_runs = [], []
    for _ in range(repeats):
        ours_runs.append(ours())
        bare_runs.append(bare())
    return {"market": market, "train_local_examples_per_s": max(ours_runs),
            "bare_loop_examples_per_s": max(bare_runs),
            "ratio": max(ours_runs) / max(bare_runs),
            "train_local_samples": ours_runs, "bare_loop_samples": bare_runs}


def measure_overhead(cfg: RunConfig, out: Path, repeats: int = 2) -> dict[str, Any]:
    """Flower wall time vs the in-process federated loop, and throughput vs a bare loop.

    Both arms run the same seed and config (the ``storefed`` method, evaluation every round)
    ``repeats`` times, back to back in pairs so both see the same machine, and each starts cold
    with respect to data: the in-process arm clears this process's memoised data, item-kNN and
    kNN scores first, as Flower's fresh actor processes load theirs. Timing noise only adds, so
    the ratio is of each arm's fastest run; every sample is kept. The steady-round ratio and
    Flower's fixed cost (Ray start, actor start-up, shutdown) come from the fastest runs."""
    from storefed.shared.node import clear_caches  # noqa: PLC0415

    inproc: list[tuple[float, list[float]]] = []
    flower: list[tuple[float, list[float]]] = []
    for i in range(repeats):
        clear_caches()
        t0 = time.perf_counter()
        doc = run_inprocess(cfg, evaluate_every_round=True)
        inproc.append((time.perf_counter() - t0, [float(x) for x in doc["round_seconds"]]))
        res = _storefed(cfg, out / "overhead" / f"flower-{i}")
        flower.append((float(res["wall_seconds"]),
                       [float(x) for x in res["round_seconds"] if x is not None]))
        log.info("overhead pair %d: in-process %.1fs, Flower %.1fs", i, inproc[-1][0],
                 flower[-1][0])
    best_in, best_fl = min(inproc), min(flower)
    result: dict[str, Any] = {
        "repeats": repeats,
        "inprocess_samples_seconds": [t for t, _ in inproc],
        "flower_samples_seconds": [t for t, _ in flower],
        "inprocess_federated_seconds": best_in[0],
        "flower_federated_seconds": best_fl[0],
        "flower_over_inprocess": best_fl[0] / max(best_in[0], 1e-9),
        "pair_ratios": [f[0] / max(i_[0], 1e-9) for i_, f in zip(inproc, flower, strict=True)],
        "inprocess_round_seconds": best_in[1],
        "flower_round_seconds": best_fl[1],
        "inprocess_samples_round_seconds": [r for _, r in inproc],
        "flower_samples_round_seconds": [r for _, r in flower],
    }
    later_in, later_fl = best_in[1][1:], best_fl[1][1:]
    if later_in and later_fl:
        result["steady_round_ratio"] = float(np.median(later_fl) / max(np.median(later_in),
                                                                       1e-9))
        # what the Flower run spent beyond its steady rounds: Ray start, actor start-up
        # (imports, data, first optimiser step), shutdown
        result["flower_fixed_seconds"] = best_fl[0] - float(np.median(later_fl)) * len(best_fl[1])
    sizes = {}
    for m in cfg.market_list:
        from storefed.shared.data import load_market  # noqa: PLC0415

        _, split = load_market(cfg.dataset, cfg.data_dir or None, m, seed=cfg.seed,
                               n_neg=cfg.eval_negatives, max_history=cfg.max_history,
                               options=ReaderOptions.from_run_config(cfg.to_mapping()))
        sizes[m] = split.n_train
    result["throughput"] = bare_loop_throughput(cfg, max(sizes, key=lambda k: sizes[k]))
    return result


# --------------------------------------------------------------------------- output
def print_table(doc: dict[str, Any]) -> None:
    methods = doc["methods"]
    markets: list[str] = doc["markets"]
    published = doc.get("published_ndcg@10", {})
    head = f"{'method':<17}" + "".join(f"{m:>9}" for m in markets) + f"{'avg':>9}{'hr@10':>8}" \
        + f"{'s/round':>9}{'KB/rnd':>9}"
    print("nDCG@10 (mean over seeds; std in benchmark.json)")
    print(head)
    if published:
        print(f"{'published':<17}" + "".join(
            f"{published[m]:>9.4f}" if m in published else f"{'':>9}" for m in markets)
            + f"{np.mean(list(published.values())):>9.4f}")
    for name, res in methods.items():
        if "unavailable" in res:
            print(f"{name:<17}unavailable: {res['unavailable']}")
            continue
        print(f"{name:<17}" + "".join(f"{res['markets'][m]['ndcg@10']:>9.4f}" for m in markets)
              + f"{res['average']['ndcg@10']:>9.4f}{res['average']['hr@10']:>8.4f}"
              + f"{res['seconds_per_round']:>9.1f}{res['bytes_per_client_round'] / 1024:>9.0f}")
    t = doc.get("targets", {})
    if "gain_over_best_floor" in t:
        print(f"storefed vs best floor: {100 * t['gain_over_best_floor']:+.1f}%   "
              f"gap to central: {100 * t.get('gap_to_central', float('nan')):.1f}%")
    ov = doc.get("overhead")
    if ov:
        if "flower_over_inprocess" in ov:
            print(f"overhead: Flower {ov['flower_federated_seconds']:.1f}s vs in-process "
                  f"{ov['inprocess_federated_seconds']:.1f}s = {ov['flower_over_inprocess']:.2f}x"
                  f" (fastest of {ov['repeats']} each; pairs "
                  + ", ".join(f"{r:.2f}x" for r in ov["pair_ratios"]) + ")")
        if "steady_round_ratio" in ov:
            print(f"  rounds after the first: {ov['steady_round_ratio']:.2f}x; Flower's fixed "
                  f"start-up/shutdown ~{ov['flower_fixed_seconds']:.1f}s")
        tp = ov["throughput"]
        print(f"throughput ({tp['market']}): train_local {tp['train_local_examples_per_s']:.0f} "
              f"ex/s vs bare loop {tp['bare_loop_examples_per_s']:.0f} ex/s = "
              f"{tp['ratio']:.2f}x")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Grouped bars of per-market nDCG@10 per method (+ published reference ticks)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    markets = list(doc["markets"]) + ["avg"]
    methods = {k: v for k, v in doc["methods"].items() if "unavailable" not in v}
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(markets)), 4.5))
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(markets))
    for i, (name, res) in enumerate(methods.items()):
        vals = [res["markets"][m]["ndcg@10"] for m in doc["markets"]] + \
            [res["average"]["ndcg@10"]]
        errs = [res["markets"][m]["ndcg@10_std"] for m in doc["markets"]] + [0.0]
        ax.bar(x - 0.4 + (i + 0.5) * width, vals, width, yerr=errs, label=name)
    pub = doc.get("published_ndcg@10", {})
    if pub:
        xs = [j for j, m in enumerate(markets) if m in pub]
        ax.scatter(xs, [pub[markets[j]] for j in xs], marker="_", s=600, c="k", zorder=5,
                   label="published")
    ax.set_xticks(x, markets)
    ax.set_ylabel("nDCG@10")
    ax.set_title(f"{doc['dataset']}: nDCG@10 per market ({doc['seeds']} seed(s))")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- command
def run_benchmark(cfg: RunConfig, out: Path, seeds: int, methods: list[str],
                  overhead_repeats: int = 2, progress: bool = False) -> dict[str, Any]:
    """Every method x seed; returns (and writes) the benchmark document. ``progress``: a bar
    with an ETA over the method x seed runs on stderr."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown benchmark method(s) {', '.join(unknown)}; known: "
                          f"{', '.join(METHODS)}")
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[MethodResult] | str] = {}
    pbar = bar(len(methods) * seeds, "benchmark", unit="run", enabled=progress)
    for name in methods:
        runs: list[MethodResult] = []
        for s in range(seeds):
            pbar.set_postfix_str(f"{name} seed {s}")
            scfg = cfg.replace(seed=cfg.seed + s)
            t0 = time.perf_counter()
            try:
                runs.append(METHODS[name](scfg, out / "runs" / f"{name}-seed{s}"))
            except Exception as exc:  # noqa: BLE001 - optional methods degrade to a reason
                if name not in OPTIONAL_METHODS:
                    raise
                log.warning("benchmark: %s unavailable: %s", name, exc)
                results[name] = f"{type(exc).__name__}: {exc}"[:300]
                break
            log.info("benchmark: %s seed %d done in %.1fs", name, s,
                     time.perf_counter() - t0)
            pbar.update(1)
        else:
            results[name] = runs
        partial = build_document(results, cfg, seeds, None)  # progress survives an abort
        atomic_write_bytes(out / "benchmark.partial.json", json.dumps(partial, indent=2).encode())
    pbar.close()
    ov = measure_overhead(cfg, out, overhead_repeats) if overhead_repeats > 0 else None
    doc = build_document(results, cfg, seeds, ov)
    atomic_write_bytes(out / "benchmark.json", json.dumps(doc, indent=2).encode())
    plot(doc, out / "benchmark.png")
    return doc


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("benchmark", help="all methods on the same splits/negatives/seeds",
                       description="Benchmark local / central / fedavg-full / storefed "
                                   "(+ secagg) and classical baselines; writes "
                                   "OUT/benchmark.json, OUT/benchmark.png and a table.")
    add_run_options(p)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs per round")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the overhead measurements (Flower vs in-process, bare loop)")
    p.add_argument("--overhead-repeats", type=int, default=2,
                   help="in-process/Flower run pairs timed for the overhead ratio (fastest of "
                        "each arm)")
    p.add_argument("--out", default="runs/benchmark", help="output directory")
    return "benchmark", _run


def _run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    cfg = config_from_args(args, num_rounds=args.rounds, local_epochs=args.local_epochs)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out)
    t0 = time.perf_counter()
    if args.overhead_repeats < 1:
        raise ConfigError(f"--overhead-repeats must be >= 1, got {args.overhead_repeats}")
    repeats = 0 if args.no_overhead or "storefed" not in methods else args.overhead_repeats
    doc = run_benchmark(cfg, out, args.seeds, methods, overhead_repeats=repeats, progress=True)
    print_table(doc)
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.png'} "
          f"({time.perf_counter() - t0:.0f}s)")
    return 0
