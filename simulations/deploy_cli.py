"""``storefed deploy``: the command line over the deployment library (``simulations/deploy.py``),
the SuperLink's gateway (``simulations/gateway.py``) and the one-machine cluster
(``simulations/cluster.py``). The runbook is ``docs/deployment.md``.

``storefed deploy bench`` is the lab's (``simulations/experiments/deploy_bench.py``): the CLI's
registry routes it there; the parser here only lists it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from storefed.shared.config import RunConfig, parse_overrides
from storefed.shared.errors import ConfigError
from storefed.shared.identity import IDENTITY_FILE, TRUSTED_FILE, load_or_create, public_hex
from storefed.shared.policy import NODE_CONFIG_KEY, load_policy
from storefed.simulations.cluster import (
    LocalCluster,
    add_cluster_options,
    choose_markets,
    demo_policy,
)
from storefed.simulations.command import add_run_config_option
from storefed.simulations.deploy import (
    CONNECTION,
    DeployError,
    check_certificates,
    flower_env,
    generate_ca,
    generate_node_keys,
    generate_operator_cert,
    generate_server_cert,
    node_config_string,
    read_passphrase,
    register_node,
    rounds_written,
    submit_run,
    superlink_command,
    supernode_command,
    unregister_node,
    wait_run,
    write_connection,
)
from storefed.simulations.fab import app_sha256, installed_app_sha256, write_app
from storefed.simulations.simulate import print_summary


def run_supernode(args: argparse.Namespace) -> int:
    """Start ``flower-supernode --isolation process`` as a child and serve its ClientApp tasks
    in this process (torch and the market's data loaded once). Stops the child on exit."""
    if not args.ca and not args.insecure:
        raise ConfigError("deploy supernode needs --ca (the CA certificate that signed the "
                          "SuperLink's certificate): without it the node would talk to the "
                          "SuperLink unencrypted; pass --insecure to do that on purpose")
    if args.insecure:
        print("WARNING: --insecure: this node talks to the SuperLink WITHOUT TLS; its updates "
              "and its authentication are exposed to anyone on the network", file=sys.stderr,
              flush=True)
    from storefed.simulations.deploy_exec import WarmExecutor  # noqa: PLC0415 - imports flwr

    if args.threads > 0:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    import storefed.client.client_app  # noqa: F401, PLC0415 - warm the app (torch, storefed) up front
    from storefed.simulations.deploy_exec import plain_logs  # noqa: PLC0415

    plain_logs()

    for p in (args.ca, args.key):
        if p and not Path(p).is_file():
            raise DeployError(f"{p} does not exist")
    if not args.state_dir:
        raise ConfigError("--state-dir is required: the market's private heads live there")
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    policy = ""
    if args.policy:  # checked here, so a bad file stops the node before it connects
        policy = str(Path(args.policy).resolve())
    rules = load_policy({NODE_CONFIG_KEY: policy} if policy else {},
                        Path(args.state_dir) / args.market)
    print(f"this node runs app bundles: trusted-apps = {rules.trusted_apps!r} (installed = "
          f"sha256 {installed_app_sha256()}); run-config overrides: allowed-run-config = "
          f"{rules.allowed_run_config!r}", flush=True)
    nc = node_config_string(args.market, str(Path(args.data_dir).resolve()) if args.data_dir
                            else "", str(Path(args.state_dir).resolve()), args.device or "",
                            args.dataset or "", policy, args.ranker)
    cmd = supernode_command(args.superlink, None if args.insecure else args.ca, args.key, nc,
                            args.runtime_port, fleet_poll=args.fleet_poll)
    print("starting:", " ".join(cmd), flush=True)
    child = subprocess.Popen(cmd, env=flower_env(os.environ.get("FLWR_HOME")))
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    executor = WarmExecutor(f"127.0.0.1:{args.runtime_port}", poll_interval=args.poll)
    _wait_listening(args.runtime_port, child, stop)
    def _watch() -> None:
        child.wait()
        stop.set()

    watcher = threading.Thread(target=_watch, daemon=True)
    watcher.start()
    try:
        executor.serve(stop)
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    return int(child.returncode or 0) if child.returncode not in (None, -15) else 0


def _wait_listening(port: int, child: subprocess.Popen, stop: threading.Event) -> None:
    """Wait until the SuperNode's Runtime API accepts connections (so the executor's first
    request does not enter Flower's exponential retry back-off)."""
    import socket  # noqa: PLC0415

    while not stop.is_set() and child.poll() is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        stop.wait(0.1)


# --------------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("deploy", help="real Flower deployment: certificates, SuperLink, "
                                      "SuperNodes, runs",
                       description="Run storefed on a SuperLink and one SuperNode per region "
                                   "(TLS + SuperNode authentication).")
    dsub = p.add_subparsers(dest="deploy_command", required=True)

    c = dsub.add_parser("certs", help="CA + SuperLink TLS certificate")
    c.add_argument("--out", required=True, help="directory for ca.crt/ca.key/server.crt/server.key")
    c.add_argument("--host", action="append", default=[],
                   help="SuperLink host name or IP the nodes use (repeatable); localhost and "
                        "127.0.0.1 are always included")
    c.add_argument("--days", type=int, default=397, help="server certificate validity")
    c.add_argument("--ca-passphrase-file", default="", metavar="FILE",
                   help="encrypt a new ca.key with the passphrase in FILE (and read an existing "
                        "one with it); keep ca.key on this admin machine, never on the "
                        "SuperLink host")

    k = dsub.add_parser("keys", help="SuperNode authentication key pair(s)")
    k.add_argument("--out", required=True, help="directory for <name>.key and <name>.pub")
    k.add_argument("names", nargs="+", help="one key pair per name (e.g. the region/market)")

    oc = dsub.add_parser("operator-cert", help="an operator's TLS client certificate for the "
                                               "gateway's operator listener")
    oc.add_argument("name", help="the operator (file stem: <name>.crt / <name>.key)")
    oc.add_argument("--ca-dir", required=True, help="directory with ca.crt and ca.key")
    oc.add_argument("--out", required=True, help="where to write <name>.crt / <name>.key")
    oc.add_argument("--days", type=int, default=90, help="validity (default 90)")
    oc.add_argument("--ca-passphrase-file", default="", metavar="FILE",
                    help="file holding ca.key's passphrase")

    g = dsub.add_parser("gateway", help="the SuperLink's front door: Fleet API to the regions, "
                                        "Control API to operators with a client certificate "
                                        "(foreground)")
    g.add_argument("--certs", required=True, help="directory with ca.crt, server.crt, server.key")
    g.add_argument("--superlink", default="127.0.0.1:9092",
                   help="the SuperLink's loopback address (default 127.0.0.1:9092)")
    g.add_argument("--host", default="0.0.0.0", help="public bind address (default all)")
    g.add_argument("--port", type=int, default=9443, help="public port, Fleet only (9443)")
    g.add_argument("--operator-port", type=int, default=0,
                   help="operator port, Control only, client certificate required (0: none; "
                        "operators then use an SSH tunnel to the SuperLink's loopback port)")

    of = dsub.add_parser("operator-forward", help="on an operator's machine: a loopback port for "
                                                  "flwr that adds the operator's client "
                                                  "certificate (foreground)")
    of.add_argument("--gateway", required=True, help="the gateway's operator host:port")
    of.add_argument("--ca", required=True, help="ca.crt (verifies the gateway)")
    of.add_argument("--cert", required=True, help="<name>.crt from `deploy operator-cert`")
    of.add_argument("--key", required=True, help="<name>.key from `deploy operator-cert`")
    of.add_argument("--port", type=int, default=9093, help="loopback port flwr dials (9093)")

    rv = dsub.add_parser("revoke", help="shut a region out: remove its SuperNode's registration "
                                        "(its connected node is disconnected too)")
    rv.add_argument("node_id", type=int, help="the node id `deploy register` printed")
    rv.add_argument("--connection", default=CONNECTION)

    ck = dsub.add_parser("check", help="certificate expiry, ahead of time (exit 1 when one is "
                                       "expired, not yet valid or expires within --days)")
    ck.add_argument("certificates", nargs="+", help="ca.crt, server.crt, ...")
    ck.add_argument("--days", type=int, default=30, help="warn this many days ahead")

    i = dsub.add_parser("identity", help="a market's SecAgg+ identity key (created if absent): "
                                         "prints its trusted-markets.toml line")
    i.add_argument("--state-dir", required=True, help="the region's state directory")
    i.add_argument("--market", required=True, help="the market the region serves")

    ah = dsub.add_parser("app-hash", help="SHA-256 of the app bundle this storefed submits "
                                          "(what a region's trusted-apps may pin)")
    ah.add_argument("--app", default="", metavar="DIR",
                    help="an app directory to hash instead (default: the installed storefed's)")

    s = dsub.add_parser("superlink", help="start flower-superlink with TLS + node auth "
                                          "(foreground)")
    s.add_argument("--certs", required=True, help="directory written by `deploy certs`")
    s.add_argument("--host", default="127.0.0.1",
                   help="bind address (default 127.0.0.1: the Control API stays on this host; "
                        "the regions come in through `deploy gateway`)")
    s.add_argument("--port", type=int, default=9092, help="the one HTTPS port (default 9092)")
    s.add_argument("--database", default="",
                   help="SQLite file for registrations/runs (survives restarts); default "
                        "<certs>/superlink.db")

    cn = dsub.add_parser("connect", help="save the SuperLink address for flwr (config.toml)")
    cn.add_argument("--address", required=True, help="SuperLink host:port")
    cn.add_argument("--ca", help="CA certificate that signed the SuperLink's certificate")
    cn.add_argument("--name", default=CONNECTION, help="connection name (default storefed)")

    r = dsub.add_parser("register", help="register a region's SuperNode public key")
    r.add_argument("public_key", help="<name>.pub written by `deploy keys`")
    r.add_argument("--name", default=None, help="a label for the node (e.g. the market)")
    r.add_argument("--connection", default=CONNECTION)

    n = dsub.add_parser("supernode", help="start a region's SuperNode + warm ClientApp "
                                          "executor (foreground)")
    n.add_argument("--superlink", required=True, help="SuperLink host:port")
    n.add_argument("--ca", help="CA certificate to verify the SuperLink (ca.crt)")
    n.add_argument("--key", help="this node's private key (<name>.key)")
    n.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    n.add_argument("--market", required=True, help="the market this node serves")
    n.add_argument("--dataset", default="", help="dataset name (default: the run's)")
    n.add_argument("--data-dir", default="", help="where this region's data lives")
    n.add_argument("--state-dir", required=True, help="private state (heads) directory")
    n.add_argument("--policy", default="", metavar="FILE",
                   help="this market's privacy policy (TOML; default: <state-dir>/<market>/"
                        "policy.toml, else the private defaults; see docs/privacy.md)")
    n.add_argument("--device", choices=("auto", "cpu", "cuda"), default="",
                   help="where this node trains (default: the run's)")
    n.add_argument("--ranker", action="store_true",
                   help="after every evaluation, fit the market's private ranker to the "
                        "round's model and keep it for the market's service where it beats "
                        "the model on valid (docs/serving.md)")
    n.add_argument("--runtime-port", type=int, default=9094,
                   help="local port of the SuperNode's Runtime API (one per node per host)")
    n.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    n.add_argument("--poll", type=float, default=0.2,
                   help="how often the executor asks the local SuperNode for a task (s)")
    n.add_argument("--fleet-poll", type=float, default=0.5,
                   help="how often an idle SuperNode asks the SuperLink for messages (s); "
                        "Flower's own loop uses 3 (pass 3 to run plain flower-supernode)")

    u = dsub.add_parser("run", help="submit a federated run and wait for it")
    u.add_argument("--connection", default=CONNECTION)
    u.add_argument("--markets", required=True,
                   help="comma-separated markets; the server waits for this many nodes")
    u.add_argument("--out", required=True,
                   help="server output directory, a path on the SuperLink host")
    u.add_argument("--rounds", type=int, default=None)
    u.add_argument("--resume", action="store_true", help="continue from OUT/encoder.pt")
    u.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=None,
                   help="aggregate with SecAgg+ (default: on); --no-secagg: plain FedAvg")
    add_run_config_option(u)
    u.add_argument("--timeout", type=float, default=24 * 3600.0)
    u.add_argument("--no-wait", action="store_true", help="print the run id and return")

    d = dsub.add_parser("demo", help="everything on 127.0.0.1: SuperLink + one SuperNode per "
                                     "market over TLS with node auth; prints per-market metrics")
    add_cluster_options(d)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=None,
                   help="aggregate with SecAgg+ (default: on); --no-secagg: plain FedAvg")
    d.add_argument("--keep", action="store_true", help="keep the work directory")
    dsub.add_parser("bench", help="(lab) seconds per round: deployment vs simulation on the "
                                  "same work; `storefed deploy bench --help` for its options")
    return "deploy", _run


def _run(args: argparse.Namespace) -> int:
    cmd = args.deploy_command
    if cmd == "certs":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ca_crt, ca_key = (out / "ca.crt", out / "ca.key")
        secret = read_passphrase(args.ca_passphrase_file)
        if not (ca_crt.is_file() and ca_key.is_file()):
            ca_crt, ca_key = generate_ca(out, passphrase=secret)
            print(f"wrote {ca_crt} and {ca_key} ({'encrypted, ' if secret else ''}"
                  f"keep ca.key offline)")
        crt, key = generate_server_cert(out, ca_crt, ca_key, args.host, days=args.days,
                                        ca_passphrase=secret)
        print(f"wrote {crt} and {key} for: localhost, 127.0.0.1"
              + "".join(f", {h}" for h in args.host))
        return 0
    if cmd == "keys":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in args.names:
            priv, pub = generate_node_keys(out, name)
            print(f"wrote {priv} (copy to the node only) and {pub} (register on the SuperLink)")
        return 0
    if cmd == "identity":
        market_dir = Path(args.state_dir) / args.market
        public = public_hex(load_or_create(market_dir))
        print(f"# {market_dir / IDENTITY_FILE}: add this line to the other regions' "
              f"{TRUSTED_FILE}")
        print(f'"{args.market}" = "{public}"')
        return 0
    if cmd == "operator-cert":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        crt, key = generate_operator_cert(args.out, Path(args.ca_dir) / "ca.crt",
                                          Path(args.ca_dir) / "ca.key", args.name, args.days,
                                          read_passphrase(args.ca_passphrase_file))
        print(f"wrote {crt} and {key} (the operator's only; `deploy operator-forward` uses them)")
        return 0
    if cmd in ("gateway", "operator-forward"):
        return _front_door(args)
    if cmd == "app-hash":
        print(app_sha256(args.app) if args.app else installed_app_sha256())
        return 0
    if cmd == "superlink":
        db = args.database or str(Path(args.certs) / "superlink.db")
        full = superlink_command(args.certs, args.host, args.port, db)
        if args.host not in ("127.0.0.1", "::1", "localhost"):
            print(f"WARNING: --host {args.host}: the Control API (submit runs, register nodes) "
                  f"is reachable by anyone who reaches this port, and open-source Flower "
                  f"checks no operator; bind 127.0.0.1 and run `storefed deploy gateway`",
                  file=sys.stderr, flush=True)
        print("exec:", " ".join(full), flush=True)
        os.execve(full[0], full, flower_env(os.environ.get("FLWR_HOME")))
    if cmd == "connect":
        home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
        path = write_connection(home, args.address, args.ca, args.name)
        print(f"wrote connection '{args.name}' -> {args.address} in {path}")
        return 0
    if cmd == "revoke":
        unregister_node(args.node_id, flower_env(os.environ.get("FLWR_HOME")), args.connection)
        print(f"revoked node {args.node_id}: the SuperLink no longer accepts its key")
        return 0
    if cmd == "check":
        rows = check_certificates(args.certificates, args.days)
        for r in rows:
            issuer = f", issuer {r['issuer']}" if "issuer" in r else ""
            print(f"{r['file']}: {r['status']} ({r['days_left']:g} days left, until "
                  f"{r['not_after']}; {r['subject']}{issuer})")
        bad = [r for r in rows if r["status"] != "ok" or r.get("issuer", "ok") != "ok"]
        return 1 if bad else 0
    if cmd == "register":
        node_id = register_node(args.public_key, flower_env(os.environ.get("FLWR_HOME")),
                                args.connection, args.name)
        print(f"registered {args.public_key} as node {node_id}")
        return 0
    if cmd == "supernode":
        return run_supernode(args)
    if cmd == "run":
        return _submit(args)
    if cmd == "demo":
        return _demo(args)
    raise ConfigError(f"unknown deploy command {cmd}")


def _front_door(args: argparse.Namespace) -> int:
    from storefed.simulations.gateway import (  # noqa: PLC0415 - uvicorn/starlette only here
        gateway_listeners,
        operator_forward_listener,
        serve,
    )

    if args.deploy_command == "gateway":
        certs = Path(args.certs)
        for f in ("ca.crt", "server.crt", "server.key"):
            if not (certs / f).is_file():
                raise DeployError(f"{certs / f} does not exist (see `storefed deploy certs`)")
        listeners = gateway_listeners(certs, args.superlink, (args.host, args.port),
                                      (args.host, args.operator_port) if args.operator_port
                                      else None)
        print(f"gateway: https://{args.host}:{args.port} -> Fleet API of {args.superlink}"
              + (f"; https://{args.host}:{args.operator_port} (client certificate) -> Control "
                 f"API" if args.operator_port else "; Control API: SSH tunnel only"), flush=True)
    else:
        for p in (args.ca, args.cert, args.key):
            if not Path(p).is_file():
                raise DeployError(f"{p} does not exist")
        listeners = [operator_forward_listener(args.gateway, Path(args.ca), Path(args.cert),
                                               Path(args.key), ("127.0.0.1", args.port))]
        print(f"operator-forward: http://127.0.0.1:{args.port} -> https://{args.gateway} "
              f"(Control API, as {Path(args.cert).stem}); point flwr at it with `storefed "
              f"deploy connect --address 127.0.0.1:{args.port}` (no --ca: plain HTTP on "
              f"loopback)", flush=True)
    serve(listeners)
    return 0


def _submit(args: argparse.Namespace) -> int:
    if not Path(args.out).is_absolute():
        raise ConfigError(f"--out {args.out!r} must be an absolute path: the ServerApp writes "
                          f"it on the SuperLink host, relative to nothing you control")
    values = parse_overrides(args.config)
    values["markets"] = args.markets
    values["out-dir"] = args.out
    if args.rounds is not None:
        values["num-rounds"] = args.rounds
    if args.resume:
        values["resume"] = True
    if args.secagg is not None:
        values["secagg"] = args.secagg
    env = flower_env(os.environ.get("FLWR_HOME"))
    app = write_app(Path(os.environ.get("TMPDIR", "/tmp")) / f"storefed-app-{os.getpid()}")
    try:
        print(f"app bundle sha256 {app_sha256(app)} (the regions' trusted-apps must hold it)",
              flush=True)
        run_id = submit_run(app, values, env, args.connection)
    finally:
        shutil.rmtree(app, ignore_errors=True)
    print(f"submitted run {run_id}", flush=True)
    if args.no_wait:
        return 0
    rounds = int(values.get("num-rounds", RunConfig().num_rounds))
    status = wait_run(run_id, env, args.timeout, args.connection,
                      done_hint=lambda: rounds_written(args.out) >= rounds)
    print(f"run {run_id}: {status}")
    metrics = Path(args.out) / "metrics.json"
    if metrics.is_file():
        print_summary(json.loads(metrics.read_text()))
    return 0 if status.endswith("completed") else 1


def _demo(args: argparse.Namespace) -> int:
    markets = choose_markets(args.dataset, args.data_dir, args.markets)
    work = Path(args.work or tempfile.mkdtemp(prefix="storefed-deploy-"))
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else ""
    values: dict[str, Any] = {"dataset": args.dataset, "data-dir": data_dir,
                              "markets": ",".join(markets), "num-rounds": args.rounds,
                              "out-dir": str(work / "out"), **parse_overrides(args.config)}
    if args.secagg is not None:
        values["secagg"] = args.secagg
    t0 = time.perf_counter()
    with LocalCluster(work) as cluster:
        try:
            cluster.make_certs()
            sl = cluster.start_superlink()
            print(f"SuperLink pid {sl.pid} on https://{cluster.address} (TLS, node auth)")
            policy = demo_policy(work, bool(values.get("secagg", True)), len(markets))
            for m in markets:
                key, _ = cluster.node_keys(m)
                p = cluster.start_node(m, key, work / "state" / m, data_dir, args.dataset,
                                       policy=policy)
                print(f"SuperNode {m}: pid {p.pid}, key {key.name} registered")
            run_id, status = cluster.run(values, args.timeout)
        except BaseException:
            for name in cluster.procs:
                print(f"--- {name} log tail ---\n{cluster.log_tail(name, 1500)}",
                      file=sys.stderr)
            raise
        print(f"run {run_id}: {status} in {time.perf_counter() - t0:.1f}s")
    print("stopped: " + ", ".join(f"{n} (pid {p.pid})" for n, p in cluster.procs.items()))
    doc = json.loads((work / "out" / "metrics.json").read_text())
    print_summary(doc)
    for r in doc["rounds"]:
        print(f"round {r['round']}: {r['seconds']:.1f}s")
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory: {work}")
    return 0 if status.endswith("completed") else 1
