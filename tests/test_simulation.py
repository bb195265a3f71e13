"""End to end through Flower's simulation engine (Ray), as `storefed simulate` runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from storefed.shared.checkpoint import load_encoder

ROOT = Path(__file__).resolve().parents[1]
XMARKET = ROOT.parent / "shared" / "data" / "xmarket_forec_electronics"


def storefed(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "storefed.simulations.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def check_metrics(doc, markets, rounds):
    assert [r["round"] for r in doc["rounds"]] == list(range(1, rounds + 1))
    for r in doc["rounds"]:
        assert sorted(r["markets"]) == sorted(markets)
        for m in r["markets"].values():
            assert 0.0 <= m["ndcg@10"] <= m["hr@10"] <= 1.0
            assert m["examples"] > 0 and m["categories"]
            for c in m["categories"].values():
                assert 0.0 <= c["ndcg@10"] <= 1.0 and 0.0 <= c["hr@10"] <= 1.0
    assert sorted(doc["final"]["markets"]) == sorted(markets)
    avg = doc["final"]["average"]
    vals = [m["ndcg@10"] for m in doc["final"]["markets"].values()]
    assert avg["ndcg@10"] == pytest.approx(sum(vals) / len(vals))


@pytest.mark.slow
def test_simulate_synthetic_end_to_end(tmp_path):
    out = tmp_path / "run"
    res = storefed("simulate", "--rounds", "2", "--markets", "m0,m1,m2", "--out", str(out),
                   "--config", "embedding-dim=16", "--config", "local-epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    check_metrics(doc, ["m0", "m1", "m2"], 2)
    # learned model beats random ranking (0.045) by a wide margin on the synthetic storefronts
    assert doc["final"]["average"]["ndcg@10"] > 0.1
    ck = load_encoder(out / "encoder.pt")
    assert ck.round == 2 and ck.model.dim == 16
    assert all(k.startswith("encoder.") for k in ck.state)
    assert (out / "state" / "m0" / "private.pt").is_file()


@pytest.mark.slow
def test_simulate_three_real_xmarket_markets(tmp_path):
    if not XMARKET.is_dir():
        pytest.skip(f"{XMARKET} not present: real-data simulation test needs ../shared/data")
    out = tmp_path / "x"
    res = storefed("simulate", "--dataset", "xmarket", "--data-dir", str(XMARKET), "--markets",
                   "in,jp,de", "--rounds", "2", "--out", str(out), "--config", "local-epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    check_metrics(doc, ["in", "jp", "de"], 2)
    assert doc["final"]["average"]["ndcg@10"] > 0.15  # random is 0.045, popularity ~0.3


@pytest.mark.parametrize("args,needle", [
    (["--markets", "m0,zz"], "unknown market(s) zz"),
    (["--dataset", "xmarket", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    (["--config", "lrr=0.1"], "unknown key 'lrr'"),
    (["--config", "num-rounds=two"], "'num-rounds' must be int"),
])
def test_bad_input_gives_one_paragraph_error(tmp_path, args, needle):
    res = storefed("simulate", "--out", str(tmp_path / "o"), *args, timeout=120)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()
