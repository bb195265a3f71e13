"""Clients on CUDA vs CPU: the same federated work (``run_inprocess``: every market's
``MarketNode`` training, encoder-only sums, evaluation each round) and the pooled ``central``
run, once per device, timed in one process.

It needs only torch and numpy (no Flower, no Ray), so it runs on an accelerator machine that has
neither::

    python -m storefed.simulations.experiments.device_bench --dataset xmarket \\
        --data-dir ../shared/data/xmarket_forec_electronics --devices cpu,cuda --out DIR

Prints a table and writes ``DIR/device_bench.json``:
``{"devices": {d: {"federated": {...}, "central": {...}}}, "speedup": {...}, "torch": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from storefed.shared.config import RunConfig, parse_overrides
from storefed.shared.data import available_markets
from storefed.simulations.command import add_run_config_option
from storefed.simulations.experiments.local import run_central, run_inprocess


def _arm(fn: Any, cfg: RunConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        doc = fn(cfg)
    except Exception as exc:  # noqa: BLE001 - report the arm as failed, keep the other
        return {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "seconds_per_round": doc["seconds_per_round"],
            "train_seconds": doc["train_seconds"], "train_examples": doc["train_examples"],
            "train_examples_per_s": doc["train_examples"] / max(doc["train_seconds"], 1e-9),
            "average": doc["average"]}


def run(cfg: RunConfig, devices: list[str]) -> dict[str, Any]:
    """Both arms per device (see module doc)."""
    out: dict[str, Any] = {"devices": {}, "config": cfg.to_mapping(),
                           "torch": torch.__version__, "cores": os.cpu_count(),
                           "cuda": (torch.cuda.get_device_name(0)
                                    if torch.cuda.is_available() else None)}
    for d in devices:
        c = cfg.replace(device=d)
        if d == "cuda":  # context and kernels up before the clock starts
            torch.zeros(1, device="cuda").sum().item()
        out["devices"][d] = {"federated": _arm(run_inprocess, c), "central": _arm(run_central, c)}
        print(json.dumps({d: {k: {kk: vv for kk, vv in v.items() if kk != "trace"}
                              for k, v in out["devices"][d].items()}}), flush=True)
    if "cpu" in out["devices"] and "cuda" in out["devices"]:
        speed: dict[str, float] = {}
        for arm in ("federated", "central"):
            a, b = out["devices"]["cpu"][arm], out["devices"]["cuda"][arm]
            if "error" not in a and "error" not in b:
                speed[f"{arm}_wall"] = a["wall_seconds"] / b["wall_seconds"]
                speed[f"{arm}_train_throughput"] = (b["train_examples_per_s"]
                                                    / a["train_examples_per_s"])
        out["speedup"] = speed
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-dir", default="")
    p.add_argument("--markets", default="")
    p.add_argument("--rounds", type=int, default=0, help="0: the config's num-rounds")
    p.add_argument("--devices", default="cpu,cuda")
    add_run_config_option(p)
    p.add_argument("--out", default="runs/device-bench")
    a = p.parse_args(argv)
    values: dict[str, Any] = {"dataset": a.dataset, "data-dir": a.data_dir,
                              **parse_overrides(a.config)}
    cfg = RunConfig.from_mapping(values, source="--config")
    if a.rounds:
        cfg = cfg.replace(num_rounds=a.rounds)
    markets = a.markets or ",".join(available_markets(cfg.dataset, cfg.data_dir))
    cfg = cfg.replace(markets=markets)
    doc = run(cfg, [d.strip() for d in a.devices.split(",") if d.strip()])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device_bench.json").write_text(json.dumps(doc, indent=2))
    print(f"{'device':<7}{'arm':<11}{'s/round':>9}{'train ex/s':>12}{'ndcg@10':>9}")
    for d, arms in doc["devices"].items():
        for arm, r in arms.items():
            if "error" in r:
                print(f"{d:<7}{arm:<11} failed: {r['error']}")
                continue
            print(f"{d:<7}{arm:<11}{r['seconds_per_round']:>9.2f}"
                  f"{r['train_examples_per_s']:>12.0f}{r['average']['ndcg@10']:>9.4f}")
    for k, v in doc.get("speedup", {}).items():
        print(f"speed-up cuda/cpu {k}: {v:.2f}x")
    print(f"wrote {out / 'device_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
