"""``storefed benchmark-secagg``: what SecAgg+ (and DP on top of it) costs, through Flower's
simulation engine, as ``storefed simulate`` runs.

For each client count N (default 3, 7, 20) it runs the same configuration plain and with
``--secagg`` and reports the per-round wall time of each (median over rounds 2..R: round 1
also starts the Ray actors), their ratio, the time of each SecAgg+ stage, and the final
nDCG@10 of both (relative difference). Clients are the dataset's markets, cycled when N is larger
than the number of markets (the synthetic data has 4: N = 20 runs each market on 5 nodes; the
protocol treats them as 20 distinct parties). ``--dp-noise 0.5,1,2`` adds a DP sweep (secagg +
client-level DP, ``--dp-clip``) reporting nDCG@10 against epsilon.
Prints a table and writes ``OUT/secagg_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from shared.checkpoint import atomic_write_bytes
from shared.config import RunConfig
from shared.data import available_markets
from simulations.simulate import add_run_options, config_from_args, run_federated


def _markets(cfg: RunConfig, n: int, chosen: list[str]) -> str:
    pool = chosen or available_markets(cfg.dataset, cfg.data_dir or None)
    return ",".join(pool[i % len(pool)] for i in range(n))


def _per_round(doc: dict[str, Any], key: str) -> float:
    vals = [float(r[key]) for r in doc["rounds"]]
    return statistics.median(vals[1:] if len(vals) > 1 else vals)


def _stages(doc: dict[str, Any]) -> dict[str, float]:
    rounds = doc["rounds"][1:] if len(doc["rounds"]) > 1 else doc["rounds"]
    names = sorted({k for r in rounds for k in r.get("secagg", {}).get("stage_seconds", {})})
    return {k: statistics.median(r["secagg"]["stage_seconds"].get(k, 0.0) for r in rounds)
            for k in names}


def run_bench(cfg: RunConfig, clients: list[int], out: Path, dp_noise: list[float],
              dp_clip: float, verbose: bool = False) -> dict[str, Any]:
    """Plain vs SecAgg+ per client count (and the optional DP sweep); returns the report."""
    chosen = cfg.market_list
    rows: list[dict[str, Any]] = []
    for n in clients:
        base = cfg.replace(markets=_markets(cfg, n, chosen))
        docs = {}
        for name, c in (("plain", base.replace(secagg=False)),
                        ("secagg", base.replace(secagg=True))):
            t0 = time.perf_counter()
            docs[name] = run_federated(c.replace(out_dir=str(out / f"n{n}-{name}")), verbose)
            docs[name]["bench_wall"] = time.perf_counter() - t0
        p, s = docs["plain"], docs["secagg"]
        q_p, q_s = p["final"]["average"]["ndcg@10"], s["final"]["average"]["ndcg@10"]
        rows.append({
            "clients": n, "markets": base.markets,
            "plain_round_s": _per_round(p, "seconds"), "secagg_round_s": _per_round(s, "seconds"),
            "ratio_round": _per_round(s, "seconds") / _per_round(p, "seconds"),
            "plain_train_s": _per_round(p, "train_seconds"),
            "secagg_train_s": _per_round(s, "train_seconds"),
            "ratio_train": _per_round(s, "train_seconds") / _per_round(p, "train_seconds"),
            "secagg_stage_s": _stages(s),
            "ndcg@10_plain": q_p, "ndcg@10_secagg": q_s,
            "ndcg_rel_diff": (q_s - q_p) / q_p if q_p else 0.0,
            "clipped_values": sum(r["secagg"]["clipped_values"] for r in s["rounds"]),
            "vector_length": s["rounds"][0]["secagg"]["vector_length"],
        })
        _print_row(rows[-1])
    dp_rows: list[dict[str, Any]] = []
    if dp_noise:
        base = cfg.replace(secagg=True)  # the selected markets, once each
        for sigma in dp_noise:
            c = base.replace(dp_noise=sigma, dp_clip=dp_clip,
                             out_dir=str(out / f"dp-{sigma:g}"))
            doc = run_federated(c, verbose)
            dp_rows.append({"dp_noise": sigma, "dp_clip": dp_clip,
                            "epsilon": doc["privacy"]["epsilon"], "delta": c.dp_delta,
                            "ndcg@10": doc["final"]["average"]["ndcg@10"],
                            "hr@10": doc["final"]["average"]["hr@10"]})
            print(f"dp-noise {sigma:g}: epsilon {dp_rows[-1]['epsilon']:.2f} "
                  f"ndcg@10 {dp_rows[-1]['ndcg@10']:.4f}", flush=True)
    report = {"config": cfg.to_mapping(), "rows": rows, "dp": dp_rows,
              "note": "per-round seconds are medians over rounds 2..R (round 1 starts Ray); "
                      "ratio = secagg / plain"}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "secagg_bench.json", json.dumps(report, indent=2).encode())
    return report


def _print_row(r: dict[str, Any]) -> None:
    stages = " ".join(f"{k}={v:.2f}" for k, v in r["secagg_stage_s"].items())
    print(f"N={r['clients']:>3}  round plain {r['plain_round_s']:.2f}s secagg "
          f"{r['secagg_round_s']:.2f}s ratio {r['ratio_round']:.2f}x | train step ratio "
          f"{r['ratio_train']:.2f}x | ndcg@10 {r['ndcg@10_plain']:.4f} vs "
          f"{r['ndcg@10_secagg']:.4f} ({100 * r['ndcg_rel_diff']:+.2f}%) | {stages}", flush=True)


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("benchmark-secagg", help="SecAgg+ (and DP) cost vs plain aggregation",
                       description=__doc__)
    add_run_options(p)
    p.add_argument("--clients", default="3,7,20", help="client counts (default 3,7,20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--dp-noise", default="", help="comma-separated noise multipliers to sweep")
    p.add_argument("--dp-clip", type=float, default=0.5, help="L2 clip for the DP sweep")
    p.add_argument("--out", default="runs/secagg-bench", help="output directory")
    return "benchmark-secagg", _run


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, num_rounds=args.rounds, local_epochs=args.local_epochs)
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    noise = [float(x) for x in args.dp_noise.split(",") if x.strip()]
    run_bench(cfg, clients, Path(args.out), noise, args.dp_clip, verbose=args.verbose)
    print(f"wrote {Path(args.out) / 'secagg_bench.json'}")
    return 0
