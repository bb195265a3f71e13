"""How much of the join's steps target is the noise of its measure? (lab probe)

    python -m storefed.simulations.experiments.join_steps_noise --dataset xmrec \
        --data-dir XMREC --sources s1,s2 --join s3 --encoder-steps 600 --scratch-steps 1500 \
        --seeds 0,1,2,3,4 --out runs/join-steps-noise-s3

The steps target compares two curves of test nDCG@10, a mean over the market's test users (3,328
on ``s3``, 239 on XMarket ``in``): the steps transfer needs to reach scratch's best against a
third of the steps scratch needs. Near the top both curves move by a user or two, so the count
can flip on which users happen to be in the test set. Per seed, this runs the join exactly as
``storefed join`` does (``join_market``'s zero-shot model, curves, valid selection and scratch
losses) but keeps every curve point's per-user nDCG@10, then resamples the test users with
replacement (2,000 times) and recomputes both curves, scratch's best and the two step counts on
each resample. Prints per seed the steps as measured and the share of resamples on which the
target is met; writes OUT/steps_noise.json. Without ``--encoders`` each seed federates its
sources first (OUT/fed-seedN).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.data import Catalog, MarketSplit, load_market
from storefed.shared.encoder_map import load_join_checkpoint
from storefed.shared.model import MarketModel
from storefed.shared.node import KnnScores, attach_knn, calibrate_knn, evaluate_split
from storefed.shared.transfer import (
    SCRATCH_AUTO_LOSSES,
    JoinSettings,
    Phase,
    run_curve,
    transfer_phases,
    zero_shot_model,
)
from storefed.shared.transfer_study import (
    scratch_model,
    steps_target_met,
    steps_to_target,
    user_ndcg,
)
from storefed.simulations.command import run_command
from storefed.simulations.experiments.join_temperature import add_probe_args, seed_encoders

N_BOOT = 2000


class Recorder:
    """Evaluator and selector for ``run_curve`` that keep each checkpoint's per-user test
    nDCG@10 and its valid nDCG@10, in the order ``run_curve`` asks for them."""

    def __init__(self, catalog: Catalog, split: MarketSplit, knn: KnnScores | None,
                 device: torch.device, grid: tuple[float, ...]) -> None:
        self.catalog, self.split, self.knn, self.device = catalog, split, knn, device
        self.grid = grid
        self.users: list[np.ndarray] = []
        self.valid: list[float] = []

    def evaluator(self, model: MarketModel) -> float:
        calibrate_knn(model, self.split, self.device, self.knn, self.grid)
        per_user = user_ndcg(model, self.split, "test", self.device, self.knn)
        self.users.append(per_user)
        return float(per_user.mean())

    def selector(self, model: MarketModel) -> float:
        value = float(evaluate_split(model, self.split, self.catalog, "valid",  # type: ignore[arg-type]
                                     self.device, knn=self.knn)["ndcg@10"])
        self.valid.append(value)
        return value

    def kept(self) -> np.ndarray:
        """P x U: at each curve point, the per-user figures of the checkpoint kept by then (the
        best valid so far, first on ties), as ``run_curve``'s curve reports their mean."""
        rows, best, at = [], -np.inf, 0
        for i, v in enumerate(self.valid):
            if v > best:
                best, at = v, i
            rows.append(self.users[at])
        return np.stack(rows)


def steps_resampled(curves: dict[str, tuple[list[int], np.ndarray]],
                    rng: np.random.Generator) -> dict[str, Any]:
    """Steps to scratch's best for both curves, as measured and on ``N_BOOT`` user resamples."""
    steps_t, kept_t = curves["transfer"]
    steps_s, kept_s = curves["scratch"]
    n_users = kept_t.shape[1]

    def reach(idx: np.ndarray | None) -> tuple[int | None, int | None]:
        t = kept_t if idx is None else kept_t[:, idx]
        s = kept_s if idx is None else kept_s[:, idx]
        ct = [[st, float(v)] for st, v in zip(steps_t, t.mean(axis=1), strict=True)]
        cs = [[st, float(v)] for st, v in zip(steps_s, s.mean(axis=1), strict=True)]
        best = max(v for _, v in cs)
        return steps_to_target(ct, best), steps_to_target(cs, best)

    measured = reach(None)
    best = {"transfer": float(kept_t.mean(axis=1).max()),
            "scratch": float(kept_s.mean(axis=1).max())}
    met = 0
    ratios = []
    for _ in range(N_BOOT):
        t, s = reach(np.asarray(rng.integers(0, n_users, size=n_users)))
        ok = steps_target_met({"transfer": t, "scratch": s})
        met += ok
        ratios.append(np.inf if t is None or s is None or (s == 0 and t > 0)
                      else t / max(s, 1))
    lo, hi = np.quantile(ratios, [0.025, 0.975], method="inverted_cdf")
    return {"transfer": measured[0], "scratch": measured[1], "best": best,
            "zero_shot": float(kept_t[0].mean()),
            "met": steps_target_met({"transfer": measured[0], "scratch": measured[1]}),
            "met_share": met / N_BOOT, "ratio_ci95": [float(lo), float(hi)],
            "users": int(n_users)}


def one_seed(encoder: Path, split: MarketSplit, catalog: Catalog, settings: JoinSettings,
             device: torch.device) -> dict[str, Any]:
    """The join's two curves (as ``join_market`` runs them) with per-user test figures."""
    start = zero_shot_model(load_join_checkpoint(encoder), catalog, split, settings, device,
                            encoder)
    curves: dict[str, tuple[list[int], np.ndarray]] = {}
    rec = Recorder(catalog, split, start.knn, device, settings.knn_grid)
    curve = run_curve(start.model, split, transfer_phases(settings), settings, device,
                      rec.evaluator, selector=rec.selector)
    curves["transfer"] = ([int(s) for s, _ in curve], rec.kept())
    picked_valid = -1.0
    for loss in SCRATCH_AUTO_LOSSES:
        model = scratch_model(start.model.cfg, catalog, split, settings.seed)
        if settings.item_knn:
            attach_knn(model, split, catalog.n_items)
        r = Recorder(catalog, split, start.knn, device, settings.knn_grid)
        c = run_curve(model, split, [Phase(settings.scratch_budget, True, 1.0)],
                      dataclasses.replace(settings, loss=loss), device, r.evaluator,
                      selector=r.selector)
        kept = r.kept()
        calibrate_knn(model, split, device, start.knn, settings.knn_grid)
        kept_valid = r.selector(model)
        if kept_valid > picked_valid:  # ties: first, as join_market
            picked_valid = kept_valid
            curves["scratch"] = ([int(s) for s, _ in c], kept)
    return steps_resampled(curves, np.random.default_rng(settings.seed))


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, args.threads))
    cpu = torch.device("cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {}
    for seed, encoder in seed_encoders(args, out):
        catalog, split = load_market(args.dataset, args.data_dir, args.join, seed=seed)
        settings = JoinSettings(seed=seed, encoder_steps=args.encoder_steps,
                                scratch_steps=args.scratch_steps, loss=args.loss, ranker=False)
        row = one_seed(encoder, split, catalog, settings, cpu)
        row["encoder"] = str(encoder)
        doc[str(seed)] = row
        print(f"seed {seed}: zero-shot {row['zero_shot']:.4f}, best {row['best']['transfer']:.4f}"
              f" vs scratch {row['best']['scratch']:.4f}; "
              f"steps {row['transfer']} vs {row['scratch']} (met {row['met']}); "
              f"met on {row['met_share']:.0%} of user resamples, ratio 95% interval "
              f"[{row['ratio_ci95'][0]:.2f}, {row['ratio_ci95'][1]:.2f}] "
              f"({row['users']} users)", flush=True)
        atomic_write_bytes(out / "steps_noise.json", json.dumps(doc, indent=1).encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storefed.simulations.experiments.join_steps_noise",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_probe_args(p, join="in", out="runs/join-steps-noise")
    return run_command("join_steps_noise", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
