"""The ``storefed`` command line. Each sub-command lives in its own module under simulations/.

Errors from bad input (``StorefedError``) are printed as one paragraph, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from shared.errors import StorefedError

Command = Callable[[argparse.Namespace], int]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="storefed",
        description="Federated multi-task transfer-learning recommender for storefronts.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's own logs")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, Command] = {}
    for module in _command_modules():
        name, run = module.register(sub)
        commands[name] = run
    return parser, commands


def _command_modules() -> list[ModuleType]:
    import importlib  # noqa: PLC0415

    mods = []
    for name in ("simulate", "benchmark", "mtl_bench", "secagg_bench", "join", "recommend",
                 "deploy", "loadtest", "serve", "bench_serve"):
        try:
            mods.append(importlib.import_module(f"simulations.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"simulations.{name}":
                raise
    return mods


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``storefed`` console script."""
    parser, commands = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("storefed").setLevel(logging.INFO)
    return run_command(f"storefed {args.command}", commands[args.command], args)


def run_command(prog: str, command: Command, args: argparse.Namespace) -> int:
    """``command(args)``, with bad input (``StorefedError``) printed as one ``prog: error: ...``
    paragraph and exit code 2 (130 on Ctrl-C). Also the ``main`` of the python -m scripts."""
    try:
        return command(args)
    except StorefedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
