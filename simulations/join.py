"""``storefed join``: a new market starts from the global encoder.

Loads a federation's ``encoder.pt`` (written by ``storefed simulate``), maps its catalog onto
the market's, evaluates zero-shot, fine-tunes (by default the whole model at once; with
``--head-steps`` first the heads alone with the encoder frozen, then the encoder at
``--encoder-lr-scale``), trains the same model from scratch on the same data for comparison, and
writes ``OUT/join.json`` (the learning curves), ``OUT/join_details.json`` (mapping, settings,
timings) plus the market's state (``OUT/encoder.pt``, ``OUT/state/<market>/private.pt``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from storefed.shared.checkpoint import atomic_write_bytes, load_encoder
from storefed.shared.config import LOSSES
from storefed.shared.data import DATASETS, ReaderOptions, available_markets, load_market
from storefed.shared.encoder_map import FRESH_INITS, PUSH_DIMS_GRID
from storefed.shared.errors import DataError
from storefed.shared.identity import load_or_create, public_hex
from storefed.shared.policy import NODE_CONFIG_KEY, load_policy, write_policy
from storefed.shared.train import HISTORY_MODES, resolve_device
from storefed.shared.transfer import (
    HEAD_INITS,
    HEAD_TEMPERATURES,
    SCRATCH_AUTO_LOSSES,
    SCRATCH_LOSSES,
    SELECTIONS,
    VARIANTS,
    JoinSettings,
    join_market,
    save_joined,
)

log = logging.getLogger("storefed")


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The join recipe's flags that ``storefed join`` and the lab's ``join_experiment`` share."""
    d = JoinSettings()
    p.add_argument("--scratch-loss", choices=SCRATCH_LOSSES, default=d.scratch_loss,
                   help="the scratch baseline's loss; auto: train it with each of "
                        f"{', '.join(SCRATCH_AUTO_LOSSES)} and keep the better on valid")
    p.add_argument("--select", choices=SELECTIONS, default=d.select,
                   help="valid: each curve point is the checkpoint with the best validation "
                        "nDCG@10 so far, and that checkpoint is saved; none: the latest weights")
    p.add_argument("--head-init", choices=HEAD_INITS, default=d.head_init,
                   help="calibrated: fresh heads' dot-product and popularity scales (and the "
                        "kNN weight) picked on the market's valid split before any step; "
                        "popularity: identity projections, log-popularity bias")
    p.add_argument("--head-temperature", choices=HEAD_TEMPERATURES,
                   default=d.head_temperature,
                   help="the calibrated heads' overall scale among those ranking alike: as "
                        "the calibration grid picked it, or the one whose full softmax fits the "
                        "market's valid positives best (temperature scaling; measured, not the "
                        "default: docs/join.md)")
    p.add_argument("--push-dims", choices=("auto", *map(str, PUSH_DIMS_GRID)),
                   default="auto" if d.push_dims is None else str(d.push_dims),
                   help="directions of the catalog-negative push taken out of the federated "
                        "item rows before the zero-shot model (docs/join.md); auto: each of "
                        f"{', '.join(map(str, PUSH_DIMS_GRID))} tried, the best on the "
                        "market's valid split kept")
    p.add_argument("--ranker", choices=("on", "off"), default="on" if d.ranker else "off",
                   help="after fine-tuning, fit the market's private ranker (LambdaMART over "
                        "the model's score and the market's own item-kNN, EASE and popularity) "
                        "on its valid split; it ranks the market's candidates from then on "
                        "(OUT/state/<market>/ranker.json)")


def push_dims(flag: str) -> int | None:
    """``--push-dims``: None for auto (picked on valid), else the number of directions."""
    return None if flag == "auto" else int(flag)


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("join", help="a new market joins from the global encoder",
                       description="Transfer-initialise a new market from a global encoder "
                                   "checkpoint; zero-shot, fine-tune and scratch curves -> "
                                   "OUT/join.json; heads saved under OUT/state/<market>/.")
    p.add_argument("--encoder", required=True, help="global encoder checkpoint (encoder.pt)")
    p.add_argument("--dataset", choices=DATASETS, default="synthetic")
    p.add_argument("--data-dir", default="", help="directory holding the dataset's files")
    p.add_argument("--market", required=True, help="the joining market")
    p.add_argument("--out", required=True, help="output directory")
    d = JoinSettings()
    p.add_argument("--variant", choices=VARIANTS, default=d.variant,
                   help="plain fine-tuning, or adversarial domain adaptation (gradient reversal)")
    p.add_argument("--head-steps", type=int, default=d.head_steps,
                   help="local steps training only the heads (encoder frozen)")
    p.add_argument("--encoder-steps", type=int, default=d.encoder_steps,
                   help="local steps then training the encoder too (0: keep it frozen)")
    p.add_argument("--encoder-lr-scale", type=float, default=d.encoder_lr_scale,
                   help="encoder lr = lr * this in the second phase")
    p.add_argument("--scratch-steps", type=int, default=d.scratch_steps,
                   help="steps of the scratch baseline (0: same as transfer)")
    p.add_argument("--no-scratch", action="store_true", help="skip the scratch baseline")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--batch-size", type=int, default=None,
                   help="fine-tuning mini-batch (default: the federation's batch-size, from the "
                        "checkpoint)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--adv-weight", type=float, default=d.adv_weight)
    p.add_argument("--fresh-init", choices=FRESH_INITS, default=d.fresh_init,
                   help="rows for items the encoder never trained")
    p.add_argument("--eval-split", choices=("test", "valid"), default=d.eval_split)
    add_recipe_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--history", choices=HISTORY_MODES, default=None,
                   help="a positive's input history while fine-tuning (default: the "
                        "federation's train-history, from the checkpoint)")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="the transfer model's fine-tuning loss (default: the loss the encoder "
                        "was federated with, from the checkpoint)")
    p.add_argument("--item-knn", choices=("on", "off"), default=None,
                   help="add the market's private item-kNN term (weight picked on its valid "
                        "split), as the federation's nodes do (default: the federation's "
                        "item-knn, from the checkpoint)")
    p.add_argument("--max-history", type=int, default=None,
                   help="history window (default: the federation's, from the checkpoint)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--policy", default="", metavar="FILE",
                   help="the market's privacy policy (TOML, docs/privacy.md), kept in its "
                        "state directory (default: the private defaults)")
    return "join", run


def run(args: argparse.Namespace) -> int:
    if args.dataset != "synthetic" and not args.data_dir:
        raise DataError(f"--data-dir is required for dataset {args.dataset!r}")
    if args.dataset != "synthetic" and not Path(args.data_dir).is_dir():
        raise DataError(f"data directory {args.data_dir} does not exist")
    known = available_markets(args.dataset, args.data_dir or None)
    if args.market not in known:
        raise DataError(f"unknown market {args.market!r} in {args.dataset} "
                        f"{args.data_dir or '(synthetic)'}; known: {', '.join(known)}")
    policy = load_policy({NODE_CONFIG_KEY: args.policy}, None) if args.policy else None
    ck = load_encoder(args.encoder)  # fail fast on a corrupted checkpoint, before the data
    meta_cfg = ck.meta.get("config")
    fed_cfg: dict[str, Any] = meta_cfg if isinstance(meta_cfg, dict) else {}
    history = args.history or str(fed_cfg.get("train-history", JoinSettings.history))
    batch_size = int(args.batch_size or fed_cfg.get("batch-size", JoinSettings.batch_size))
    loss = args.loss or str(fed_cfg.get("loss", JoinSettings.loss))
    settings = JoinSettings(
        variant=args.variant, head_steps=args.head_steps, encoder_steps=args.encoder_steps,
        encoder_lr_scale=args.encoder_lr_scale, scratch_steps=args.scratch_steps,
        eval_every=args.eval_every, batch_size=batch_size, lr=args.lr,
        adv_weight=args.adv_weight, fresh_init=args.fresh_init, eval_split=args.eval_split,
        seed=args.seed, history=history, loss=loss, scratch_loss=args.scratch_loss,
        select=args.select, head_init=args.head_init, ranker=args.ranker == "on",
        head_temperature=args.head_temperature, item_knn=_item_knn(args.item_knn, fed_cfg),
        push_dims=push_dims(args.push_dims))
    max_history = int(args.max_history or fed_cfg.get("max-history", 50))
    # the catalog as the federation read it (e.g. XMRec with or without train.tsv)
    options = ReaderOptions.from_run_config(fed_cfg)
    catalog, split = load_market(args.dataset, args.data_dir or None, args.market,
                                 seed=args.seed, max_history=max_history, options=options)
    device = resolve_device(args.device)
    log.info("market %s: zero-shot evaluation, then %d fine-tuning steps%s", args.market,
             settings.head_steps + settings.encoder_steps,
             "" if args.no_scratch else " and the scratch baseline (--no-scratch skips it)")
    outcome = join_market(args.encoder, catalog, split, settings, device,
                          with_scratch=not args.no_scratch, progress=True)
    out = Path(args.out)
    config = {"dataset": args.dataset, "data-dir": args.data_dir, "markets": args.market,
              "seed": args.seed, "max-history": max_history, "item-knn": settings.item_knn,
              "embedding-dim": outcome.model.cfg.dim,
              "xmrec-extra-train": options.xmrec_extra_train}
    paths = save_joined(out, outcome, catalog, config)
    outcome.details["saved"] = paths
    # the market's side of enrollment: its policy and its identity key live with its heads
    market_dir = out / "state" / args.market
    if policy is not None:
        write_policy(market_dir, policy)
    identity = public_hex(load_or_create(market_dir))
    atomic_write_bytes(out / "join.json", json.dumps(outcome.doc, indent=2).encode())
    atomic_write_bytes(out / "join_details.json",
                       json.dumps(outcome.details, indent=2).encode())
    _print(outcome.doc, outcome.details)
    if not outcome.mapping.same_catalog:
        log.warning("the market's catalog differs from the encoder's (%d items missing from "
                    "it): these heads cannot join that federation until its catalog is "
                    "extended", outcome.mapping.missing)
    print(f"wrote {out / 'join.json'}, {paths['encoder']} and {paths['private']}")
    print(f"market {args.market}'s identity key (give it to the markets that will trust it): "
          f"{identity}")
    return 0


def _item_knn(flag: str | None, fed_cfg: dict[str, Any]) -> bool:
    if flag is not None:
        return flag == "on"
    value = fed_cfg.get("item-knn", JoinSettings.item_knn)
    return value if isinstance(value, bool) else str(value).lower() == "true"


def _print(doc: dict[str, Any], details: dict[str, Any]) -> None:
    zs, best, reach = doc["zero_shot"], doc["best"], doc["steps_to_target"]
    m = details["mapping"]
    print(f"catalog ({m['copied'] + m['missing'] + m['untrained']} items): {m['copied']} item "
          f"rows from the encoder, {m['missing'] + m['untrained']} fresh ({m['missing']} not in "
          f"the encoder's catalog, {m['untrained']} never trained by the federation)")
    print(f"zero-shot   ndcg@10 {zs['ndcg@10']:.4f}  hr@10 {zs['hr@10']:.4f}")
    scratch = "-" if best["scratch"] is None else f"{best['scratch']:.4f}"
    print(f"best        transfer {best['transfer']:.4f}  scratch {scratch}")
    if "ranked" in doc:
        r, d = doc["ranked"], details.get("ranked_minus_transfer_ndcg@10")
        vs = ("" if not d else f", {d['mean']:+.4f} over the model's own scores (95% paired "
              f"bootstrap {d['ci95_low']:+.4f} .. {d['ci95_high']:+.4f})")
        verdict = ("kept: it ranks the market's candidates from now on" if r["kept"] else
                   f"not kept: its cross-validated valid {r['cv_valid_ndcg@10']:.4f} is not above "
                   f"the model's own {r['model_valid_ndcg@10']:.4f}")
        print(f"ranked      ndcg@10 {r['ndcg@10']:.4f}  (the market's private ranker, "
              f"{len(r['fold_rounds'])} fold boosters of "
              f"{'/'.join(str(x) for x in r['fold_rounds'])} rounds{vs}; {verdict})")
    if best["scratch"] is not None:
        t_reach = ("never" if reach["transfer"] is None else f"after {reach['transfer']} steps")
        print(f"reaching scratch's best ({best['scratch']:.4f}): transfer {t_reach}, scratch "
              f"after {reach['scratch']} steps")
    diff = details.get("transfer_minus_scratch_ndcg@10")
    if diff:
        print(f"kept transfer - kept scratch ndcg@10 {diff['mean']:+.4f} (95% paired bootstrap "
              f"{diff['ci95_low']:+.4f} .. {diff['ci95_high']:+.4f}, {diff['users']} users)")

