"""Faults in a real Flower simulation (Ray): a malicious market, a market whose ClientApp
raises, a market that hangs past the round timeout, and a server killed mid-run that resumes.

The faults are injected by a Flower client mod (``run_federated(client_mods=...)``) defined in a
small driver script, so the storefed client and server code run unchanged."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from storefed.shared.checkpoint import load_encoder, load_private
from storefed.shared.data import load_catalog
from storefed.shared.wire import apply_summed_update, sum_updates

ROOT = Path(__file__).resolve().parents[1]
ROUND_TIMEOUT = 12.0  # seconds, applied in round 3 (see DRIVER)
HANG = ROUND_TIMEOUT + 3.0

DRIVER = textwrap.dedent("""
    import hashlib, sys, time
    from pathlib import Path

    import numpy as np
    import torch

    from storefed.shared.config import RunConfig
    from storefed.shared.wire import from_record, to_record
    from storefed.simulations.simulate import lab_policy, run_federated

    OUT, TRACE = Path(sys.argv[1]), Path(sys.argv[1]) / "trace"
    TIMEOUT, HANG = float(sys.argv[2]), float(sys.argv[3])
    MARKETS = ["m0", "m1", "m2", "m3"]

    def digest(context):
        if "private" not in context.state.array_records:
            return None
        rec = context.state.array_records["private"]
        h = hashlib.sha256()
        for k in sorted(rec.keys()):
            h.update(k.encode()); h.update(rec[k].numpy().tobytes())
        return h.hexdigest()

    def save(name, record):
        TRACE.mkdir(parents=True, exist_ok=True)
        torch.save({k: torch.from_numpy(v.copy()) for k, v in from_record(record).items()},
                   TRACE / name)

    def note(name, value):
        TRACE.mkdir(parents=True, exist_ok=True)
        (TRACE / name).write_text(str(value))

    def faults(msg, context, call_next):
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        market = MARKETS[int(context.node_config["partition-id"])]
        rnd = int(msg.content.config_records["config"]["server-round"])
        note(f"{market}-r{rnd}-heads-in", digest(context))
        save(f"{market}-r{rnd}-global.pt", msg.content.array_records["arrays"])
        if market == "m2" and rnd == 2:
            raise RuntimeError("m2 crashed in the middle of round 2")
        if market == "m3" and rnd == 3:
            time.sleep(HANG)  # past the round timeout: the round must go on without it
        reply = call_next(msg, context)
        note(f"{market}-r{rnd}-heads-out", digest(context))
        arrays = reply.content.array_records["arrays"]
        save(f"{market}-r{rnd}-update.pt", arrays)
        if market == "m1":  # malicious: NaN everywhere
            reply.content["arrays"] = to_record(
                {k: np.full_like(v, np.nan) for k, v in from_record(arrays).items()})
        return reply

    # Round 1 also waits for Ray and its actors to start, which takes unbounded time on a busy
    # machine; the configured round timeout is therefore applied from round 3 (the hang) on.
    import storefed.server.rounds as rounds
    _send_and_receive = rounds.send_and_receive

    def send_and_receive(grid, messages, timeout=None):
        messages = list(messages)
        rnd = max(int(m.content.config_records["config"]["server-round"]) for m in messages)
        return _send_and_receive(grid, messages, timeout=timeout if rnd >= 3 else None)

    rounds.send_and_receive = send_and_receive

    cfg = RunConfig.from_mapping({
        "markets": ",".join(MARKETS), "num-rounds": 3, "embedding-dim": 8, "local-epochs": 1,
        "eval-negatives": 20, "device": "cpu", "out-dir": str(OUT), "round-timeout": TIMEOUT,
        "secagg": False})  # plain FedAvg: the server must see each update to reject m1's
    doc = run_federated(cfg, client_mods=[faults], policy=lab_policy(False, len(MARKETS)))
    print("DONE", doc["wall_seconds"])
""")


def _load(path: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


@pytest.mark.slow
def test_poisoned_crashing_and_hanging_markets_in_a_simulation(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", DRIVER, str(out), str(ROUND_TIMEOUT),
                          str(HANG)], cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert res.returncode == 0 and "DONE" in res.stdout, res.stderr[-4000:]
    doc = json.loads((out / "metrics.json").read_text())
    rounds = {r["round"]: r for r in doc["rounds"]}
    assert sorted(rounds) == [1, 2, 3]
    trained = {r: sorted(m for m, v in rounds[r]["markets"].items() if v["loss"] is not None)
               for r in rounds}
    # m1 (NaN) is excluded every round, m2 crashed in round 2, m3 hung in round 3
    assert trained == {1: ["m0", "m2", "m3"], 2: ["m0", "m3"], 3: ["m0", "m2"]}
    for r in rounds.values():
        assert [x["market"] for x in r["rejected"]] == ["m1"]
        assert r["rejected"][0]["reason"].startswith("non-finite values in ")
        assert {"m0", "m1", "m2"} <= set(r["markets"])  # everyone still evaluated
        for m in r["markets"].values():
            assert np.isfinite(m["ndcg@10"])
    log = res.stderr + res.stdout  # the ServerApp's log handler writes to stdout
    assert "excluded update from market m1: non-finite values" in log

    trace = out / "trace"
    # round 1's aggregate is exactly the honest markets' (m0, m2, m3) sum-average ...
    g1 = {k: torch.from_numpy(v) for k, v in _load(trace / "m0-r1-global.pt").items()}
    honest = [_load(trace / f"{m}-r1-update.pt") for m in ("m0", "m2", "m3")]
    want = apply_summed_update(g1, sum_updates(honest))
    got = _load(trace / "m0-r2-global.pt")
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-6, atol=1e-7)
        assert np.isfinite(got[k]).all()
    # ... and it differs from what m1's (honest-looking) update would have made it
    with_m1 = apply_summed_update(g1, sum_updates([*honest, _load(trace / "m1-r1-update.pt")]))
    assert any(not np.allclose(got[k], v.numpy()) for k, v in with_m1.items())
    ck = load_encoder(out / "encoder.pt")
    assert ck.round == 3 and all(bool(torch.isfinite(v).all()) for v in ck.state.values())

    # m2 crashed in round 2 and came back in round 3 with the heads it had after round 1
    heads_after_1 = (trace / "m2-r1-heads-out").read_text()
    assert heads_after_1 != "None"
    assert (trace / "m2-r2-heads-in").read_text() == heads_after_1
    assert (trace / "m2-r3-heads-in").read_text() == heads_after_1
    assert not (trace / "m2-r2-heads-out").exists()
    fp = load_catalog("synthetic", None).fingerprint()
    assert load_private(out / "state" / "m2" / "private.pt", "m2", fp)[1] == 3
    assert load_private(out / "state" / "m0" / "private.pt", "m0", fp)[1] == 3


def _storefed(out: Path, *extra: str) -> subprocess.Popen:
    policy = out.parent / "two-market-policy.toml"  # two markets: sums of two allowed
    policy.write_text("min-markets = 2\n")
    return subprocess.Popen(
        [sys.executable, "-m", "storefed.simulations.cli", "simulate", "--markets", "m0,m1",
         "--rounds", "3", "--out", str(out), "--config", "embedding-dim=8",
         "--config", "local-epochs=2",
         "--config", "eval-negatives=20", "--device", "cpu", "--market-policy", str(policy),
         *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)  # its own process group: Ray's processes die with it


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    for _ in range(50):  # Ray's processes (same group) must be gone too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_server_killed_mid_run_resumes_without_losing_a_round(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "encoder.pt"
    proc = _storefed(out)
    killed_after = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.is_file() and load_encoder(ckpt).round >= 1:
                os.killpg(proc.pid, signal.SIGKILL)  # the server dies without warning
                killed_after = load_encoder(ckpt).round
                break
            time.sleep(0.05)
    finally:
        _kill_group(proc)
    assert killed_after is not None, "the run never wrote a checkpoint"
    assert killed_after < 3, "the run finished before it could be killed"
    kept = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in kept] == list(range(1, killed_after + 1))

    resumed = _storefed(out, "--resume")
    stdout, stderr = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, stderr[-4000:]
    assert f"resuming from {ckpt} after round {killed_after}" in stderr
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert doc["rounds"][:killed_after] == kept  # no completed round lost or redone
    assert load_encoder(ckpt).round == 3
    fp = load_catalog("synthetic", None).fingerprint()
    for m in ("m0", "m1"):  # clients restored their heads from the state dir and went on
        assert load_private(out / "state" / m / "private.pt", m, fp)[1] == 3
