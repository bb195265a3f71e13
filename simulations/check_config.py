"""``storefed check-config``: run-config overrides checked before a run starts.

Flower's SuperLink answers a run config with an unknown key by a generic "Invalid run
configuration" and a wrong value only fails inside the ServerApp; this command names the key
and the reason at once. It imports no torch and no Flower, so it answers in well under a second.
"""

from __future__ import annotations

import argparse
from typing import Any

from storefed.shared.config import RunConfig, parse_overrides
from storefed.simulations.command import add_run_config_option


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("check-config", help="check run-config overrides (keys, types, ranges)",
                       description="Check run-config overrides as `storefed simulate "
                                   "--run-config` and `flwr run . --run-config` take them: "
                                   "unknown keys, wrong types and out-of-range values are "
                                   "named (exit 2); the resolved values are printed.")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE|FILE.toml",
                   help="overrides, as for --run-config")
    add_run_config_option(p)
    p.add_argument("--all", action="store_true", help="print every key, not only those set")
    return "check-config", run


def run(args: argparse.Namespace) -> int:
    values = parse_overrides(list(args.pairs) + list(args.config))
    cfg = RunConfig.from_mapping(values, source="run config")  # ConfigError names the key
    resolved = cfg.to_mapping()
    shown = resolved if args.all else {k: resolved[k] for k in values}
    for key, value in shown.items():
        print(f"{key} = {value!r}")
    print(f"run config OK ({len(values)} override(s))")
    return 0
