"""storefed ServerApp: federated rounds over the shared encoder. Thin: the run config picks the
aggregation (SecAgg+ by default, ``server/secagg.py``; plain FedAvg, ``server/strategy.py``) and
the one round loop (``server/rounds.py``) does the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.rounds import PlainAggregation, run_rounds
from server.secagg import SecAggAggregation
from shared.config import RunConfig


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is Flower's run config with ``overrides`` on top."""
    app = ServerApp()
    fixed = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_mapping({**dict(context.run_config), **fixed})
        run_rounds(grid, cfg, SecAggAggregation if cfg.secagg else PlainAggregation)

    return app


app = make_app()
