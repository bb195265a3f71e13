"""The ``storefed`` command line: one registry of commands, each loaded only when it runs.

Decision record
---------------
* **One registry** (``COMMANDS``): a command's name, the module that implements it and a
  one-line help. The product's commands live in ``simulations/``; the lab's (benchmarks,
  studies, load tests) in ``simulations/experiments/``. This module is the only one that names
  both, and only by module path: product code never imports the lab.
* **Lazy.** ``storefed --help`` lists the registry without importing any command (no torch,
  no Flower); ``storefed CMD ...`` imports only ``CMD``'s module, whose ``register(sub)`` adds
  its parser and returns ``(name, run)``. A two-word name (``deploy bench``) routes a
  sub-command of a product command to the lab.
* **Errors.** Bad input (``StorefedError``) is printed as one paragraph, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from storefed.simulations.command import Run, run_command


@dataclass(frozen=True)
class Command:
    module: str
    help: str
    lab: bool = False


COMMANDS: dict[str, Command] = {
    "simulate": Command("storefed.simulations.simulate", "federated simulation on Flower's "
                        "simulation engine (one virtual SuperNode per market)"),
    "check-config": Command("storefed.simulations.check_config", "check run-config overrides "
                            "(keys, types) before `storefed simulate` or `flwr run`"),
    "join": Command("storefed.simulations.join", "a new market joins from the global encoder"),
    "recommend": Command("storefed.simulations.recommend", "top-k items for a user from a market's "
                         "saved state"),
    "serve": Command("storefed.simulations.serve", "one market's recommendations over HTTP/JSON, "
                     "refreshed every round"),
    "deploy": Command("storefed.simulations.deploy_cli", "real Flower deployment: certificates, "
                      "SuperLink + gateway, SuperNodes, runs"),
    "benchmark": Command("storefed.simulations.experiments.benchmark", "all methods on the same "
                         "splits, negatives and seeds", lab=True),
    "benchmark-mtl": Command("storefed.simulations.experiments.mtl_bench", "single-task vs "
                             "shared-bottom vs mmoe per category", lab=True),
    "benchmark-secagg": Command("storefed.simulations.experiments.secagg_bench", "SecAgg+ (and DP) "
                                "cost against plain aggregation", lab=True),
    "loadtest": Command("storefed.simulations.experiments.loadtest", "simulations over many "
                        "synthetic storefronts", lab=True),
    "bench-serve": Command("storefed.simulations.experiments.bench_serve", "load benchmark of a "
                           "market's recommendation service", lab=True),
    "deploy bench": Command("storefed.simulations.experiments.deploy_bench", "seconds per round: "
                            "deployment vs simulation", lab=True),
}


def _route(argv: Sequence[str]) -> str | None:
    """The registry key ``argv`` names (two-word keys first), or None."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if len(words) == 2 and " ".join(words) in COMMANDS and list(argv[:2]) == words:
        return " ".join(words)
    return words[0] if words and words[0] in COMMANDS and argv[:1] == words[:1] else None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown in every ``--help``; docstring markup (````code````, ``**bold**``) shown as
    plain text."""

    def format_help(self) -> str:
        return super().format_help().replace("``", "`").replace("**", "")


class Parser(argparse.ArgumentParser):
    """Every storefed (sub-)parser: :class:`HelpFormatter` unless one is given."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def version() -> str:
    """The installed storefed's version (no heavy import)."""
    from importlib.metadata import PackageNotFoundError  # noqa: PLC0415
    from importlib.metadata import version as dist_version  # noqa: PLC0415

    try:
        return dist_version("storefed")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _top_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="storefed",
        description="Federated multi-task transfer-learning recommender for storefronts.",
        epilog="Lab commands (experiments): " + ", ".join(
            k for k, c in COMMANDS.items() if c.lab) + ". `storefed CMD --help` for each.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Flower's own logs (anywhere on the line)")
    parser.add_argument("--version", action="version", version=f"storefed {version()}")
    return parser


def _parser(key: str | None) -> tuple[argparse.ArgumentParser, Run | None]:
    """The top-level parser; with ``key``, that command's module is imported and registered."""
    parser = _top_parser()
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    if key is None:
        for name, cmd in COMMANDS.items():
            if " " not in name:
                sub.add_parser(name, help=cmd.help + (" (lab)" if cmd.lab else ""))
        return parser, None
    module = importlib.import_module(COMMANDS[key].module)
    if " " in key:  # e.g. deploy bench: a sub-command of ``deploy`` that lives in the lab
        outer = sub.add_parser(key.split()[0])
        sub = outer.add_subparsers(dest="sub_command", required=True)
    _, run = module.register(sub)
    return parser, run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``storefed`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = any(a in ("-v", "--verbose") for a in argv)  # a global flag, anywhere
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    key = _route(argv)
    parser, run = _parser(key)
    args = parser.parse_args(argv)
    args.verbose = verbose
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("storefed").setLevel(logging.INFO)
    assert run is not None  # parse_args exits unless a registered command was named
    return run_command(f"storefed {key}", run, args)


if __name__ == "__main__":
    sys.exit(main())
