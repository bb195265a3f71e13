"""Rounds are chosen on validation: every market reports its validation figures beside its test
figures, metrics.json keeps them per market and on average, and `storefed simulate` names its
best round by them, reading test only at that round."""

from __future__ import annotations

import math

from storefed.simulations.simulate import report_run, round_curve
from tests.test_secagg import run


def test_each_round_carries_every_markets_validation_figures(tmp_path):
    markets = ["m0", "m1", "m2"]
    _, _, doc, _, _ = run(tmp_path, markets, **{"num-rounds": 2})
    for r in doc["rounds"]:
        for m in markets:
            v = r["markets"][m]
            assert 0.0 <= v["valid_ndcg@10"] <= v["valid_hr@10"] <= 1.0, (m, v)
        assert any(r["markets"][m]["valid_ndcg@10"] != r["markets"][m]["ndcg@10"]
                   for m in markets), "valid figures equal the test ones: the same split?"
    avg = doc["final"]["average"]
    want = sum(doc["rounds"][-1]["markets"][m]["valid_ndcg@10"] for m in markets) / 3
    assert math.isclose(avg["valid_ndcg@10"], want)


def _doc(test: list[float], valid: list[float | None]) -> dict:
    return {"rounds": [{"round": i + 1, "markets": {"m0": {"ndcg@10": t, "valid_ndcg@10": v}}}
                       for i, (t, v) in enumerate(zip(test, valid, strict=True))]}


def test_the_best_round_is_the_best_on_validation_not_on_test(tmp_path, capsys, monkeypatch):
    import storefed.simulations.simulate as sim
    monkeypatch.setattr(sim, "load_market", lambda *a, **k: (_Cat(), None))
    monkeypatch.setattr("storefed.shared.baselines.run_popularity",
                        lambda splits, n, which: {"m0": {"ndcg@10": 0.1}})
    doc = _doc(test=[0.30, 0.50, 0.40], valid=[0.35, 0.20, 0.45])
    assert round_curve(doc, "valid_ndcg@10") == [(1, 0.35), (2, 0.20), (3, 0.45)]
    cfg = sim.RunConfig(markets="m0")
    report_run(doc, cfg, tmp_path)
    out = capsys.readouterr().out
    assert "best round on validation: 3 of 3" in out and "test avg ndcg@10 0.4000" in out
    assert (tmp_path / "learning_curve.png").is_file()
    report_run(_doc(test=[0.3, 0.5], valid=[None, None]), cfg, tmp_path)
    assert "no validation figures reported" in capsys.readouterr().out


class _Cat:
    n_items = 10
