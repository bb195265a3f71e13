"""``storefed deploy bench``: seconds per round of the same work as a simulation and as a local
deployment (warm executors, or Flower's default SuperNode), with the CPU each process used.
Prints a table and writes JSON; figures and decisions are in ``RESULTS.md``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from storefed.shared.config import RunConfig, parse_overrides
from storefed.shared.errors import ConfigError
from storefed.simulations.cluster import (
    LocalCluster,
    add_cluster_options,
    choose_markets,
    demo_policy,
)
from storefed.simulations.deploy import DeployError, run_log
from storefed.simulations.simulate import run_federated


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    b = sub.add_parser("bench", help="seconds per round: deployment vs simulation on the "
                                     "same work (prints + writes JSON)")
    add_cluster_options(b)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--layouts", default="simulation,warm,flower",
                   help="comma-separated: simulation (Flower simulation engine), warm (this "
                        "deployment: warm executors, 0.5 s Fleet poll), flower (Flower's "
                        "default SuperNode: a process per message, 3 s poll)")
    b.add_argument("--out", default="runs/deploy-bench.json", help="JSON report")
    return "bench", _bench


def deploy_once(work: Path, values: dict[str, Any], markets: list[str], data_dir: str,
                dataset: str, layout: str = "warm",
                timeout: float = 3600.0) -> tuple[dict[str, Any], float, dict[str, float]]:
    """One run on a fresh local cluster; (metrics.json, seconds from submit to finished,
    CPU seconds per process over the run)."""
    with LocalCluster(work) as cluster:
        try:
            cluster.make_certs()
            cluster.start_superlink()
            cluster.policy = demo_policy(work, bool(values.get("secagg", True)), len(markets))
            for m in markets:  # one state directory per market, as on separate hosts
                cluster.start_nodes([m], work / "state" / m, data_dir, dataset,
                                    flower=layout != "warm")
            cpu0 = cluster.cpu_seconds()
            t0 = time.perf_counter()
            run_id, status = cluster.run(values, timeout)
            wall = time.perf_counter() - t0
            cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in cluster.cpu_seconds().items()}
            if not status.endswith("completed"):
                raise DeployError(f"{layout} deployment run ended {status}; logs in "
                                  f"{work / 'logs'}; ServerApp log tail:\n"
                                  f"{run_log(run_id, cluster.cli_env)}")
        except BaseException:
            for name in cluster.procs:
                print(f"--- {name} log tail ---\n{cluster.log_tail(name, 1500)}",
                      file=sys.stderr)
            raise
    if not status.endswith("completed"):
        raise DeployError(f"{layout} deployment run ended {status}; logs in {work / 'logs'}")
    doc: dict[str, Any] = json.loads((Path(values["out-dir"]) / "metrics.json").read_text())
    return doc, wall, cpu


def _bench(args: argparse.Namespace) -> int:
    markets = choose_markets(args.dataset, args.data_dir, args.markets)
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    bad = [x for x in layouts if x not in ("simulation", "warm", "flower")]
    if bad:
        raise ConfigError(f"--layouts: unknown layout(s) {', '.join(bad)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="storefed-bench-"))
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    base: dict[str, Any] = {"dataset": args.dataset, "data-dir": data_dir,
                            "markets": ",".join(markets), "num-rounds": args.rounds,
                            "torch-threads": 1, "device": "cpu", **parse_overrides(args.config)}
    results: dict[str, Any] = {}
    for layout in layouts:
        values = {**base, "out-dir": str(work / layout / "out")}
        t0 = time.perf_counter()
        cpu: dict[str, float] = {}
        if layout == "simulation":
            doc = run_federated(RunConfig.from_mapping(values, source="bench"))
            wall = time.perf_counter() - t0
        else:
            doc, wall, cpu = deploy_once(work / layout, values, markets, data_dir,
                                         args.dataset, layout, args.timeout)
        secs = [float(r["seconds"]) for r in doc["rounds"]]
        steady = secs[1:] or secs
        results[layout] = {"round_seconds": secs, "first_round_seconds": secs[0],
                           "steady_round_seconds": statistics.mean(steady),
                           "mean_round_seconds": statistics.mean(secs),
                           "run_wall_seconds": wall, "final_average": doc["final"]["average"],
                           "cpu_seconds_during_run": cpu}
        print(f"{layout:<11} rounds {', '.join(f'{x:.1f}' for x in secs)} s "
              f"(steady {statistics.mean(steady):.1f} s/round)", flush=True)
    if "simulation" in results:
        ref = results["simulation"]["steady_round_seconds"]
        for r in results.values():
            r["vs_simulation"] = r["steady_round_seconds"] / ref if ref > 0 else None
    report = {"config": base, "markets": markets, "cores": os.cpu_count(),
              "load_average_at_end": list(os.getloadavg()), "layouts": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'layout':<11}{'first':>8}{'steady':>9}{'x sim':>7}   (seconds per round)")
    for layout, r in results.items():
        ratio = r.get("vs_simulation")
        print(f"{layout:<11}{r['first_round_seconds']:>8.1f}{r['steady_round_seconds']:>9.1f}"
              f"{(f'{ratio:.2f}' if ratio else '-'):>7}")
    print(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0
