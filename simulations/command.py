"""Running one command: bad input (``StorefedError``) becomes one ``prog: error: ...``
paragraph and exit code 2, Ctrl-C exit code 130. Used by the ``storefed`` registry
(``simulations/cli.py``) and by the lab's ``python -m`` scripts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from shared.errors import StorefedError

Run = Callable[[argparse.Namespace], int]


def run_command(prog: str, command: Run, args: argparse.Namespace) -> int:
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
