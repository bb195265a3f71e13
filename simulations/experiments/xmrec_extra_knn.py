"""XMRec ``train.tsv`` as extra training rows: does it help? A plain cosine item-kNN
(``shared.baselines.run_itemknn_pooled``) on ``s3``, over s3 alone and pooled over s1-s3, with
and without the extra rows (``ReaderOptions.xmrec_extra_train``).

Decision record: the option is kept on by default because it wins on storefed's *validation*
split of s3 (each user's last ``train_5core`` row against 99 sampled negatives): the figure
used for choosing. The official ``valid_run`` figure (storefed's test split for xmrec) is
printed for comparison with the issue's and the challenge's numbers, never used to choose.

Run: ``python -m storefed.simulations.experiments.xmrec_extra_knn --data-dir XMREC``.
"""

from __future__ import annotations

import argparse

from storefed.shared.baselines import run_itemknn_pooled
from storefed.shared.data import ReaderOptions, load_catalog, load_market

MARKETS = ("s1", "s2", "s3")


def knn_rows(data_dir: str) -> list[dict[str, object]]:
    """One row per (extra rows off/on, s3 alone / pooled s1-s3): s3's nDCG@10 on valid and on
    the official valid_run."""
    rows: list[dict[str, object]] = []
    for extra in (False, True):
        opts = ReaderOptions(xmrec_extra_train=extra)
        splits = {m: load_market("xmrec", data_dir, m, options=opts)[1] for m in MARKETS}
        n_items = load_catalog("xmrec", data_dir, options=opts).n_items
        for name, fit in (("s3 alone", {"s3": splits["s3"]}), ("pooled s1-s3", splits)):
            valid = run_itemknn_pooled(fit, n_items, which="valid")["s3"]["ndcg@10"]
            test = run_itemknn_pooled(fit, n_items, which="test")["s3"]["ndcg@10"]
            rows.append({"extra": extra, "fit": name, "valid": valid, "valid_run": test,
                         "n_train_s3": splits["s3"].n_train})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Print the four rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args(argv)
    for r in knn_rows(args.data_dir):
        print(f"xmrec-extra-train={str(r['extra']).lower():5} {r['fit']:13} "
              f"s3 valid nDCG@10 {r['valid']:.4f}  official valid_run nDCG@10 "
              f"{r['valid_run']:.4f}  (s3 training rows {r['n_train_s3']})")


if __name__ == "__main__":
    main()
