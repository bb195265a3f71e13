"""``storefed benchmark-secagg``: what SecAgg+ (and DP on top of it) costs against plain
aggregation, on the same configuration.

For each client count N (default 3, 7, 20) the plain and the SecAgg+ arm are run **interleaved**
(``--repeats`` pairs in ABBA order: plain, secagg, secagg, plain, ...) so that slow drifts in the
machine's load hit both arms alike; it reports the per-round wall time of each arm (median over
rounds 2..R-1 of every repeat: see ``_steady``), their ratio, the
ratio of each repeat pair, the machine's load average, the time of each SecAgg+ stage and the
final nDCG@10 of both (relative difference). Clients are the dataset's markets, cycled when N is
larger than the number of markets (the synthetic data has 4: N = 20 runs each market on 5 nodes;
the protocol treats them as 20 distinct parties).

Engines (``--engine``, comma-separated): ``simulation`` runs Flower's simulation engine as
``storefed simulate`` does; ``inprocess`` runs server and clients in this process (no Ray, no
polling) and also reports CPU seconds per round and a **profile** of the SecAgg+ arm: seconds
per round in key agreement (ECDH key pairs and shared keys), share generation (Shamir +
encryption), share decryption, encoding, masking (client PRG), unmasking (server Shamir
reconstruction + PRG), protocol state, local training and evaluation (exclusive times).
``--dp-noise 0.5,1,2`` adds a DP sweep (secagg + client-level DP, ``--dp-clip``, each market
once, after a SecAgg+ run without DP as the reference) reporting nDCG@10 against epsilon, run
by the first engine named. Prints a table and writes ``OUT/secagg_bench.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig
from storefed.shared.data import available_markets
from storefed.shared.errors import ConfigError
from storefed.shared.policy import NODE_CONFIG_KEY, write_policy
from storefed.simulations.simulate import (
    add_run_options,
    config_from_args,
    lab_policy,
    run_federated,
)

T = TypeVar("T")
ENGINES = ("simulation", "inprocess")
ARMS = ("plain", "secagg")


def _markets(cfg: RunConfig, n: int, chosen: list[str]) -> str:
    pool = chosen or available_markets(cfg.dataset, cfg.data_dir or None)
    return ",".join(pool[i % len(pool)] for i in range(n))


def _steady(vals: list[T]) -> list[T]:
    """Rounds 2..R-1, the same window for both arms: round 1 also starts Ray and builds the
    models (and under pipelined SecAgg+ runs every stage), and a pipelined SecAgg+ round r < R
    also trains round r + 1 (its masked upload rides on round r's evaluation), so its last
    round trains nothing. Fewer than three rounds: rounds 2..R, or all if there is one."""
    if len(vals) >= 3:
        return vals[1:-1]
    return vals[1:] if len(vals) > 1 else vals


def _stages(docs: list[dict[str, Any]]) -> dict[str, float]:
    rounds = [r for d in docs for r in _steady(d["rounds"])]
    names = sorted({k for r in rounds for k in r.get("secagg", {}).get("stage_seconds", {})})
    return {k: statistics.median(r["secagg"]["stage_seconds"].get(k, 0.0) for r in rounds)
            for k in names}


class LocalGrid(Grid):
    """In-process Grid: node ``i`` runs ``app`` with partition-id ``i`` (no Ray, no polling),
    so the CPU time of a run is the server's plus every client's. ``marks`` holds (CPU, wall)
    clocks at the end of every evaluate exchange, i.e. at the end of every round's messaging."""

    def __init__(self, app: Any, n: int, run_config: dict[str, Any],
                 state_dir: Path | None = None, policy: Path | None = None) -> None:
        self.app = app
        self.ids = [1 + i for i in range(n)]
        # one private state dir per node: replicas of one market must not share heads
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={
            "partition-id": i, "num-partitions": n,
            **({NODE_CONFIG_KEY: str(policy)} if policy else {}),
            **({"state-dir": str(state_dir / f"node{i}")} if state_dir else {})},
            state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(self.ids)}
        self.marks: list[tuple[float, float]] = []

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
        evaluate = False
        for msg in messages:
            evaluate = evaluate or msg.metadata.message_type == "evaluate"
            TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
            try:
                replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # noqa: BLE001 - a failing ClientApp = an error reply
                replies.append(Message(Error(code=0, reason=repr(exc)), reply_to=msg))
        if evaluate:
            self.marks.append((time.process_time(), time.perf_counter()))
        return replies


# ------------------------------------------------------------------------------ profile
# (module, attribute, bucket): the SecAgg+ work, timed exclusively (a bucket's time excludes
# the time of the profiled calls it makes)
PROFILED = (
    ("storefed.client.secagg", "", "generate_keys", "key agreement"),
    ("storefed.client.secagg", "", "shared_key", "key agreement"),
    ("storefed.server.secagg", "", "shared_key", "key agreement"),
    ("storefed.client.secagg", "", "create_shares", "share generation"),
    ("storefed.client.secagg", "", "encrypt", "share generation"),
    ("storefed.client.secagg", "", "_share_keys", "share generation"),
    ("storefed.client.secagg", "", "decrypt", "share decryption"),
    ("storefed.client.secagg", "", "encode", "encoding"),
    ("storefed.server.secagg", "", "decode", "encoding"),
    ("storefed.client.secagg", "", "prg_mask", "masking"),
    ("storefed.client.secagg", "", "_masked", "masking"),
    ("storefed.server.secagg", "", "combine_shares", "unmasking"),
    ("storefed.server.secagg", "", "prg_mask", "unmasking"),
    ("storefed.client.secagg", "", "_save", "protocol state"),
    ("storefed.client.secagg", "", "_load", "protocol state"),
    ("storefed.shared.node", "MarketNode", "train_round", "local training"),
    ("storefed.shared.node", "MarketNode", "evaluate", "evaluation"),
)


class Profile:
    """Exclusive wall seconds per bucket of the functions in ``PROFILED`` (single thread)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._children: list[float] = []

    def wrap(self, fn: Callable[..., Any], bucket: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                inner = self._children.pop()
                self.seconds[bucket] = self.seconds.get(bucket, 0.0) + took - inner
                if self._children:
                    self._children[-1] += took
        return timed

    @contextlib.contextmanager
    def active(self) -> Iterator[Profile]:
        import importlib  # noqa: PLC0415

        saved = []
        for module, cls, name, bucket in PROFILED:
            owner: Any = importlib.import_module(module)
            if cls:
                owner = getattr(owner, cls)
            saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, self.wrap(getattr(owner, name), bucket))
        try:
            yield self
        finally:
            for owner, name, fn in reversed(saved):
                setattr(owner, name, fn)


# ------------------------------------------------------------------------------ runs
def cpu_run(cfg: RunConfig, out: Path, profile: Profile | None = None,
            ) -> tuple[float, dict[str, Any]]:
    """Run ``cfg`` in this process through ``LocalGrid``; (CPU seconds per steady round, doc).
    The doc gets ``cpu_round_seconds`` and ``wall_round_seconds`` (per round, from the ends
    of the evaluate exchanges) and, with ``profile``, the SecAgg+ profile."""
    from storefed.client.client_app import make_app  # noqa: PLC0415
    from storefed.server.rounds import PlainAggregation, run_rounds  # noqa: PLC0415
    from storefed.server.secagg import SecAggAggregation  # noqa: PLC0415

    cfg = cfg.replace(out_dir=str(out), state_dir=str(out / "state"), torch_threads=1)
    overrides = cfg.to_mapping()
    # the lab holds every market of the bench: plain arms need a policy that lets them out
    policy = write_policy(out / "lab-policy", lab_policy(cfg.secagg, len(cfg.market_list)))
    grid = LocalGrid(make_app(overrides), len(cfg.market_list), overrides, out / "state",
                     policy)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    ctx = profile.active() if profile is not None else contextlib.nullcontext()
    with ctx:
        grid.marks.append((time.process_time(), time.perf_counter()))
        doc = run_rounds(grid, cfg, SecAggAggregation if cfg.secagg else PlainAggregation)
    cpu = [b[0] - a[0] for a, b in zip(grid.marks, grid.marks[1:], strict=False)]
    wall = [b[1] - a[1] for a, b in zip(grid.marks, grid.marks[1:], strict=False)]
    doc["cpu_round_seconds"], doc["wall_round_seconds"] = cpu, wall
    return statistics.median(_steady(cpu)), doc


def _arm_order(repeats: int) -> list[str]:
    """ABBA...: plain, secagg, secagg, plain, plain, secagg, ..."""
    out: list[str] = []
    for r in range(repeats):
        out.extend(ARMS if r % 2 == 0 else ARMS[::-1])
    return out


def _run_arm(engine: str, cfg: RunConfig, out: Path, verbose: bool,
             profile: Profile | None) -> dict[str, Any]:
    load = os.getloadavg()[0]
    if engine == "inprocess":
        _, doc = cpu_run(cfg, out, profile if cfg.secagg else None)
        wall = doc["wall_round_seconds"]
    else:
        doc = run_federated(cfg.replace(out_dir=str(out)), verbose,
                            policy=lab_policy(cfg.secagg, len(cfg.market_list)))
        wall = [float(r["seconds"]) for r in doc["rounds"]]
    doc["bench"] = {"wall": wall, "cpu": doc.get("cpu_round_seconds"),
                    "load_start": load, "load_end": os.getloadavg()[0]}
    return doc


def _median(docs: list[dict[str, Any]], key: str) -> float | None:
    vals = [v for d in docs for v in _steady(d["bench"][key] or [])]
    return statistics.median(vals) if vals else None


def bench_clients(engine: str, cfg: RunConfig, n: int, out: Path, repeats: int,
                  verbose: bool = False) -> dict[str, Any]:
    """Both arms for ``n`` clients, interleaved ABBA over ``repeats`` pairs; one table row."""
    base = cfg.replace(markets=_markets(cfg, n, cfg.market_list))
    docs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    profile = Profile()
    order = _arm_order(repeats)
    for i, arm in enumerate(order):
        c = base.replace(secagg=arm == "secagg")
        docs[arm].append(_run_arm(engine, c, out / f"{engine}-n{n}-{i}-{arm}", verbose, profile))
    p_wall, s_wall = _median(docs["plain"], "wall"), _median(docs["secagg"], "wall")
    assert p_wall is not None and s_wall is not None
    pairs = [statistics.median(_steady(s["bench"]["wall"]))
             / statistics.median(_steady(p["bench"]["wall"]))
             for p, s in zip(docs["plain"], docs["secagg"], strict=True)]
    q_p = statistics.mean(d["final"]["average"]["ndcg@10"] for d in docs["plain"])
    q_s = statistics.mean(d["final"]["average"]["ndcg@10"] for d in docs["secagg"])
    row: dict[str, Any] = {
        "engine": engine, "clients": n, "markets": base.markets, "repeats": repeats,
        "order": order, "plain_round_s": p_wall, "secagg_round_s": s_wall,
        "ratio_round": s_wall / p_wall, "ratio_round_per_repeat": pairs,
        "load_average": [round(d["bench"][k], 2) for d in docs["plain"] + docs["secagg"]
                         for k in ("load_start", "load_end")],
        "secagg_stage_s": _stages(docs["secagg"]),
        "ndcg@10_plain": q_p, "ndcg@10_secagg": q_s,
        "ndcg_rel_diff": (q_s - q_p) / q_p if q_p else 0.0,
        "clipped_values": sum(r["secagg"]["clipped_values"] for d in docs["secagg"]
                              for r in d["rounds"]),
        "vector_length": docs["secagg"][0]["rounds"][0]["secagg"]["vector_length"],
        # every secagg round summed all n clients, every plain round trained and evaluated
        # (a failed start, e.g. Ray timing out under load, would leave empty rounds)
        "complete": all(len(r["secagg"]["attempts"][-1].get("aggregated", [])) == n
                        for d in docs["secagg"] for r in d["rounds"])
        and all(r["markets"] and not r["rejected"] for d in docs["plain"] for r in d["rounds"]),
    }
    if engine == "inprocess":
        p_cpu, s_cpu = _median(docs["plain"], "cpu"), _median(docs["secagg"], "cpu")
        assert p_cpu is not None and s_cpu is not None
        rounds = sum(len(d["rounds"]) for d in docs["secagg"])
        row.update(plain_cpu_round_s=p_cpu, secagg_cpu_round_s=s_cpu, ratio_cpu=s_cpu / p_cpu,
                   secagg_profile_s_per_round={k: v / rounds for k, v in
                                               sorted(profile.seconds.items())})
        row["secagg_protocol_s_per_round"] = sum(
            v for k, v in row["secagg_profile_s_per_round"].items()
            if k not in ("local training", "evaluation"))
    _print_row(row)
    return row


def run_bench(cfg: RunConfig, clients: list[int], out: Path, dp_noise: list[float],
              dp_clip: float, verbose: bool = False, engine: str = "simulation",
              repeats: int = 2) -> dict[str, Any]:
    """Plain vs SecAgg+ per engine and client count (and the optional DP sweep)."""
    engines = [e.strip() for e in engine.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        raise ValueError(f"unknown engine(s) {bad}; choose from {ENGINES}")
    rows: list[dict[str, Any]] = []
    out.mkdir(parents=True, exist_ok=True)
    if "inprocess" in engines and clients:  # imports, data caches: not in the first arm
        cpu_run(cfg.replace(markets=_markets(cfg, 2, cfg.market_list), num_rounds=1,
                            secagg=True), out / "warmup")
    report: dict[str, Any] = {"config": cfg.to_mapping(), "engines": engines, "rows": rows,
                              "dp": [], "note": NOTE}
    for eng in engines:
        for n in clients:
            rows.append(bench_clients(eng, cfg, n, out, repeats, verbose))
            _write(out, report)
    dp_rows: list[dict[str, Any]] = report["dp"]
    if dp_noise:
        base = cfg.replace(secagg=True)  # the selected markets, once each
        # reference first: SecAgg+ without DP (no clipping, no noise, row-wise weights)
        for sigma in [None, *dp_noise]:
            c = (base.replace(out_dir=str(out / "dp-none")) if sigma is None else
                 base.replace(dp_noise=sigma, dp_clip=dp_clip,
                              out_dir=str(out / f"dp-{sigma:g}")))
            if engines[0] == "inprocess":  # the first engine named runs the sweep
                t0 = time.perf_counter()
                _, doc = cpu_run(c, Path(c.out_dir))
                doc["wall_seconds"] = time.perf_counter() - t0
            else:
                doc = run_federated(c, verbose, policy=lab_policy(True, len(c.market_list)))
            norms = [r["secagg"]["dp_delta_norm_median"] for r in doc["rounds"]
                     if "dp_delta_norm_median" in r["secagg"]]
            dp_rows.append({"dp_noise": sigma, "dp_clip": dp_clip if sigma is not None else None,
                            "epsilon": doc["privacy"]["epsilon"] if sigma is not None else None,
                            "delta": c.dp_delta,
                            "ndcg@10": doc["final"]["average"]["ndcg@10"],
                            "hr@10": doc["final"]["average"]["hr@10"],
                            "dp_delta_norm_median": statistics.median(norms) if norms else None,
                            "rounds": c.num_rounds, "wall_seconds": doc["wall_seconds"]})
            eps = "-" if sigma is None else f"{dp_rows[-1]['epsilon']:.2f}"
            print(f"dp-noise {'none' if sigma is None else f'{sigma:g}'}: epsilon {eps} "
                  f"ndcg@10 {dp_rows[-1]['ndcg@10']:.4f} hr@10 {dp_rows[-1]['hr@10']:.4f} "
                  f"({doc['wall_seconds']:.0f}s)", flush=True)
            _write(out, report)
    _write(out, report)
    return report


NOTE = ("per-round wall seconds: medians over rounds 2..R-1 of every repeat, arms interleaved "
        "ABBA; inprocess also CPU seconds per round of server + all clients and the SecAgg+ "
        "profile (exclusive seconds per round, summed over server and clients); "
        "ratio = secagg / plain")


def _write(out: Path, report: dict[str, Any]) -> None:
    atomic_write_bytes(out / "secagg_bench.json", json.dumps(report, indent=2).encode())


def _print_row(r: dict[str, Any]) -> None:
    stages = " ".join(f"{k}={v:.2f}" for k, v in r["secagg_stage_s"].items())
    pairs = ",".join(f"{x:.2f}" for x in r["ratio_round_per_repeat"])
    line = (f"[{r['engine']}] N={r['clients']:>3}  round plain {r['plain_round_s']:.2f}s secagg "
            f"{r['secagg_round_s']:.2f}s ratio {r['ratio_round']:.2f}x (pairs {pairs})")
    if "ratio_cpu" in r:
        line += (f" | CPU {r['plain_cpu_round_s']:.2f}s vs {r['secagg_cpu_round_s']:.2f}s "
                 f"ratio {r['ratio_cpu']:.2f}x")
    line += (f" | ndcg@10 {r['ndcg@10_plain']:.4f} vs {r['ndcg@10_secagg']:.4f} "
             f"({100 * r['ndcg_rel_diff']:+.2f}%) | load {min(r['load_average']):.1f}-"
             f"{max(r['load_average']):.1f} | {stages}")
    print(line, flush=True)
    if not r["complete"]:
        print("    WARNING: some rounds did not aggregate every client: times not comparable",
              flush=True)
    if "secagg_profile_s_per_round" in r:
        prof = " ".join(f"{k}={v:.3f}" for k, v in r["secagg_profile_s_per_round"].items())
        print(f"    secagg profile (s/round): {prof}", flush=True)


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("benchmark-secagg", help="SecAgg+ (and DP) cost vs plain aggregation",
                       description=__doc__)
    add_run_options(p)
    p.add_argument("--clients", default="3,7,20", help="client counts (default 3,7,20)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    p.add_argument("--local-epochs", type=int, default=None)
    p.add_argument("--dp-noise", default="", help="comma-separated noise multipliers to sweep")
    p.add_argument("--dp-clip", type=float, default=0.5, help="L2 clip for the DP sweep")
    p.add_argument("--engine", default="simulation",
                   help="comma-separated: simulation (Flower's simulation engine, wall time), "
                        "inprocess (server + clients in this process: wall and CPU time and "
                        "the SecAgg+ profile); default simulation")
    p.add_argument("--repeats", type=int, default=2,
                   help="plain/secagg pairs per client count, interleaved ABBA (default 2)")
    p.add_argument("--out", default="runs/secagg-bench", help="output directory")
    return "benchmark-secagg", _run


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, num_rounds=args.rounds, local_epochs=args.local_epochs)
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    noise = [float(x) for x in args.dp_noise.split(",") if x.strip()]
    bad = [e for e in args.engine.split(",") if e.strip() not in ENGINES]
    if bad or args.repeats < 1:
        raise ConfigError(f"--engine takes {', '.join(ENGINES)} (got {args.engine!r}) and "
                          f"--repeats must be >= 1 (got {args.repeats})")
    run_bench(cfg, clients, Path(args.out), noise, args.dp_clip, verbose=args.verbose,
              engine=args.engine, repeats=args.repeats)
    print(f"wrote {Path(args.out) / 'secagg_bench.json'}")
    return 0
