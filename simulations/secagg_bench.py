"""``storefed benchmark-secagg``: what SecAgg+ (and DP on top of it) costs, through Flower's
simulation engine, as ``storefed simulate`` runs.

For each client count N (default 3, 7, 20) it runs the same configuration plain and with
``--secagg`` and reports the per-round wall time of each (median over rounds 2..R: round 1
also starts the Ray actors), their ratio, the time of each SecAgg+ stage, and the final
nDCG@10 of both (relative difference). Clients are the dataset's markets, cycled when N is larger
than the number of markets (the synthetic data has 4: N = 20 runs each market on 5 nodes; the
protocol treats them as 20 distinct parties). ``--dp-noise 0.5,1,2`` adds a DP sweep (secagg +
client-level DP, ``--dp-clip``) reporting nDCG@10 against epsilon.
``--engine inprocess`` instead runs server and clients in this process (no Ray) and reports CPU
seconds per round: the protocol's computational cost, robust to other load on the machine
(wall-clock ratios on a shared, overloaded machine are mostly noise).
Prints a table and writes ``OUT/secagg_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

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


class LocalGrid(Grid):
    """In-process Grid: node ``i`` runs ``app`` with partition-id ``i`` (no Ray, no polling),
    so the CPU time of a run is the server's plus every client's."""

    def __init__(self, app: Any, n: int, run_config: dict[str, Any],
                 state_dir: Path | None = None) -> None:
        self.app = app
        self.ids = [1 + i for i in range(n)]
        # one private state dir per node: replicas of one market must not share heads
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={
            "partition-id": i, "num-partitions": n,
            **({"state-dir": str(state_dir / f"node{i}")} if state_dir else {})},
            state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(self.ids)}

    def set_run(self, run: Any) -> None:
        del run

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
            try:
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 - a failing ClientApp = an error reply
                replies.append(Message(Error(code=0, reason=repr(exc)), reply_to=msg))
        return replies


def cpu_run(cfg: RunConfig, out: Path) -> tuple[float, dict[str, Any]]:
    """Run ``cfg`` in this process through ``LocalGrid``; (CPU seconds per round, doc)."""
    from client.client_app import make_app  # noqa: PLC0415
    from server.secagg import run_server_secagg  # noqa: PLC0415
    from server.server_app import run_server  # noqa: PLC0415

    cfg = cfg.replace(out_dir=str(out), state_dir=str(out / "state"), torch_threads=1)
    overrides = cfg.to_mapping()
    grid = LocalGrid(make_app(overrides), len(cfg.market_list), overrides, out / "state")
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    t0 = time.process_time()
    doc = (run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg) if cfg.secagg
           else run_server(grid, cfg))
    return (time.process_time() - t0) / cfg.num_rounds, doc


def run_cpu_bench(cfg: RunConfig, clients: list[int], out: Path) -> list[dict[str, Any]]:
    """CPU seconds per round, plain vs SecAgg+, all in one process: what the protocol costs
    in computation, independent of message latency and of other load on the machine."""
    chosen = cfg.market_list
    cpu_run(cfg.replace(markets=_markets(cfg, 2, chosen), num_rounds=1), out / "warmup")
    rows = []
    for n in clients:
        base = cfg.replace(markets=_markets(cfg, n, chosen))
        p, dp = cpu_run(base.replace(secagg=False), out / f"cpu-n{n}-plain")
        s, ds = cpu_run(base.replace(secagg=True), out / f"cpu-n{n}-secagg")
        rows.append({"clients": n, "plain_cpu_round_s": p, "secagg_cpu_round_s": s,
                     "ratio_cpu": s / p,
                     "ndcg@10_plain": dp["final"]["average"]["ndcg@10"],
                     "ndcg@10_secagg": ds["final"]["average"]["ndcg@10"]})
        print(f"N={n:>3}  CPU per round plain {p:.2f}s secagg {s:.2f}s ratio {s / p:.2f}x | "
              f"ndcg@10 {rows[-1]['ndcg@10_plain']:.4f} vs {rows[-1]['ndcg@10_secagg']:.4f}",
              flush=True)
    return rows


def run_bench(cfg: RunConfig, clients: list[int], out: Path, dp_noise: list[float],
              dp_clip: float, verbose: bool = False, engine: str = "simulation",
              ) -> dict[str, Any]:
    """Plain vs SecAgg+ per client count (and the optional DP sweep); returns the report."""
    chosen = cfg.market_list
    rows: list[dict[str, Any]] = []
    if engine == "inprocess":
        rows = run_cpu_bench(cfg, clients, out)
        clients = []
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
    report = {"config": cfg.to_mapping(), "engine": engine, "rows": rows, "dp": dp_rows,
              "note": "simulation: per-round wall seconds, medians over rounds 2..R (round 1 "
                      "starts Ray); inprocess: CPU seconds per round of server + all clients; "
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
    p.add_argument("--engine", choices=("simulation", "inprocess"), default="simulation",
                   help="simulation: wall time through Flower's simulation engine; inprocess: "
                        "CPU time of server + clients in one process (robust to machine load)")
    p.add_argument("--out", default="runs/secagg-bench", help="output directory")
    return "benchmark-secagg", _run


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, num_rounds=args.rounds, local_epochs=args.local_epochs)
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    noise = [float(x) for x in args.dp_noise.split(",") if x.strip()]
    run_bench(cfg, clients, Path(args.out), noise, args.dp_clip, verbose=args.verbose,
              engine=args.engine)
    print(f"wrote {Path(args.out) / 'secagg_bench.json'}")
    return 0
