"""Pool join experiments run with different seeds into one verdict per joining market.

    python -m storefed.simulations.experiments.join_seeds runs/join-xmarket-calt-seed{0..9} \
        --out runs/join-xmarket-calt-seeds.json

Each argument is an ``OUT`` of ``simulations.experiments.join_experiment`` (its
``summary.json`` and, per
joining market, ``<market>/join.json`` and ``<market>/join_details.json``; the plain variant).
On a market as small as XMarket ``in`` (239 test users) one run's verdict is decided by noise
(one user moving one rank is ~0.002), so per market this reports:

* one row per run (zero-shot, steps to scratch's best, both bests, the paired difference) and
  how many runs meet each target; where a run trained its scratch baseline with more than one
  loss (``storefed join --scratch-loss auto``), also how many meet the steps target against
  every one of them, not only against the loss picked on valid;
* the seed-averaged curves (mean over runs at each step) and the steps target judged on them;
* the **pooled paired difference**: per user, transfer minus scratch averaged over the runs, with
  a 95% bootstrap interval over users (the runs must score the same users);
* with ``--references-data-dir DIR``: the joined market's final per-user nDCG@10 (its ranker's
  where the ranker was kept, else its model's) against the pooled centralised references
  item-kNN and EASE (every market of the dataset pooled, EASE's lambda chosen on validation, as
  ``storefed benchmark`` fits them), refit with each run's seed so the candidates are the
  run's; per run and pooled over runs, each with a paired 95% bootstrap interval over users.

Prints a markdown table and writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storefed.shared.baselines import Ease, ItemKNN, fit_ease_pooled, fit_itemknn, pooled_scores
from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.data import load_dataset
from storefed.shared.errors import DataError
from storefed.shared.metrics import ndcg_hr_at_k, paired_bootstrap
from storefed.shared.transfer_study import steps_target_met, steps_to_target
from storefed.simulations.command import run_command


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing (is its directory a join_experiment --out?)") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object")
    return doc


def _row(run: Path, summary: dict[str, Any], market: str) -> dict[str, Any]:
    """One run's figures for ``market``: ``summary`` is the run's parsed summary.json."""
    try:
        s = summary["markets"][market]["plain"]
    except KeyError as exc:
        raise DataError(f"{run / 'summary.json'}: no plain join of market {market!r}") from exc
    doc = _read_json(run / market / "join.json")
    details = _read_json(run / market / "join_details.json")
    per_user = details.get("per_user_ndcg@10")
    if not per_user:
        raise DataError(f"{run / market / 'join_details.json'}: no per_user_ndcg@10 (made "
                        "without a scratch curve, or before it was recorded: rerun the join)")
    return {"run": str(run), "seed": details.get("settings", {}).get("seed"),
            "zero_shot": s["zero_shot"]["ndcg@10"],
            "zero_shot_over_scratch_best": s["zero_shot_over_scratch_best"],
            "steps_to_target": s["steps_to_target"], "best": s["best"], "targets": s["targets"],
            "transfer_minus_scratch_ndcg@10": s["transfer_minus_scratch_ndcg@10"],
            # the market's private ranker over the kept model (absent: joined with --ranker off)
            "ranked": (doc.get("ranked") or {}).get("ndcg@10"),
            "ranked_kept": (doc.get("ranked") or {}).get("kept"),
            "ranked_minus_transfer_ndcg@10": details.get("ranked_minus_transfer_ndcg@10"),
            "scratch_loss": details.get("scratch_loss"),
            "steps_target_by_scratch_loss": _by_scratch_loss(doc["transfer"],
                                                             details.get("scratch_by_loss")),
            "curves": {"transfer": doc["transfer"], "scratch": doc["scratch"]},
            "per_user": per_user}


def _joined_per_user(row: dict[str, Any]) -> np.ndarray:
    """What the joined market scores from now on, user by user: its ranker's figures where the
    ranker was kept, else its model's."""
    per_user = row["per_user"]
    if row["ranked_kept"]:
        if "ranked" not in per_user:
            raise DataError(f"{row['run']}: the ranker was kept but its per-user figures were "
                            "not recorded (joined before they were): rerun the join")
        return np.asarray(per_user["ranked"], dtype=np.float64)
    return np.asarray(per_user["transfer"], dtype=np.float64)


REFERENCES = ("itemknn-pooled", "ease-pooled")


def reference_per_user(dataset: str, data_dir: str, seed: int, markets: list[str]
                       ) -> dict[str, dict[str, Any]]:
    """Per market: the users and each pooled reference's per-user test nDCG@10 (item-kNN and
    EASE over every market of ``dataset``, split with ``seed``), plus EASE's lambda."""
    ds = load_dataset(dataset, data_dir or None, None, seed=seed)
    splits, n = ds.markets, ds.catalog.n_items
    knn = fit_itemknn(list(splits.values()), n)
    ease, lam = fit_ease_pooled(splits, n, knn)
    scorers: tuple[ItemKNN | Ease, ...] = (knn, ease)
    out: dict[str, dict[str, Any]] = {}
    for m in markets:
        if m not in splits:
            raise DataError(f"market {m!r} is not in {dataset} under {data_dir}")
        split = splits[m]
        out[m] = {"users": [split.user_ids[u] for u in split.eval_set("test").users.tolist()],
                  "ease_lambda": lam,
                  **{name: ndcg_hr_at_k(torch.from_numpy(pooled_scores(b, split, n)), 10)[0]
                     .numpy() for name, b in zip(REFERENCES, scorers, strict=True)}}
    return out


def against_references(rows: list[dict[str, Any]], refs: list[dict[str, Any]], market: str
                       ) -> dict[str, Any]:
    """``rows``: the runs' ``_row`` dicts; ``refs``: each run's ``reference_per_user`` entry for
    ``market``. Joined minus each reference, per run and pooled over runs (per user, the mean
    over runs of each side)."""
    per_run = []
    joined_all: list[np.ndarray] = []
    ref_all: dict[str, list[np.ndarray]] = {name: [] for name in REFERENCES}
    for r, ref in zip(rows, refs, strict=True):
        if ref["users"] != r["per_user"]["users"]:
            raise DataError(f"market {market}: {r['run']} scores other users than the "
                            "references (another dataset, data directory or split?)")
        joined = _joined_per_user(r)
        joined_all.append(joined)
        entry: dict[str, Any] = {"seed": r["seed"], "joined": float(joined.mean()),
                                 "ease_lambda": ref["ease_lambda"]}
        for name in REFERENCES:
            ref_all[name].append(ref[name])
            entry[name] = float(ref[name].mean())
            entry[f"joined_minus_{name}"] = paired_bootstrap(joined, ref[name])
        per_run.append(entry)
    joined_mean = np.mean(joined_all, axis=0)
    pooled: dict[str, Any] = {"joined": float(joined_mean.mean())}
    for name in REFERENCES:
        ref_mean = np.mean(ref_all[name], axis=0)
        pooled[name] = float(ref_mean.mean())
        pooled[f"joined_minus_{name}"] = paired_bootstrap(joined_mean, ref_mean)
    return {"per_run": per_run, "pooled": pooled}


def references_table(market: str, cmp: dict[str, Any]) -> str:
    def ci(d: dict[str, float]) -> str:
        return f"{d['mean']:+.4f} [{d['ci95_low']:+.4f}, {d['ci95_high']:+.4f}]"

    lines = ["| run (seed) | joined | item-kNN pooled | EASE pooled (lambda) | joined - item-kNN "
             "[95% CI] | joined - EASE [95% CI] |", "|---|---|---|---|---|---|"]
    for e in cmp["per_run"]:
        lines.append(f"| `{market}` ({e['seed']}) | {e['joined']:.4f} | "
                     f"{e['itemknn-pooled']:.4f} | {e['ease-pooled']:.4f} "
                     f"({e['ease_lambda']:g}) | {ci(e['joined_minus_itemknn-pooled'])} | "
                     f"{ci(e['joined_minus_ease-pooled'])} |")
    p = cmp["pooled"]
    lines.append(f"| **pooled over runs** | {p['joined']:.4f} | {p['itemknn-pooled']:.4f} | "
                 f"{p['ease-pooled']:.4f} | {ci(p['joined_minus_itemknn-pooled'])} | "
                 f"{ci(p['joined_minus_ease-pooled'])} |")
    return "\n".join(lines)


def _by_scratch_loss(transfer: list[list[float]],
                     by_loss: dict[str, Any] | None) -> dict[str, bool] | None:
    """Per scratch loss tried (``join_details.json``'s ``scratch_by_loss``): does ``transfer``
    reach that scratch curve's best within a third of its steps?"""
    if not by_loss:
        return None
    return {loss: steps_target_met({"transfer": steps_to_target(transfer, r["best"]),
                                    "scratch": r["steps_to_best"]})
            for loss, r in by_loss.items()}


def _mean_curve(curves: list[list[list[float]]], what: str) -> list[list[float]]:
    steps = [[int(s) for s, _ in c] for c in curves]
    if any(s != steps[0] for s in steps):
        raise DataError(f"the runs' {what} curves are evaluated at different steps: pool only "
                        "runs made with the same budget and eval-every")
    values = np.asarray([[v for _, v in c] for c in curves], dtype=np.float64)
    return [[s, float(v)] for s, v in zip(steps[0], values.mean(axis=0), strict=True)]


def pool_market(rows: list[dict[str, Any]], market: str) -> dict[str, Any]:
    """The verdict for one market over runs (``_row`` dicts)."""
    users = rows[0]["per_user"]["users"]
    for r in rows[1:]:
        if r["per_user"]["users"] != users:
            raise DataError(f"market {market}: {r['run']} scores other users than "
                            f"{rows[0]['run']}: runs must come from the same data and split")
    diff = {k: np.mean([r["per_user"][k] for r in rows], axis=0) for k in ("transfer", "scratch")}
    mean_t = _mean_curve([r["curves"]["transfer"] for r in rows], "transfer")
    mean_s = _mean_curve([r["curves"]["scratch"] for r in rows], "scratch")
    best_s = max(v for _, v in mean_s)
    reach = {"transfer": steps_to_target(mean_t, best_s),
             "scratch": steps_to_target(mean_s, best_s)}
    by_loss = [r["steps_target_by_scratch_loss"] for r in rows]
    return {
        "runs": len(rows),
        "targets_met": {t: sum(bool(r["targets"][t]) for r in rows) for t in rows[0]["targets"]},
        # the steps target against every scratch loss each run tried (None: a run tried one)
        "steps_target_met_vs_every_scratch_loss": (
            None if any(b is None for b in by_loss)
            else sum(all(b.values()) for b in by_loss if b is not None)),
        "rows": [{k: v for k, v in r.items() if k not in ("curves", "per_user")} for r in rows],
        "mean_curves": {"transfer": mean_t, "scratch": mean_s},
        "mean_curves_best": {"transfer": max(v for _, v in mean_t), "scratch": best_s},
        "mean_curves_steps_to_target": reach,
        "mean_curves_steps_target_met": steps_target_met(reach),
        "pooled_transfer_minus_scratch_ndcg@10": paired_bootstrap(diff["transfer"],
                                                                  diff["scratch"]),
    }


def _steps(r: dict[str, Any]) -> str:
    t, s = r["steps_to_target"]["transfer"], r["steps_to_target"]["scratch"]
    text = f"{t} vs {s}" if t is not None else f"not reached vs {s}"
    if t and s:
        text += f" ({t / s:.2f})"
    return text if r["targets"]["steps_ratio<=1/3"] else f"**{text}**"


def table(market: str, pooled: dict[str, Any]) -> str:
    lines = ["| run (seed) | zero-shot (x scratch's best) | steps to scratch's best: transfer "
             "vs scratch | best: transfer / scratch | kept transfer - scratch [95% CI] | "
             "ranked (- transfer [95% CI]) |",
             "|---|---|---|---|---|---|"]
    for r in pooled["rows"]:
        d = r["transfer_minus_scratch_ndcg@10"]
        rd = r.get("ranked_minus_transfer_ndcg@10")
        ranked = ("-" if r.get("ranked") is None else f"{r['ranked']:.4f}" + (
            "" if not rd else f" ({rd['mean']:+.4f} [{rd['ci95_low']:+.4f}, "
                              f"{rd['ci95_high']:+.4f}])") + (
            " (not kept)" if r.get("ranked_kept") is False else ""))
        lines.append(f"| `{market}` ({r['seed']}) | {r['zero_shot']:.4f} "
                     f"({r['zero_shot_over_scratch_best']:.2f}x) | {_steps(r)} | "
                     f"{r['best']['transfer']:.4f} / {r['best']['scratch']:.4f}"
                     f"{'' if not r.get('scratch_loss') else ' (' + r['scratch_loss'] + ')'} | "
                     f"{d['mean']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}] | "
                     f"{ranked} |")
    met, p = pooled["targets_met"], pooled["pooled_transfer_minus_scratch_ndcg@10"]
    reach = pooled["mean_curves_steps_to_target"]
    lines += ["", f"`{market}`: steps target met in {met['steps_ratio<=1/3']} of "
              f"{pooled['runs']} runs{_every(pooled)}, zero-shot target in "
              f"{met['zero_shot>=0.8x']}; "
              f"seed-averaged curves: transfer starts at "
              f"{pooled['mean_curves']['transfer'][0][1]:.4f} (best "
              f"{pooled['mean_curves_best']['transfer']:.4f}), scratch's best "
              f"{pooled['mean_curves_best']['scratch']:.4f}, steps {reach['transfer']} vs "
              f"{reach['scratch']}; pooled transfer - scratch {p['mean']:+.4f} "
              f"[{p['ci95_low']:+.4f}, {p['ci95_high']:+.4f}] over {p['users']} users"]
    return "\n".join(lines)


def _every(pooled: dict[str, Any]) -> str:
    n = pooled["steps_target_met_vs_every_scratch_loss"]
    return "" if n is None else f" ({n} against every scratch loss tried)"


def run(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.runs]
    summaries = [_read_json(r / "summary.json") for r in runs]  # read once, used per market
    markets = (args.markets.split(",") if args.markets else
               list(summaries[0].get("markets", {})))
    pooled_by_market: dict[str, Any] = {}
    doc = {"runs": [str(r) for r in runs], "markets": pooled_by_market}
    rows = {m: [_row(r, s, m) for r, s in zip(runs, summaries, strict=True)] for m in markets}
    refs: dict[int, dict[str, dict[str, Any]]] = {}
    if args.references_data_dir:
        dataset = str(summaries[0].get("dataset", "xmarket"))
        for seed in dict.fromkeys(int(r["seed"]) for r in rows[markets[0]]):
            refs[seed] = reference_per_user(dataset, args.references_data_dir, seed, markets)
    for m in markets:
        pooled = pool_market(rows[m], m)
        pooled_by_market[m] = pooled
        print(table(m, pooled), end="\n\n")
        if refs:
            pooled["references"] = against_references(
                rows[m], [refs[int(r["seed"])][m] for r in rows[m]], m)
            print(references_table(m, pooled["references"]), end="\n\n")
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(doc, indent=2).encode())
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m storefed.simulations.experiments.join_seeds",
                                description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("runs", nargs="+", help="join_experiment --out directories (one per seed)")
    p.add_argument("--markets", default="", help="comma list (default: the first run's)")
    p.add_argument("--out", default="", help="write the pooled JSON here")
    p.add_argument("--references-data-dir", default="",
                   help="also compare with the pooled item-kNN and EASE references fitted on "
                        "the runs' dataset read from this directory")
    args = p.parse_args(argv)
    return run_command("join_seeds", run, args)


if __name__ == "__main__":
    sys.exit(main())
