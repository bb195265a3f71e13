"""``storefed serve``: one market's recommendation service (``client/serve.py``).

Registered here so that ``storefed --help`` stays light: torch, FastAPI and uvicorn are imported
only when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from storefed.shared.data import DATASETS


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser(
        "serve", help="serve a market's recommendations over HTTP/JSON (refreshed every round)",
        description="HTTP/JSON recommendation service of one market, run beside its SuperNode. "
                    "It serves the model the node wrote to STATE_DIR/MARKET/serving.pt after "
                    "its last round and picks up every new round without a restart. API: "
                    "docs/serving.md.")
    p.add_argument("--state-dir", required=True,
                   help="the node's state directory (the SuperNode's --state-dir)")
    p.add_argument("--market", required=True, help="the market served (fixed)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="the market's data (default: from the node's run config)")
    p.add_argument("--data-dir", default=None,
                   help="the market's data directory (default: from the node's run config)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1; any other needs --token-file and TLS)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--tls-cert", default="", help="PEM certificate: serve HTTPS")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument("--token-file", default="",
                   help="file whose first line is the bearer token /v1/* and /metrics require")
    p.add_argument("--plain-http", action="store_true",
                   help="allow a non-loopback --host without TLS (TLS ends at a proxy in front)")
    p.add_argument("--poll", type=float, default=1.0,
                   help="seconds between looks for a new round's serving file (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return "serve", run


def run(args: argparse.Namespace) -> int:
    from storefed.client.serve import serve  # noqa: PLC0415 - torch only when the command runs

    return serve(args.state_dir, args.market, args.dataset, args.data_dir, host=args.host,
                 port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                 token_file=args.token_file, plain_http=args.plain_http,
                 poll_seconds=args.poll, threads=args.threads)
