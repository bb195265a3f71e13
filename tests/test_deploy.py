"""Deployment: certificates/keys Flower accepts, and a real SuperLink (TLS + SuperNode auth) with
three SuperNodes on 127.0.0.1: two rounds with per-market metrics, an unregistered node and a
node with the wrong CA refused, and a server crash after round 2 of 4 resumed to round 4.

Every process is started with its own process group and stopped by PID in the fixture's
teardown (also when a test fails). Synthetic data, embedding-dim 16, one local epoch.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from storefed.shared.checkpoint import load_encoder
from storefed.shared.config import RunConfig
from storefed.shared.errors import ConfigError
from storefed.shared.policy import write_policy
from storefed.simulations.cluster import LocalCluster
from storefed.simulations.deploy import (
    DeployError,
    generate_ca,
    generate_node_keys,
    generate_server_cert,
    node_config_string,
    run_config_string,
    write_connection,
)
from storefed.simulations.fab import write_app
from storefed.simulations.simulate import lab_policy

MARKETS = ["m0", "m1", "m2"]
SMALL = {"dataset": "synthetic", "markets": ",".join(MARKETS), "embedding-dim": 16,
         "local-epochs": 1, "torch-threads": 1, "secagg": True}


# --------------------------------------------------------------------------- fast checks
def test_certificates_chain_and_sans(tmp_path):
    ca_crt, ca_key = generate_ca(tmp_path)
    crt, key = generate_server_cert(tmp_path, ca_crt, ca_key, ["link.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if not signed by the CA
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert key.stat().st_mode & 0o077 == 0 and ca_key.stat().st_mode & 0o077 == 0


def test_node_keys_are_what_flower_loads(tmp_path):
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    priv, pub = generate_node_keys(tmp_path, "de")
    private = load_ssh_private_key(priv.read_bytes(), None)  # as flower-supernode loads it
    public = load_ssh_public_key(pub.read_bytes())  # as `flwr supernode register` loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey) and uses_nist_ec_curve(public)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert priv.stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError):
        generate_node_keys(tmp_path, "../x")


def test_config_strings_round_trip_through_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    nc = node_config_string("de", "/data/x market", str(tmp_path / "st"), "cuda")
    assert parse_config_args([nc]) == {"market": "de", "data-dir": "/data/x market",
                                       "state-dir": str(tmp_path / "st"), "device": "cuda"}
    assert parse_config_args([node_config_string("de", ranker=True)]) == {
        "market": "de", "ranker": True}  # what client_app.py's evaluation checks
    rc = run_config_string({"num-rounds": 3, "resume": True, "lr": 0.01, "out-dir": "/o"})
    assert parse_config_args([rc]) == {"num-rounds": 3, "resume": True, "lr": 0.01,
                                       "out-dir": "/o"}
    with pytest.raises(ConfigError, match="num-round"):
        run_config_string({"num-round": 3})
    with pytest.raises(ConfigError, match="quotes"):
        node_config_string("de", data_dir='/a"b')


def test_connection_file_keeps_other_connections(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "other"\n\n[superlink.other]\naddress = "h:1"\ninsecure = true\n')
    write_connection(tmp_path, "link:9092", tmp_path / "ca.crt")
    import tomllib

    doc = tomllib.loads((tmp_path / "config.toml").read_text())
    assert doc["superlink"]["default"] == "storefed"
    assert doc["superlink"]["other"] == {"address": "h:1", "insecure": True}
    assert doc["superlink"]["storefed"] == {"address": "link:9092",
                                            "root-certificates": str(tmp_path / "ca.crt")}
    (tmp_path / "config.toml").write_text("[superlink\n")
    with pytest.raises(ConfigError, match="config.toml"):
        write_connection(tmp_path, "link:9092", None)


def test_app_directory_carries_code_and_defaults(tmp_path):
    import tomllib

    app = write_app(tmp_path / "app")
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    assert doc["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "storefed.server.server_app:app",
        "clientapp": "storefed.client.client_app:app"}
    assert doc["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()
    for f in ("server/server_app.py", "client/client_app.py", "shared/node.py"):
        assert (app / f).is_file()


def test_cli_certs_keys_and_bad_input(tmp_path, capsys):
    from storefed.simulations.cli import main

    assert main(["deploy", "certs", "--out", str(tmp_path), "--host", "link.test"]) == 0
    ca_before = (tmp_path / "ca.crt").read_bytes()
    assert main(["deploy", "certs", "--out", str(tmp_path)]) == 0  # reuses the CA
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    assert main(["deploy", "keys", "--out", str(tmp_path / "k"), "de", "fr"]) == 0
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "de.key", "de.pub", "fr.key", "fr.pub"]
    assert main(["deploy", "run", "--markets", "de", "--out", "relative/out"]) == 2
    assert "absolute path" in capsys.readouterr().err
    assert main(["deploy", "superlink", "--certs", str(tmp_path / "nothing")]) == 2


# --------------------------------------------------------------------------- real processes
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    c = LocalCluster(root, policy=write_policy(root / "policy", lab_policy(True, len(MARKETS))))
    try:
        c.make_certs()
        c.start_superlink()
        c.start_nodes(MARKETS, root / "state", dataset="synthetic")
        yield c
    finally:
        c.close()
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"


def _fail_with_logs(cluster: LocalCluster, what: str) -> None:
    tails = "\n".join(f"--- {n} ---\n{cluster.log_tail(n, 2000)}" for n in cluster.procs)
    pytest.fail(f"{what}\n{tails}")


def _private_round(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["round"])


def _rounds_seen(cluster: LocalCluster, market: str, run_id: int) -> list[str]:
    """Message types the market's executor handled for ``run_id``, in order."""
    lines = cluster.log_tail(f"node-{market}", 10**7).splitlines()
    return [ln.split(" storefed: ")[1].split(" message")[0] for ln in lines
            if f"of run {run_id} " in ln and " handled in " in ln]


def _evaluations(cluster: LocalCluster, market: str, run_id: int) -> int:
    """Evaluate messages the market's executor handled for ``run_id`` (one per round; the
    SecAgg+ stages are train.secagg messages)."""
    return _rounds_seen(cluster, market, run_id).count("evaluate")


@pytest.mark.slow
def test_tls_auth_refusals_and_server_crash_resume(cluster):
    """One 4-round run (cheaper than two runs on 2 cores): rounds 1-2 must complete with
    per-market metrics while an unregistered node and a node trusting another CA are refused;
    then the server side is SIGKILLed after round 2 and a restarted SuperLink + resubmitted run
    (resume=true) finishes rounds 3-4 from round 2's checkpoint with the nodes' heads."""
    from storefed.simulations.deploy import submit_run

    root = cluster.root
    rogue_key, _ = cluster.node_keys("rogue", register=False)  # never registered
    other = root / "other-ca"
    other.mkdir()
    other_ca, _ = generate_ca(other)
    wrong_key, _ = cluster.node_keys("wrongca")  # registered, but trusts another CA
    rogue = cluster.start_bare_supernode("rogue", rogue_key, cluster.certs / "ca.crt")
    wrong = cluster.start_bare_supernode("wrongca", wrong_key, other_ca)

    out = root / "out"
    values = {**SMALL, "num-rounds": 4, "out-dir": str(out)}
    first = submit_run(cluster.app_dir, values, cluster.cli_env)
    ckpt = out / "encoder.pt"
    end = time.monotonic() + 600
    while not (ckpt.is_file() and load_encoder(ckpt).round >= 2):
        if time.monotonic() > end or cluster.procs["superlink"].poll() is not None:
            _fail_with_logs(cluster, "round 2 was never checkpointed")
        time.sleep(0.05)
    cluster.stop("superlink", signal.SIGKILL)  # the server side dies: SuperLink + ServerApp
    crashed = load_encoder(ckpt)
    assert crashed.round == 2, "killed too late: round 3 already finished"

    # --- rounds 1-2 over TLS with node auth: per-market metrics came back
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    for r in doc["rounds"]:
        assert sorted(r["markets"]) == MARKETS
        for m, v in r["markets"].items():
            assert 0.0 <= v["ndcg@10"] <= v["hr@10"] <= 1.0, (m, v)
            assert v["examples"] > 0 and v["trained"] and v["categories"]
            assert v["train_examples"] is None  # under SecAgg+ only the sum travels
    for m in MARKETS:
        assert _evaluations(cluster, m, first) >= 2
        assert _private_round(root / "state" / m / "private.pt") >= 2  # heads on the node

    # --- the refused nodes gave up; the wrong-CA node never came online
    for proc in (rogue, wrong):
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            _fail_with_logs(cluster, f"refused SuperNode {proc.pid} still running")
        assert proc.returncode != 0
    assert "Failed to activate SuperNode" in cluster.log_tail("rogue")
    assert "CERTIFICATE_VERIFY_FAILED" in cluster.log_tail("wrongca")

    # --- restart the server side and resume
    snapshot = root / "encoder-round2.pt"
    shutil.copy(ckpt, snapshot)
    cluster.start_superlink()  # same database: node registrations survive; nodes reconnect
    try:
        second, status = cluster.run({**values, "resume": True}, 600)
    except DeployError as exc:
        _fail_with_logs(cluster, f"resumed run failed: {exc}")
    assert status == "finished:completed"
    final = load_encoder(ckpt)
    assert final.round == 4
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3, 4]
    # rounds 1-2 are the crashed run's records (carried over, not re-run) ...
    assert doc["rounds"][:2] == crashed.meta["rounds"]
    assert all(sorted(r["markets"]) == MARKETS for r in doc["rounds"])
    # ... and every node took part in exactly two rounds (3 and 4) of the resumed run
    for m in MARKETS:
        assert _evaluations(cluster, m, second) == 2, m
        assert _private_round(root / "state" / m / "private.pt") == 4
    # the encoder moved on from the round-2 checkpoint the restart loaded
    start = load_encoder(snapshot).state
    assert any(not torch.equal(start[k], final.state[k]) for k in start)
    status_by_id = {int(n["node-id"]): n["status"] for n in cluster.nodes()}
    assert set(status_by_id) == set(cluster.node_ids.values())  # the rogue key never got an id
    assert status_by_id[cluster.node_ids["wrongca"]] == "registered"  # never came online


def test_supernode_refuses_to_start_without_ca(tmp_path, capsys):
    from storefed.simulations.cli import main

    rc = main(["deploy", "supernode", "--superlink", "127.0.0.1:9", "--market", "de",
               "--state-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and "--ca" in err and "--insecure" in err
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_ca_key_can_be_encrypted_with_a_passphrase(tmp_path, capsys):
    from storefed.simulations.cli import main

    secret = tmp_path / "passphrase"
    secret.write_text("correct horse battery staple\n")
    out = tmp_path / "pki"
    assert main(["deploy", "certs", "--out", str(out), "--ca-passphrase-file", str(secret)]) == 0
    pem = (out / "ca.key").read_bytes()
    assert b"ENCRYPTED" in pem
    with pytest.raises(TypeError):
        load_pem_private_key(pem, None)
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    # reissuing the server certificate needs the passphrase, and then works
    capsys.readouterr()
    assert main(["deploy", "certs", "--out", str(out), "--host", "link.example.org"]) == 2
    assert "--ca-passphrase-file" in capsys.readouterr().err
    assert main(["deploy", "certs", "--out", str(out), "--host", "link.example.org",
                 "--ca-passphrase-file", str(secret)]) == 0
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "link.example.org" in san.get_values_for_type(x509.DNSName)
    assert (out / "ca.key").read_bytes() == pem  # the CA was reused, not replaced


def test_deploy_check_reports_expiry_ahead_of_time(tmp_path, capsys):
    import datetime as dt

    from storefed.simulations.cli import main
    from storefed.simulations.deploy import check_certificates

    ca_crt, ca_key = generate_ca(tmp_path)
    crt, _ = generate_server_cert(tmp_path, ca_crt, ca_key, days=10)
    rows = {r["file"]: r for r in check_certificates([ca_crt, crt], warn_days=30)}
    assert rows[str(ca_crt)]["status"] == "ok"
    assert rows[str(crt)]["status"] == "expires soon" and rows[str(crt)]["issuer"] == "ok"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=11)
    assert check_certificates([crt], now=later)[0]["status"] == "expired"
    assert main(["deploy", "check", "--days", "5", str(crt)]) == 0
    assert main(["deploy", "check", str(crt)]) == 1  # within the default 30 days
    assert "expires soon" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    other_ca, other_key = generate_ca(other)
    foreign, _ = generate_server_cert(other, other_ca, other_key)
    (other / "ca.crt").write_bytes(ca_crt.read_bytes())  # beside it: the wrong CA
    assert check_certificates([foreign])[0]["issuer"].startswith("not signed by")


@pytest.mark.slow
def test_a_supernode_refuses_an_expired_server_certificate(tmp_path):
    import datetime as dt

    from storefed.simulations.deploy import check_certificates

    c = LocalCluster(tmp_path)
    try:
        c.make_certs()
        c.start_superlink()
        key, _ = c.node_keys("late")  # registered while the certificate was valid
        c.stop("superlink", signal.SIGTERM)
        ca_crt, ca_key = c.certs / "ca.crt", c.certs / "ca.key"
        past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
        crt, _ = generate_server_cert(c.certs, ca_crt, ca_key, valid_from=past, days=1)
        assert check_certificates([crt])[0]["status"] == "expired"  # `deploy check` says so
        c.start_superlink()  # same database: the registration survives
        node = c.start_bare_supernode("late", key, ca_crt)
        try:
            node.wait(timeout=90)
        except subprocess.TimeoutExpired:
            _fail_with_logs(c, "a SuperNode kept talking to a SuperLink with an expired cert")
        assert node.returncode != 0
        log = c.log_tail("late")
        assert "CERTIFICATE_VERIFY_FAILED" in log and "expired" in log, log[-2000:]
    finally:
        c.close()
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"


@pytest.mark.slow
def test_a_revoked_region_is_shut_out_while_connected(tmp_path):
    from storefed.simulations.deploy import unregister_node
    from storefed.simulations.simulate import lab_policy

    c = LocalCluster(tmp_path, policy=write_policy(tmp_path / "policy", lab_policy(True, 2)))
    try:
        c.make_certs()
        c.start_superlink()
        c.start_nodes(MARKETS, tmp_path / "state", dataset="synthetic")
        end = time.monotonic() + 180
        while sum(n.get("status") == "online" for n in c.nodes()) < len(MARKETS):
            if time.monotonic() > end:
                _fail_with_logs(c, "the nodes never came online")
            time.sleep(1)
        unregister_node(c.node_ids["m2"], c.cli_env)  # what `deploy revoke` runs
        end = time.monotonic() + 60
        while "SuperNode terminated" not in c.log_tail("node-m2", 20000):
            if time.monotonic() > end:
                _fail_with_logs(c, "the revoked node is still connected")
            time.sleep(0.5)
        status = {int(n["node-id"]): n["status"] for n in c.nodes()}
        assert status[c.node_ids["m2"]] == "unregistered"
        assert [status[c.node_ids[m]] for m in ("m0", "m1")] == ["online", "online"]
        # the federation goes on without it
        _, final = c.run({**SMALL, "secagg": True, "markets": "m0,m1", "num-rounds": 1,
                          "out-dir": str(tmp_path / "out")}, 300)
        assert final == "finished:completed"
    finally:
        c.close()
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"
