"""Running one command: bad input (``StorefedError``) becomes one ``prog: error: ...``
paragraph and exit code 2, Ctrl-C exit code 130. Used by the ``storefed`` registry
(``simulations/cli.py``) and by the lab's ``python -m`` scripts."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from storefed.shared.errors import StorefedError

Run = Callable[[argparse.Namespace], int]


def add_run_config_option(p: argparse.ArgumentParser, what: str = "") -> None:
    """``--run-config`` (as in ``flwr run``; ``--config`` is its alias): ``KEY=VALUE`` pairs, or
    a TOML file of ``key = value`` lines, any ``[tool.flwr.app.config]`` key. Repeatable; later
    values win. Stored in ``args.config``."""
    p.add_argument("--run-config", "--config", dest="config", action="append", default=[],
                   metavar="KEY=VALUE|FILE.toml",
                   help="run-config overrides, e.g. --run-config 'lr=0.001 num-rounds=3' or "
                        "--run-config overrides.toml (repeatable; `storefed check-config` "
                        "checks them)" + what)


def run_command(prog: str, command: Run, args: argparse.Namespace) -> int:
    """``command(args)``, with bad input (``StorefedError``) printed as one ``prog: error: ...``
    paragraph and exit code 2 (130 on Ctrl-C). Also the ``main`` of the python -m scripts."""
    try:
        return command(args)
    except StorefedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `storefed recommend --list-users | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the exit-time flush
        return 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
