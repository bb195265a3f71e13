"""``storefed loadtest``: federated simulations over many synthetic storefronts.

For each requested number of storefronts N, the synthetic generator of ``shared.data`` makes N
markets over one shared catalog; they are written as XMarket per-category files
(``ratings_<market>_<category>.txt``) under ``OUT/data-N`` and read back by the XMarket reader,
so the load run goes through the same reader, split, client and server code as a real run.
``run_federated`` then runs them through Flower's simulation engine (one virtual SuperNode per
storefront). Reported per N: seconds per round (from metrics.json; "s/round" is the mean of
rounds 2.., as round 1 also waits for Ray's workers to start), wall time, and peak memory:
the largest sum over the process tree (this process, Ray's processes and its workers) of the
resident set (RSS, counts shared library pages once per process) and of the proportional set
(PSS, shared pages split between processes; the better estimate of the machine's use),
sampled every ``--sample-every`` seconds from /proc (Linux), plus this process' own
``getrusage`` maximum. Results are printed and written to ``OUT/loadtest.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig
from storefed.shared.data import generate_synthetic
from storefed.shared.errors import ConfigError
from storefed.simulations.command import add_run_config_option

log = logging.getLogger("storefed")


def write_storefronts(data_dir: Path, n_markets: int, *, n_items: int, users: int,
                      interactions: int, n_categories: int, seed: int) -> list[str]:
    """Write ``n_markets`` synthetic storefronts as XMarket files; returns the market names."""
    df = generate_synthetic(n_markets=n_markets, n_categories=n_categories, n_items=n_items,
                            users_per_market=users, interactions_per_user=interactions,
                            seed=seed)
    width = max(3, len(str(n_markets - 1)))
    rename = {f"m{m}": f"s{m:0{width}d}" for m in range(n_markets)}
    df = df.assign(market=df["market"].map(rename),
                   date=pd.to_datetime(df["timestamp"], unit="s").dt.strftime("%Y-%m-%d"))
    data_dir.mkdir(parents=True, exist_ok=True)
    for (market, category), g in df.groupby(["market", "category"], sort=True):
        lines = [f"{u} {i} {r:.1f} {d}" for u, i, r, d in
                 zip(g["user"], g["item"], g["rating"], g["date"], strict=True)]
        body = "userId itemId rate date\n" + "\n".join(lines) + "\n"
        atomic_write_bytes(data_dir / f"ratings_{market}_{category}.txt", body.encode())
    return [rename[f"m{m}"] for m in range(n_markets)]


# --------------------------------------------------------------------------- memory sampling


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces/parentheses: split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def _tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB (0, 0 when it is gone or unreadable)."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (OSError, ValueError):
        return 0, 0
    return rss, pss


class TreeMemorySampler:
    """Samples the summed RSS/PSS of this process and all its descendants in a thread."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.peak_rss_kb = 0
        self.peak_pss_kb = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        pids = _tree(os.getpid())
        mems = [_mem_kb(p) for p in pids]
        self.peak_rss_kb = max(self.peak_rss_kb, sum(r for r, _ in mems))
        self.peak_pss_kb = max(self.peak_pss_kb, sum(p for _, p in mems))
        self.peak_processes = max(self.peak_processes, len(pids))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> TreeMemorySampler:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


# --------------------------------------------------------------------------- one load run


def load_run(n: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Generate ``n`` storefronts, simulate ``args.rounds`` rounds, return the figures."""
    from storefed.simulations.simulate import parse_overrides, run_federated  # noqa: PLC0415

    t0 = time.perf_counter()
    data_dir = out / f"data-{n}"
    markets = write_storefronts(data_dir, n, n_items=args.items, users=args.users,
                                interactions=args.interactions,
                                n_categories=args.categories, seed=args.seed)
    t_data = time.perf_counter() - t0
    values: dict[str, Any] = {
        "embedding-dim": args.embedding_dim, "local-epochs": args.local_epochs,
        "eval-negatives": 99, "device": args.device,
        **parse_overrides(args.config),
        "dataset": "xmarket", "data-dir": str(data_dir), "markets": ",".join(markets),
        "num-rounds": args.rounds, "seed": args.seed, "out-dir": str(out / f"run-{n}"),
    }
    cfg = RunConfig.from_mapping(values, source="loadtest")
    log.info("loadtest: %d storefronts x %d rounds -> %s", n, args.rounds, cfg.out_dir)
    with TreeMemorySampler(args.sample_every) as mem:
        t1 = time.perf_counter()
        doc = run_federated(cfg, verbose=args.verbose)
        wall = time.perf_counter() - t1
    rounds = doc["rounds"]
    per_round = [float(r["seconds"]) for r in rounds]
    trained = [sum(1 for m in r["markets"].values() if m.get("trained"))
               for r in rounds]
    evaluated = [len(r["markets"]) for r in rounds]
    return {
        "storefronts": n, "rounds": len(rounds),
        "round_seconds": per_round, "mean_round_seconds": float(np.mean(per_round)),
        # round 1 also waits for Ray's actors to start and load data; later rounds do not
        "steady_round_seconds": float(np.mean(per_round[1:] or per_round)),
        "train_seconds": [float(r.get("train_seconds", 0.0)) for r in rounds],
        "clients_trained": trained, "clients_evaluated": evaluated,
        "rejected": sum(len(r.get("rejected", [])) for r in rounds),
        "simulation_wall_seconds": wall, "data_seconds": t_data,
        "peak_tree_rss_mib": mem.peak_rss_kb / 1024, "peak_tree_pss_mib": mem.peak_pss_kb / 1024,
        "peak_processes": mem.peak_processes,
        "self_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_avg_ndcg@10": doc["final"]["average"]["ndcg@10"],
        "load_avg_1min_at_end": os.getloadavg()[0],  # other work on the machine skews times
        "interactions": n * args.users * args.interactions,
    }


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"--storefronts {text!r}: expected comma-separated integers") from exc
    if not sizes or min(sizes) < 2:
        raise ConfigError(f"--storefronts {text!r}: need at least one size, each >= 2")
    return sizes


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("loadtest", help="simulations over many synthetic storefronts",
                       description="Simulate N synthetic storefronts for a few rounds and report "
                                   "time per round and peak memory (OUT/loadtest.json).")
    p.add_argument("--storefronts", default="10,100", help="comma-separated sizes (10,100,500)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="runs/loadtest", help="output directory")
    p.add_argument("--users", type=int, default=100, help="users per storefront")
    p.add_argument("--interactions", type=int, default=14, help="interactions per user")
    p.add_argument("--items", type=int, default=1000, help="catalog items")
    p.add_argument("--categories", type=int, default=4)
    p.add_argument("--embedding-dim", type=int, default=32)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--sample-every", type=float, default=0.5, help="memory sampling period (s)")
    add_run_config_option(p)
    return "loadtest", _run


def _run(args: argparse.Namespace) -> int:
    sizes = _sizes(args.storefronts)
    out = Path(args.out)
    results: list[dict[str, Any]] = []
    host = {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    print(f"{'stores':>7}{'s/round':>10}{'rounds (s)':>24}{'peak PSS MiB':>14}"
          f"{'peak RSS MiB':>14}{'procs':>7}")
    for n in sizes:
        r = load_run(n, args, out)
        results.append(r)
        rounds = ", ".join(f"{s:.1f}" for s in r["round_seconds"])
        print(f"{n:>7}{r['steady_round_seconds']:>10.1f}{rounds:>24}"
              f"{r['peak_tree_pss_mib']:>14.0f}{r['peak_tree_rss_mib']:>14.0f}"
              f"{r['peak_processes']:>7}", flush=True)
        doc = {"command": "storefed loadtest", "args": {k: v for k, v in vars(args).items()
                                                        if k != "func"},
               "host": host, "results": results}
        atomic_write_bytes(out / "loadtest.json", json.dumps(doc, indent=2).encode())
    print(f"wrote {out / 'loadtest.json'}")
    return 0
