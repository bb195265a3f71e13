"""``storefed simulate``: a federated run through Flower's simulation engine (Ray)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod

from client.client_app import make_app as make_client_app
from server.rounds import prepare_run
from server.server_app import make_app as make_server_app
from shared.checkpoint import atomic_write_bytes
from shared.config import RunConfig, parse_overrides
from shared.data import DATASETS, available_markets, load_market
from shared.errors import ConfigError, DataError
from shared.identity import enroll
from shared.policy import NODE_CONFIG_KEY, PrivacyPolicy, load_policy, write_policy

log = logging.getLogger("storefed")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Options shared by simulate/benchmark/join: dataset selection and run-config overrides."""
    p.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="data source (default: the built-in synthetic storefronts)")
    p.add_argument("--data-dir", default="", help="directory holding the dataset's files")
    p.add_argument("--markets", default="", help="comma-separated markets (default: all found)")
    p.add_argument("--seed", type=int, default=None, help="seed for splits, negatives, init")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="where clients train (default auto: cuda when available)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="any [tool.flwr.app.config] key, e.g. --config lr=0.001 (repeatable)")


def config_from_args(args: argparse.Namespace, **explicit: Any) -> RunConfig:
    """Run config from --config overrides, then the named flags; markets resolved & checked."""
    values: dict[str, Any] = parse_overrides(args.config)
    values["dataset"] = args.dataset
    values["data-dir"] = args.data_dir
    if args.seed is not None:
        values["seed"] = args.seed
    if args.device is not None:
        values["device"] = args.device
    values.update({k.replace("_", "-"): v for k, v in explicit.items() if v is not None})
    cfg = RunConfig.from_mapping(values, source="command line")
    return cfg.replace(markets=",".join(resolve_markets(cfg, args.markets)))


def resolve_markets(cfg: RunConfig, markets_arg: str) -> list[str]:
    """The selected markets, checked against those present in the data directory."""
    if cfg.dataset != "synthetic":
        if not cfg.data_dir:
            raise DataError(f"--data-dir is required for dataset {cfg.dataset!r}")
        if not Path(cfg.data_dir).is_dir():
            raise DataError(f"data directory {cfg.data_dir} does not exist")
    found = available_markets(cfg.dataset, cfg.data_dir or None)
    wanted = [m.strip() for m in markets_arg.split(",") if m.strip()] or found
    unknown = [m for m in wanted if m not in found]
    if unknown:
        raise DataError(f"unknown market(s) {', '.join(unknown)} in {cfg.dataset} "
                        f"{cfg.data_dir or '(synthetic)'}; known: {', '.join(found)}")
    if not wanted:
        raise DataError(f"no markets found for dataset {cfg.dataset} in {cfg.data_dir}")
    return wanted


def run_federated(cfg: RunConfig, verbose: bool = False,
                  client_mods: list[Mod] | None = None,
                  policy: PrivacyPolicy | None = None) -> dict[str, Any]:
    """Run ``cfg`` through ``flwr.simulation.run_simulation``; returns metrics.json's content.

    ``client_mods`` (Flower client mods) wrap every client's handlers, e.g. for fault tests.
    ``policy``: the privacy policy every simulated market holds (written to each market's
    state directory: whoever runs a local simulation holds every market); None keeps what the
    state directories hold, else the private defaults.

    One virtual SuperNode per market (partition-id i -> markets[i]); clients run in Ray actors,
    as many at once as there are cores, each with cores/concurrency torch threads.
    """
    from flwr.simulation import run_simulation  # noqa: PLC0415 - heavy import

    markets = cfg.market_list
    preflight(cfg)  # bad data/config/checkpoint fail here, before anything is written
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = Path(cfg.state_dir) if cfg.state_dir else out / "state"
    if not cfg.resume and state_dir.exists() and not cfg.state_dir:
        shutil.rmtree(state_dir)  # a fresh run must not pick up an earlier run's heads
    cores = os.cpu_count() or 1
    use_gpu = cfg.device in ("auto", "cuda") and _cuda_available()
    concurrency = max(1, min(len(markets), cores))
    threads = cfg.torch_threads or max(1, cores // concurrency)
    cfg = cfg.replace(state_dir=str(state_dir), torch_threads=threads)
    for market in markets:
        if policy is not None:
            write_policy(state_dir / market, policy)
        check_policy_allows(load_policy({}, state_dir / market), cfg, market)
    # whoever simulates holds every market: each gets an identity key and trusts the others',
    # so the SecAgg+ round keys are signed and checked (shared/identity.py). Replicas of one
    # market (the lab's scaling runs) share its name: they stay unauthenticated
    if len(set(markets)) == len(markets):
        enroll(state_dir, markets)
    overrides = cfg.to_mapping()
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": max(1, cores // concurrency),
                             "num_gpus": (1.0 / concurrency) if use_gpu else 0.0},
        "init_args": {"num_cpus": cores, "include_dashboard": False,
                      "logging_level": "warning", "log_to_driver": verbose},
    }
    atomic_write_bytes(out / "run_config.json", json.dumps(overrides, indent=2).encode())
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    run_simulation(server_app=make_server_app(overrides),
                   client_app=make_client_app(overrides, mods=client_mods),
                   num_supernodes=len(markets), backend_config=backend,
                   verbose_logging=verbose)
    metrics_path = out / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"simulation ended without writing {metrics_path}; rerun with -v")
    doc: dict[str, Any] = json.loads(metrics_path.read_text())
    doc["wall_seconds"] = time.perf_counter() - t0
    return doc


def lab_policy(secagg: bool, n_markets: int) -> PrivacyPolicy:
    """The policy of markets that one person simulates together (the lab's benchmarks, local
    demos): the private defaults, except plain FedAvg for a plain run and a smaller minimum sum
    when fewer than three markets take part."""
    return PrivacyPolicy(secure_aggregation_only=secagg,
                         min_markets=max(2, min(n_markets, PrivacyPolicy().min_markets)))


def check_policy_allows(policy: PrivacyPolicy, cfg: RunConfig, market: str) -> None:
    """Fail before the simulation starts when a market's policy would refuse the whole run
    (the client would refuse every round; here the user gets the reason at once)."""
    if policy.secure_aggregation_only and not cfg.secagg:
        raise ConfigError(f"market {market}'s privacy policy is secure-aggregation-only, so it "
                          f"refuses a run with secagg = false; give the simulated markets "
                          f"another policy with --market-policy FILE "
                          f"(secure-aggregation-only = false)")
    n = max(1, int(len(cfg.market_list) * cfg.fraction_train))
    if cfg.secagg and n < policy.min_markets:
        raise ConfigError(f"{n} market(s) per round, but market {market}'s privacy policy needs "
                          f"at least min-markets = {policy.min_markets} in any sum; add markets "
                          f"or give the simulated markets another policy with "
                          f"--market-policy FILE")


def preflight(cfg: RunConfig) -> None:
    """Everything the server and the clients will read, checked in this process before the
    simulation starts: the catalog, each market's data and split, and (with ``resume``) the
    checkpoint. A StorefedError here leaves the output directory untouched."""
    prepare_run(cfg)
    for market in cfg.market_list:
        load_market(cfg.dataset, cfg.data_dir or None, market, seed=cfg.seed,
                    n_neg=cfg.eval_negatives, max_history=cfg.max_history)


def _cuda_available() -> bool:
    import torch  # noqa: PLC0415

    return bool(torch.cuda.is_available())


def print_summary(doc: dict[str, Any]) -> None:
    final = doc["final"]
    print(f"{'market':<12}{'ndcg@10':>10}{'hr@10':>10}{'users':>8}")
    for m, v in final["markets"].items():
        print(f"{m:<12}{v['ndcg@10']:>10.4f}{v['hr@10']:>10.4f}{v['examples']:>8}")
    avg = final["average"]
    print(f"{'average':<12}{avg['ndcg@10']:>10.4f}{avg['hr@10']:>10.4f}")


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("simulate", help="federated simulation (Flower simulation engine)",
                       description="Run a federated simulation and write OUT/metrics.json and "
                                   "OUT/encoder.pt.")
    add_run_options(p)
    p.add_argument("--rounds", type=int, default=None, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=None, help="local epochs per round")
    p.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=None,
                   help="aggregate with SecAgg+ (default: on, run-config secagg = true); "
                        "--no-secagg: plain FedAvg")
    p.add_argument("--resume", action="store_true", help="continue from OUT/encoder.pt")
    p.add_argument("--market-policy", default=None, metavar="FILE",
                   help="privacy policy (TOML, see shared/policy.py) every simulated market "
                        "holds (default: what each market's state directory holds, else the "
                        "private defaults)")
    p.add_argument("--out", default="runs/latest", help="output directory")
    return "simulate", _run


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, num_rounds=args.rounds, local_epochs=args.local_epochs,
                           out_dir=args.out, secagg=args.secagg,
                           resume=True if args.resume else None)
    log.info("simulating %d markets (%s) of %s for %d rounds -> %s", len(cfg.market_list),
             cfg.markets, cfg.dataset, cfg.num_rounds, cfg.out_dir)
    policy = (load_policy({NODE_CONFIG_KEY: args.market_policy}, None)
              if args.market_policy else None)
    doc = run_federated(cfg, verbose=args.verbose, policy=policy)
    print_summary(doc)
    print(f"wrote {Path(cfg.out_dir) / 'metrics.json'} and {Path(cfg.out_dir) / 'encoder.pt'} "
          f"({doc['wall_seconds']:.1f}s)")
    return 0
