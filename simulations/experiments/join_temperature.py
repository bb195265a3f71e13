"""Does the calibrated heads' temperature, or the join's kNN grid, slow the climb to scratch's
best? (lab probe)

    python -m storefed.simulations.experiments.join_temperature --dataset xmrec \
        --data-dir XMREC --sources s1,s2 --join s3 --encoder-steps 600 --scratch-steps 1500 \
        --seeds 0,1,2,3,4 --out runs/join-temperature-s3

``calibrate_heads`` picks the dot-product and popularity scales on the valid split; among scales
that rank alike, ties keep the grid's first (the unscaled heads, else the smallest): often a flat
full softmax, whose first fine-tuning steps go into growing the scale. Per seed and joining
market, on the **validation** split (the split that decides; the test split is not read): the
scratch baseline once (as ``storefed join`` trains it), then the transfer curve with each
``--temperatures`` value (``--head-temperature``), and the steps each needs to reach scratch's
best. ``--knn-grid federation`` runs it all with the federation's kNN weights (up to 16) instead
of the join's. Without ``--encoders`` each seed federates its sources first (OUT/fed-seedN).
Writes OUT/temperature.json and prints one line per run and temperature.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import LOSSES
from storefed.shared.data import DATASETS, load_market
from storefed.shared.itemsim import KNN_WEIGHT_GRID
from storefed.shared.transfer import HEAD_TEMPERATURES, JOIN_KNN_GRID, JoinSettings, join_market
from storefed.shared.transfer_study import steps_target_met, steps_to_target
from storefed.simulations.command import run_command
from storefed.simulations.experiments.join_experiment import federate


def one_market(args: argparse.Namespace, market: str, seed: int, encoder: Path) -> dict[str, Any]:
    """Scratch once, then the transfer curve per head temperature, all on valid."""
    catalog, split = load_market(args.dataset, args.data_dir, market, seed=seed)
    grid = JOIN_KNN_GRID if args.knn_grid == "join" else KNN_WEIGHT_GRID
    base = JoinSettings(seed=seed, eval_split="valid", encoder_steps=args.encoder_steps,
                        scratch_steps=args.scratch_steps, loss=args.loss, ranker=False,
                        knn_grid=grid)
    row: dict[str, Any] = {"encoder": str(encoder)}
    target = None
    scratch_reach = None
    for temp in args.temperatures.split(","):
        settings = dataclasses.replace(base, head_temperature=temp)
        outcome = join_market(encoder, catalog, split, settings, torch.device("cpu"),
                              with_scratch=target is None)
        if target is None:
            target = outcome.doc["best"]["scratch"]
            scratch_reach = outcome.doc["steps_to_target"]["scratch"]
            row["scratch"] = {"best": target, "steps": scratch_reach,
                              "loss": outcome.details["scratch_loss"]}
        curve = outcome.doc["transfer"]
        reach = {"transfer": steps_to_target(curve, target), "scratch": scratch_reach}
        res: dict[str, Any] = {
            "zero_shot": outcome.doc["zero_shot"]["ndcg@10"],
            "best": outcome.doc["best"]["transfer"], "steps": reach["transfer"],
            "met": steps_target_met(reach), "head_scales": outcome.details["head_scales"],
            "curve": curve}
        row[temp] = res
        print(f"{market} seed {seed} {temp:>10}: zero-shot {res['zero_shot']:.4f} best "
              f"{res['best']:.4f} steps {reach['transfer']} vs scratch {scratch_reach} "
              f"(best {target:.4f}) scales {outcome.details['head_scales']}", flush=True)
    return row


def seed_encoders(args: argparse.Namespace, out: Path) -> Iterator[tuple[int, Path]]:
    """(seed, encoder) per ``--seeds``: the ``--encoders`` given, else each seed's sources
    federated into OUT/fed-seedN when its turn comes."""
    seeds = [int(s) for s in args.seeds.split(",") if s]
    encoders = [e for e in args.encoders.split(",") if e]
    if encoders and len(encoders) != len(seeds):
        raise SystemExit("--encoders needs one checkpoint per seed")
    for i, seed in enumerate(seeds):
        yield seed, (Path(encoders[i]) if encoders else
                     federate(argparse.Namespace(**{**vars(args), "seed": seed}),
                              out / f"fed-seed{seed}"))


def add_probe_args(p: argparse.ArgumentParser, join: str, out: str) -> None:
    """The flags the join probes share: data, federation (or encoders) and the join's budget."""
    d = JoinSettings()
    p.add_argument("--dataset", choices=DATASETS, default="xmarket")
    p.add_argument("--data-dir", default=os.environ.get("STOREFED_DATA_DIR", ""))
    p.add_argument("--sources", default="ca,de,fr,mx,uk")
    p.add_argument("--join", default=join)
    p.add_argument("--seeds", default="0")
    p.add_argument("--encoders", default="", help="comma list, one per seed (else federate)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--encoder-steps", type=int, default=d.encoder_steps)
    p.add_argument("--scratch-steps", type=int, default=d.scratch_steps)
    p.add_argument("--loss", choices=LOSSES, default=d.loss)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=out)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, dict[str, Any]] = {}
    for seed, encoder in seed_encoders(args, out):
        for market in [m for m in args.join.split(",") if m]:
            row = one_market(args, market, seed, encoder)
            doc[f"{market}/seed{seed}"] = row
            atomic_write_bytes(out / "temperature.json", json.dumps(doc, indent=1).encode())
    for temp in args.temperatures.split(","):
        met = sum(bool(r[temp]["met"]) for r in doc.values())
        print(f"{temp}: steps target met on valid in {met} of {len(doc)} runs")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storefed.simulations.experiments.join_temperature",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_probe_args(p, join="in,jp", out="runs/join-temperature")
    p.add_argument("--temperatures", default=",".join(HEAD_TEMPERATURES),
                   help="comma list of --head-temperature values to compare")
    p.add_argument("--knn-grid", choices=("join", "federation"), default="join",
                   help="the kNN weights the join picks from: its own grid (the default) or "
                        "the federation's (up to 16)")
    return run_command("join_temperature", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
