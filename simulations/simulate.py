"""``storefed simulate``: a federated run through Flower's simulation engine (Ray)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod

from storefed.client.client_app import make_app as make_client_app
from storefed.server.rounds import prepare_run
from storefed.server.server_app import make_app as make_server_app
from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig, parse_overrides
from storefed.shared.data import DATASETS, ReaderOptions, available_markets, load_market
from storefed.shared.errors import ConfigError, DataError
from storefed.shared.identity import enroll
from storefed.shared.policy import NODE_CONFIG_KEY, PrivacyPolicy, load_policy, write_policy
from storefed.simulations.command import add_run_config_option

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
    add_run_config_option(p)


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
                  policy: PrivacyPolicy | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Run ``cfg`` through ``flwr.simulation.run_simulation``; returns metrics.json's content.

    ``progress``: a bar with an ETA over the rounds on stderr (``RoundProgress``).

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
    logging.getLogger("flwr").addFilter(_RunSimulationDeprecation())
    t0 = time.perf_counter()
    metrics_path = out / "metrics.json"
    with RoundProgress(metrics_path, cfg.num_rounds, enabled=progress):
        run_simulation(server_app=make_server_app(overrides),
                       client_app=make_client_app(overrides, mods=client_mods),
                       num_supernodes=len(markets), backend_config=backend,
                       verbose_logging=verbose)
    if not metrics_path.is_file():
        raise RuntimeError(f"simulation ended without writing {metrics_path}; rerun with -v")
    doc: dict[str, Any] = json.loads(metrics_path.read_text())
    doc["wall_seconds"] = time.perf_counter() - t0
    return doc


class _RunSimulationDeprecation(logging.Filter):
    """Drops Flower's "``run_simulation`` is deprecated, use ``flwr run``" warning: `storefed
    simulate` is the supported entry point here (`flwr run .` is documented beside it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


class RoundProgress:
    """A bar with an ETA over a run's rounds, advanced by watching ``metrics.json`` (the server
    rewrites it after every round) from a thread, so the server's round loop stays untouched."""

    def __init__(self, metrics_path: Path, rounds: int, enabled: bool = True) -> None:
        self.path, self.rounds, self.enabled = metrics_path, rounds, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _done(self) -> int:
        try:
            return len(json.loads(self.path.read_text()).get("rounds", []))
        except (OSError, ValueError):
            return 0

    def _watch(self) -> None:
        from storefed.shared.progress import bar  # noqa: PLC0415

        start = self._done()  # rounds already there (--resume)
        pbar = bar(self.rounds, "rounds", unit="round")
        pbar.update(start)
        seen = start
        while not self._stop.wait(0.5):
            done = min(self._done(), self.rounds)
            if done > seen:
                pbar.update(done - seen)
                seen = done
        done = min(self._done(), self.rounds)
        pbar.update(max(0, done - seen))
        pbar.close()

    def __enter__(self) -> RoundProgress:
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


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
                    n_neg=cfg.eval_negatives, max_history=cfg.max_history,
                    options=ReaderOptions.from_run_config(cfg.to_mapping()))


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
    doc = run_federated(cfg, verbose=args.verbose, policy=policy, progress=True)
    print_summary(doc)
    out = Path(cfg.out_dir)
    report_run(doc, cfg, out)
    print(f"wrote {out / 'metrics.json'}, {out / 'encoder.pt'} and {out / 'learning_curve.png'} "
          f"({doc['wall_seconds']:.1f}s)")
    joining = [m for m in available_markets(cfg.dataset, cfg.data_dir or None)
               if m not in cfg.market_list]
    data = ("" if cfg.dataset == "synthetic"
            else f" --dataset {cfg.dataset} --data-dir {cfg.data_dir}")
    if joining:
        target = out.parent / f"join-{joining[0]}"
        print(f"next: a new market joins from this encoder:\n  storefed join --encoder "
              f"{out / 'encoder.pt'}{data} --market {joining[0]} --out {target}")
    else:
        print(f"next: recommendations for one of its users:\n  storefed recommend --run-dir "
              f"{out} --market {cfg.market_list[0]} --list-users")
    return 0


def round_curve(doc: dict[str, Any], key: str = "ndcg@10") -> list[tuple[int, float]]:
    """(round, average of ``key`` over the markets that report it) for every round
    (``valid_ndcg@10``: the validation curve)."""
    out = []
    for r in doc["rounds"]:
        vals = [float(m[key]) for m in r["markets"].values() if m.get(key) is not None]
        if vals:
            out.append((int(r["round"]), sum(vals) / len(vals)))
    return out


def report_run(doc: dict[str, Any], cfg: RunConfig, out: Path) -> None:
    """After a run: its best round, a popularity reference on the same split (cheap: counts
    only), and the learning curve as ``OUT/learning_curve.png``."""
    from storefed.shared.baselines import run_popularity  # noqa: PLC0415

    curve = round_curve(doc)
    if not curve:
        return
    valid = round_curve(doc, "valid_ndcg@10")
    if valid:  # chosen on validation; the test figure is only read off at that round
        best_round, best = max(valid, key=lambda rv: rv[1])
        print(f"best round on validation: {best_round} of {len(curve)} (avg valid ndcg@10 "
              f"{best:.4f}); test avg ndcg@10 {dict(curve).get(best_round, float('nan')):.4f} "
              f"there, {curve[-1][1]:.4f} after the last round")
    else:  # markets that keep their evaluation private send no validation figures either
        print(f"no validation figures reported; last round {curve[-1][0]}: test avg ndcg@10 "
              f"{curve[-1][1]:.4f}")
    splits, n_items = {}, 0
    for m in cfg.market_list:
        catalog, split = load_market(cfg.dataset, cfg.data_dir or None, m, seed=cfg.seed,
                                     n_neg=cfg.eval_negatives, max_history=cfg.max_history,
                                     options=ReaderOptions.from_run_config(cfg.to_mapping()))
        splits[m], n_items = split, catalog.n_items
    pop = run_popularity(splits, n_items, "test")
    pop_avg = sum(float(str(v["ndcg@10"])) for v in pop.values()) / len(pop)
    print(f"reference on the same split: popularity avg ndcg@10 {pop_avg:.4f}; a random "
          f"ranking scores 0.0454 (99 negatives); each method on the XMarket markets: "
          f"docs/benchmarks.md")
    plot_curve(curve, pop_avg, out / "learning_curve.png", valid)


def plot_curve(curve: list[tuple[int, float]], reference: float, path: Path,
               valid: list[tuple[int, float]] | None = None) -> None:
    """The average test (and validation) nDCG@10 per round against the popularity reference
    on test, as a PNG."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r for r, _ in curve], [v for _, v in curve], marker="o", label="storefed (test)")
    if valid:
        ax.plot([r for r, _ in valid], [v for _, v in valid], marker=".", linestyle=":",
                label="storefed (valid)")
    ax.axhline(reference, color="grey", linestyle="--", label="popularity")
    ax.set_xlabel("round")
    ax.set_ylabel("avg nDCG@10")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
