"""Operators only on the Control API (simulations/gateway.py), on real processes on 127.0.0.1.

The SuperLink binds loopback; `storefed deploy gateway` faces the network with the Fleet API on
its public port and the Control API on an operator port that wants a client certificate; an
operator's `flwr` goes through `storefed deploy operator-forward`. The attack: someone who can
reach the public port (every region can) submits a run or registers a node. Against a SuperLink
exposed directly, as the runbook used to say, that works (`test_an_exposed_superlink_...`).
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from pathlib import Path

import httpx
import pytest

from storefed.shared.policy import write_policy
from storefed.simulations.cluster import LocalCluster, free_port, wait_port
from storefed.simulations.deploy import (
    CONNECTION,
    DeployError,
    flwr_cli,
    generate_operator_cert,
    json_tail,
    register_node,
    submit_run,
    write_connection,
)
from storefed.simulations.gateway import CONTROL_PREFIX, FLEET_PREFIX, forwarding_app
from storefed.simulations.simulate import lab_policy

MARKETS = ["m0", "m1", "m2"]
RUN = {"dataset": "synthetic", "markets": ",".join(MARKETS), "embedding-dim": 16,
       "local-epochs": 1, "torch-threads": 1, "secagg": True, "num-rounds": 1}


def _cli(c: LocalCluster, *args: str) -> list[str]:
    return [sys.executable, "-m", "storefed.simulations.cli", "deploy", *args]


def _outsider(c: LocalCluster, address: str) -> dict[str, str]:
    """A `flwr` home that dials ``address`` with the deployment's CA (what any region host, or
    anyone who can reach the address, can set up)."""
    home = c.root / f"outsider-{address.replace(':', '-')}"
    home.mkdir(exist_ok=True)
    write_connection(home, address, c.certs / "ca.crt")
    from storefed.simulations.deploy import flower_env

    return flower_env(home)


def test_the_forwarding_app_serves_one_prefix_only():
    """In process: a path outside the prefix never reaches the upstream."""
    from starlette.testclient import TestClient

    from storefed.simulations.gateway import Upstream

    app = forwarding_app(Upstream("http://127.0.0.1:9", None), FLEET_PREFIX, "public")
    with TestClient(app) as client:
        for path in ("/v1/control/start-run", "/v1/runtime/pull-messages", "/",
                     "/v1/fleet/../control/start-run"):
            r = client.post(path, content=b"x")
            assert r.status_code in (403, 404), (path, r.status_code)
            assert r.status_code == 403 or "fleet" not in path
        # the allowed prefix is forwarded (here to a closed port: 502, not 403)
        assert client.post("/v1/fleet/pull-messages", content=b"").status_code == 502
    assert CONTROL_PREFIX != FLEET_PREFIX


@pytest.mark.slow
def test_control_api_only_through_the_operator_path(tmp_path):
    c = LocalCluster(tmp_path, policy=write_policy(tmp_path / "policy",
                                                   lab_policy(True, len(MARKETS))))
    try:
        c.make_certs()
        c.start_superlink()  # binds 127.0.0.1 only
        superlink = c.address
        public, operator, forward = free_port(), free_port(), free_port()
        gw = c._spawn("gateway", _cli(c, "gateway", "--certs", str(c.certs), "--superlink",
                                       superlink, "--host", "127.0.0.1", "--port", str(public),
                                       "--operator-port", str(operator)), tmp_path / "home-gw")
        wait_port(public, gw)
        wait_port(operator, gw)
        ops = tmp_path / "operator"
        ops.mkdir()
        crt, key = generate_operator_cert(ops, c.certs / "ca.crt", c.certs / "ca.key", "alice")
        fw = c._spawn("forward", _cli(c, "operator-forward", "--gateway",
                                       f"127.0.0.1:{operator}", "--ca", str(c.certs / "ca.crt"),
                                       "--cert", str(crt), "--key", str(key), "--port",
                                       str(forward)), tmp_path / "home-fw")
        wait_port(forward, fw)

        # --- from outside, through the public port: refused
        outsider = _outsider(c, f"127.0.0.1:{public}")
        priv, pub = c.node_keys("intruder", register=False)
        with pytest.raises(DeployError):
            register_node(pub, outsider, name="intruder")
        with pytest.raises(DeployError):
            submit_run(c.app_dir, {**RUN, "out-dir": str(tmp_path / "x")}, outsider)
        assert "refused POST /v1/control/" in c.log_tail("gateway", 20000)
        # ... and on the operator port without a client certificate: no TLS session at all
        ctx = ssl.create_default_context(cafile=str(c.certs / "ca.crt"))
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"https://127.0.0.1:{operator}/v1/control/list-runs", verify=ctx,
                       timeout=10)

        # --- the operator path: flwr -> operator-forward -> gateway (client cert) -> SuperLink
        write_connection(c.cli_home, f"127.0.0.1:{forward}", None)
        c.address = f"127.0.0.1:{public}"  # the regions dial the gateway's public port
        c.start_nodes(MARKETS, tmp_path / "state", dataset="synthetic")  # registers via flwr
        out = tmp_path / "out"
        run_id, final = c.run({**RUN, "out-dir": str(out)}, 400)
        assert final == "finished:completed", {n: c.log_tail(n) for n in c.procs}
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert sorted(m for m, v in rounds[-1]["markets"].items() if v["trained"]) == MARKETS
        log = flwr_cli(["log", str(run_id), CONNECTION, "--show"], c.cli_env, timeout=120)
        assert "received 3 results and 0 failures" in log.stdout.lower(), log.stdout[-2000:]
        # flwr stop through the same path
        second = submit_run(c.app_dir, {**RUN, "num-rounds": 50, "out-dir": str(tmp_path / "o2")},
                            c.cli_env)
        stop = json_tail(flwr_cli(["stop", str(second), CONNECTION, "--format", "json"],
                                c.cli_env).stdout)
        assert stop.get("success"), stop
        end = time.monotonic() + 60
        while True:
            runs = json_tail(flwr_cli(["list", CONNECTION, "--run-id", str(second), "--format",
                                     "json"], c.cli_env).stdout)["runs"]
            if str(runs[0]["status"]).startswith("finished"):
                break
            assert time.monotonic() < end, runs
            time.sleep(2)
        assert runs[0]["status"] == "finished:stopped"
    finally:
        c.close()
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"


@pytest.mark.slow
def test_an_exposed_superlink_takes_runs_from_anyone_who_reaches_it(tmp_path):
    """Why the gateway: the SuperLink's own port serves the Control API to whoever reaches it
    (the CA certificate is public to every region). Nothing here is refused."""
    c = LocalCluster(tmp_path)
    try:
        c.make_certs()
        c.start_superlink()
        outsider = _outsider(c, c.address)
        _, pub = c.node_keys("intruder", register=False)
        assert register_node(pub, outsider, name="intruder") > 0
        assert submit_run(c.app_dir, {**RUN, "out-dir": str(tmp_path / "x")}, outsider) > 0
    finally:
        c.close()
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"


def test_operator_forward_listens_on_loopback_only(tmp_path):
    from storefed.simulations.gateway import operator_forward_listener

    with pytest.raises(ValueError, match="loopback"):
        operator_forward_listener("h:1", Path("ca"), Path("c"), Path("k"), ("0.0.0.0", 9093))
