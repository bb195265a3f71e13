"""storefed ServerApp: federated rounds over the shared encoder. Thin: the run config picks the
aggregation (SecAgg+ by default, ``server/secagg.py``; plain FedAvg, ``server/strategy.py``) and
the one round loop (``server/rounds.py``) does the rest."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from storefed.server.rounds import PlainAggregation, run_rounds
from storefed.server.secagg import SecAggAggregation
from storefed.shared.config import RunConfig
from storefed.shared.errors import StorefedError


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's run config with ``overrides`` on top."""
    app = ServerApp()
    fixed = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        standalone = show_round_log()
        try:
            cfg = RunConfig.from_mapping({**dict(context.run_config), **fixed})
        except StorefedError as exc:  # one line in the run's log, not a traceback
            print(f"storefed: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        doc = run_rounds(grid, cfg, SecAggAggregation if cfg.secagg else PlainAggregation)
        if not standalone:  # `storefed simulate` prints its own table
            return
        final = doc.get("final", {})
        rows = [(m, v["ndcg@10"], v["hr@10"]) for m, v in final.get("markets", {}).items()]
        if "average" in final:
            rows.append(("average", final["average"]["ndcg@10"], final["average"]["hr@10"]))
        print("\n".join([f"{'market':<12}{'ndcg@10':>10}{'hr@10':>10}"]
                        + [f"{m:<12}{n:>10.4f}{h:>10.4f}" for m, n, h in rows]), flush=True)

    return app


def show_round_log() -> bool:
    """Per-round metrics (``server/rounds.py`` logs them at INFO) in the run's log under
    ``flwr run``, where nothing else configures logging; `storefed` commands configure it.
    True when it did (a standalone ServerApp)."""
    logger = logging.getLogger("storefed")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("storefed: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return True
    return False


app = make_app()
