"""Join experiment: federate some source markets, then let held-back markets join.

    python -m storefed.simulations.experiments.join_experiment --dataset xmarket \
        --data-dir DATA \
        --sources ca,de,fr,mx,uk --join in,jp --out runs/join-xmarket

1. ``run_federated`` over the source markets only (Flower simulation) -> ``OUT/fed/encoder.pt``
   (skipped with ``--encoder PATH``). The markets that join later never take part.
2. For each joining market: zero-shot, transfer and scratch curves (``shared.transfer``), written
   like ``storefed join`` to ``OUT/<market>/`` (join.json + heads).
3. Variants measured against plain fine-tuning on the same markets: ``--variants adversarial``
   (gradient-reversal domain adaptation during fine-tuning) and ``--reptile-server-lr X`` (a
   second federation of the same sources with the Reptile outer step, then the same join).
4. ``OUT/join_curves.png`` (ndcg@10 vs local steps, transfer vs scratch, per market) and
   ``OUT/summary.json`` (zero-shot / scratch-best ratio, steps ratio, targets met, per variant).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import LOSSES, RunConfig
from storefed.shared.data import DATASETS, available_markets, load_market
from storefed.shared.errors import ConfigError
from storefed.shared.train import resolve_device
from storefed.shared.transfer import (
    JoinOutcome,
    JoinSettings,
    join_market,
    save_joined,
)
from storefed.shared.transfer_study import steps_target_met, steps_to_target
from storefed.simulations.command import run_command
from storefed.simulations.join import add_recipe_args, push_dims

log = logging.getLogger("storefed")


def federate(args: argparse.Namespace, out: Path, server_lr: float = 1.0) -> Path:
    """Run the source federation; returns its encoder checkpoint."""
    from storefed.simulations.simulate import lab_policy, run_federated  # noqa: PLC0415 - Flower, Ray

    cfg = RunConfig(dataset=args.dataset, data_dir=args.data_dir, markets=args.sources,
                    num_rounds=args.rounds, local_epochs=args.local_epochs, seed=args.seed,
                    device=args.device, out_dir=str(out), server_lr=server_lr)
    # the lab holds every source market: with two sources their policy must allow sums of two
    doc = run_federated(cfg, policy=lab_policy(cfg.secagg, len(cfg.market_list)))
    log.info("federated %s for %d rounds (server-lr %.2f): avg ndcg@10 %.4f (%.0fs)",
             args.sources, args.rounds, server_lr, doc["final"]["average"]["ndcg@10"],
             doc["wall_seconds"])
    return out / "encoder.pt"


def summarize(outcome: JoinOutcome) -> dict[str, Any]:
    doc = outcome.doc
    best_s = doc["best"]["scratch"]
    reach = doc["steps_to_target"]
    ratio = (reach["transfer"] / reach["scratch"]
             if reach["transfer"] is not None and reach["scratch"] else None)
    zs = doc["zero_shot"]["ndcg@10"] / best_s if best_s else None
    return {"zero_shot": doc["zero_shot"], "best": doc["best"], "steps_to_target": reach,
            "steps_ratio": ratio, "zero_shot_over_scratch_best": zs,
            "targets": {"steps_ratio<=1/3": steps_target_met(reach),
                        "zero_shot>=0.8x": zs is not None and zs >= 0.8},
            "transfer_minus_scratch_ndcg@10": outcome.details["transfer_minus_scratch_ndcg@10"],
            "ranked": doc.get("ranked"),
            "ranked_minus_transfer_ndcg@10": outcome.details.get("ranked_minus_transfer_ndcg@10"),
            "head_scales": outcome.details["head_scales"],
            "mapping": outcome.details["mapping"], "seconds": outcome.details["seconds"]}


def plot(results: dict[str, dict[str, JoinOutcome]], path: Path, title: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    markets = list(results)
    fig, axes = plt.subplots(1, len(markets), figsize=(5.5 * len(markets), 4), squeeze=False)
    for ax, m in zip(axes[0], markets, strict=True):
        scratch_drawn = False
        for variant, outcome in results[m].items():
            doc = outcome.doc
            t = doc["transfer"]
            loss = outcome.details.get("settings", {}).get("loss")
            ax.plot([s for s, _ in t], [v for _, v in t], label=f"transfer ({variant}, {loss})")
            if not scratch_drawn and doc["scratch"]:
                s_curve = doc["scratch"]
                ax.plot([s for s, _ in s_curve], [v for _, v in s_curve], color="black",
                        label=f"scratch ({outcome.details.get('scratch_loss')})")
                ax.axhline(doc["best"]["scratch"], color="gray", ls=":",
                           label="scratch best (target)")
                scratch_drawn = True
        ax.set_title(f"{m}")
        ax.set_xlabel("local optimiser steps")
        ax.set_ylabel("nDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run(args: argparse.Namespace) -> int:
    sources = [m.strip() for m in args.sources.split(",") if m.strip()]
    joins = [m.strip() for m in args.join.split(",") if m.strip()]
    overlap = sorted(set(sources) & set(joins))
    if overlap:
        raise ConfigError(f"markets {', '.join(overlap)} are both sources and joining: a "
                          "joining market must not be in the federation that made the encoder")
    known = available_markets(args.dataset, args.data_dir or None)
    unknown = [m for m in sources + joins if m not in known]
    if unknown:
        raise ConfigError(f"unknown market(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    encoders = {"plain": Path(args.encoder) if args.encoder else federate(args, out / "fed")}
    if args.reptile_encoder:
        encoders["reptile"] = Path(args.reptile_encoder)
    elif args.reptile_server_lr:
        encoders["reptile"] = federate(args, out / "fed-reptile", args.reptile_server_lr)
    base = JoinSettings(seed=args.seed, eval_split=args.eval_split,
                        head_steps=args.head_steps, encoder_steps=args.encoder_steps,
                        encoder_lr_scale=args.encoder_lr_scale, scratch_steps=args.scratch_steps,
                        item_knn=args.item_knn == "on", loss=args.loss,
                        scratch_loss=args.scratch_loss,
                        eval_every=args.eval_every, batch_size=args.batch_size,
                        select=args.select, head_init=args.head_init,
                        head_temperature=args.head_temperature,
                        ranker=args.ranker == "on", push_dims=push_dims(args.push_dims))
    runs: list[tuple[str, Path, JoinSettings]] = [("plain", encoders["plain"], base)]
    if "adversarial" in args.variants.split(","):
        runs.append(("adversarial", encoders["plain"],
                     JoinSettings(**{**base.__dict__, "variant": "adversarial"})))
    if "reptile" in encoders:
        runs.append(("reptile", encoders["reptile"], base))
    device = resolve_device(args.device)
    results: dict[str, dict[str, JoinOutcome]] = {}
    summary: dict[str, Any] = {"dataset": args.dataset, "sources": sources,
                               "encoders": {k: str(v) for k, v in encoders.items()},
                               "eval_split": args.eval_split, "markets": {}}
    for m in joins:
        catalog, split = load_market(args.dataset, args.data_dir or None, m, seed=args.seed)
        results[m] = {}
        summary["markets"][m] = {}
        for name, enc, settings in runs:
            outcome = join_market(enc, catalog, split, settings, device,
                                  with_scratch=(name == "plain"))
            if name != "plain":  # same data, same scratch curve: reuse the plain run's
                plain = results[m]["plain"].doc
                best_s = plain["best"]["scratch"]
                outcome.doc["scratch"] = plain["scratch"]
                outcome.doc["best"]["scratch"] = best_s
                outcome.doc["steps_to_target"] = {
                    "transfer": steps_to_target(outcome.doc["transfer"], best_s),
                    "scratch": plain["steps_to_target"]["scratch"]}
            results[m][name] = outcome
            d = out / (m if name == "plain" else f"{m}-{name}")
            save_joined(d, outcome, catalog, {"dataset": args.dataset, "data-dir": args.data_dir,
                                              "markets": m, "seed": args.seed})
            atomic_write_bytes(d / "join.json", json.dumps(outcome.doc, indent=2).encode())
            atomic_write_bytes(d / "join_details.json",
                               json.dumps(outcome.details, indent=2).encode())
            s = summarize(outcome)
            summary["markets"][m][name] = s
            log.info("%s [%s]: zero-shot %.4f (%.2fx scratch best %.4f), steps to target %s vs "
                     "scratch %s", m, name, s["zero_shot"]["ndcg@10"],
                     s["zero_shot_over_scratch_best"] or 0, s["best"]["scratch"] or 0,
                     s["steps_to_target"]["transfer"], s["steps_to_target"]["scratch"])
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    plot(results, out / "join_curves.png",
         f"{args.dataset}: join after federating {','.join(sources)} ({args.eval_split})")
    print(json.dumps({m: {v: {k: s[k] for k in ("zero_shot_over_scratch_best", "steps_ratio",
                                                 "targets")}
                          for v, s in vs.items()} for m, vs in summary["markets"].items()},
                     indent=1))
    print(f"wrote {out / 'summary.json'} and {out / 'join_curves.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storefed.simulations.experiments.join_experiment",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dataset", choices=DATASETS, default="xmarket")
    p.add_argument("--data-dir", default=os.environ.get("STOREFED_DATA_DIR", ""),
                   help="the dataset's directory (default: $STOREFED_DATA_DIR; required)")
    p.add_argument("--sources", default="ca,de,fr,mx,uk")
    p.add_argument("--join", default="in,jp")
    p.add_argument("--out", default="runs/join-experiment")
    p.add_argument("--encoder", default="", help="reuse this encoder instead of federating")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--variants", default="", help="comma list: adversarial")
    p.add_argument("--reptile-server-lr", type=float, default=0.0,
                   help="also federate with this Reptile server lr and join from it")
    p.add_argument("--reptile-encoder", default="",
                   help="reuse this Reptile-federated encoder instead of federating again")
    d = JoinSettings()
    p.add_argument("--head-steps", type=int, default=d.head_steps)
    p.add_argument("--encoder-steps", type=int, default=d.encoder_steps)
    p.add_argument("--encoder-lr-scale", type=float, default=d.encoder_lr_scale)
    p.add_argument("--scratch-steps", type=int, default=d.scratch_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="fine-tuning mini-batch (both curves)")
    p.add_argument("--eval-split", choices=("test", "valid"), default="test")
    add_recipe_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--item-knn", choices=("on", "off"), default="on" if d.item_knn else "off",
                   help="the joining market's private item-kNN term (as the federation's nodes)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="the transfer model's fine-tuning loss (default: the federation's)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("storefed").setLevel(logging.INFO)
    return run_command("join_experiment", run, args)


if __name__ == "__main__":
    sys.exit(main())
