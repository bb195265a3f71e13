"""A whole deployment on one machine: a TLS + node-auth SuperLink and one SuperNode (plus its
warm ClientApp executor) per market on 127.0.0.1, each a separate process started by PID and
stopped by PID. Used by ``storefed deploy demo``, the lab's ``storefed deploy bench`` and the
tests.

Each process gets its own ``FLWR_HOME`` (as it would on its own host) and a log file under
``<root>/logs``. Ports are free ports picked at start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from storefed.shared.data import available_markets
from storefed.shared.errors import ConfigError
from storefed.shared.policy import write_policy
from storefed.simulations.command import add_run_config_option
from storefed.simulations.deploy import (
    CONNECTION,
    DeployError,
    flower_env,
    flwr_cli,
    generate_ca,
    generate_node_keys,
    generate_server_cert,
    json_tail,
    node_config_string,
    register_node,
    rounds_written,
    stop_process,
    submit_run,
    superlink_command,
    supernode_command,
    wait_run,
    write_connection,
)
from storefed.simulations.fab import write_app
from storefed.simulations.simulate import lab_policy

Proc = subprocess.Popen


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: Proc, timeout: float = 60.0) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise DeployError(f"process {proc.pid} exited with {proc.returncode} before "
                              f"listening on port {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def _stat(pid: int | str) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (state, ppid, ...); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the live children, grandchildren, ... of ``pid`` (Linux /proc;
    empty elsewhere). The start time tells a process from a later one that reuses its pid."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return []
    table = {int(e.name): f for e in proc_dir.iterdir()
             if e.name.isdigit() and len(f := _stat(e.name)) > 19}
    found: list[tuple[int, str]] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, f in table.items() if int(f[1]) == parent]
        found += [(k, table[k][19]) for k in kids]
        frontier += kids
    return found


def stop_pid(pid: int, start: str, grace: float = 5.0) -> None:
    """SIGTERM ``pid`` if it is still the process that started at ``start``, SIGKILL after
    ``grace`` s; zombies count as gone (their parent reaps them)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        f = _stat(pid)
        if len(f) <= 19 or f[19] != start or f[0] == "Z":
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        end = time.monotonic() + grace
        while time.monotonic() < end:
            f = _stat(pid)
            if len(f) <= 19 or f[19] != start or f[0] == "Z":
                return
            time.sleep(0.1)


class LocalCluster:
    """SuperLink + SuperNodes on loopback. Use as a context manager: every process it started
    is stopped (SIGTERM, then SIGKILL, by PID / its own process group) on exit, even on errors.
    """

    def __init__(self, root: str | Path, policy: Path | None = None) -> None:
        """``policy``: the privacy-policy file every node started here holds unless its
        start names another (None: the markets' own defaults)."""
        self.root = Path(root).resolve()
        self.policy = policy
        self.certs = self.root / "certs"
        self.keys = self.root / "keys"
        self.logs = self.root / "logs"
        self.cli_home = self.root / "flwr-cli"
        for d in (self.certs, self.keys, self.logs, self.cli_home):
            d.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, Proc] = {}
        self.node_ids: dict[str, int] = {}  # registered key name -> SuperLink node id
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.cli_env = flower_env(self.cli_home)
        self.app_dir = write_app(self.root / "app")

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every started process: SIGTERM to all first (they shut down in parallel), then
        each is waited for and SIGKILLed (with its group) if it lingers. Processes they started
        in sessions of their own (the SuperLink's SuperExec and ServerApp) are found first and
        stopped by PID afterwards, if they outlived their parent."""
        spawned = [d for p in self.procs.values() if p.poll() is None for d in descendants(p.pid)]
        for pid, _ in spawned:  # a stopped (SIGSTOP) process must be able to act on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for name in reversed(list(self.procs)):
            self.stop(name)
        for pid, start in spawned:
            stop_pid(pid, start)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        if sig == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        stop_process(proc)

    def _spawn(self, name: str, cmd: list[str], home: Path) -> Proc:
        if name in self.procs and self.procs[name].poll() is None:
            raise DeployError(f"{name} is already running (pid {self.procs[name].pid})")
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(cmd, env=flower_env(home), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=self.root)
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by each started process and the live
        members of its process group (Linux /proc; empty elsewhere)."""
        proc_dir = Path("/proc")
        if not proc_dir.is_dir():
            return {}
        tick = os.sysconf("SC_CLK_TCK")
        by_group: dict[int, float] = {}
        for entry in proc_dir.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pgid, used = int(fields[2]), int(fields[11]) + int(fields[12])
            by_group[pgid] = by_group.get(pgid, 0.0) + used / tick
        return {name: round(by_group.get(p.pid, 0.0), 2) for name, p in self.procs.items()}

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    # ------------------------------------------------------------------ pieces
    def make_certs(self, hosts: tuple[str, ...] = ()) -> None:
        ca_crt, ca_key = generate_ca(self.certs)
        generate_server_cert(self.certs, ca_crt, ca_key, hosts)
        write_connection(self.cli_home, self.address, self.certs / "ca.crt")

    def start_superlink(self) -> Proc:
        """TLS + SuperNode auth; registrations/runs in ``<root>/superlink.db`` so a restarted
        SuperLink keeps them. Returns once the port accepts connections."""
        cmd = superlink_command(self.certs, "127.0.0.1", self.port, self.root / "superlink.db",
                                plain_logs=True)
        proc = self._spawn("superlink", cmd, self.root / "home-superlink")
        wait_port(self.port, proc)
        return proc

    def node_keys(self, name: str, register: bool = True) -> tuple[Path, Path]:
        priv, pub = generate_node_keys(self.keys, name)
        if register:
            self.node_ids[name] = register_node(pub, self.cli_env, name=name)
        return priv, pub

    def start_node(self, market: str, key: Path, state_dir: Path, data_dir: str = "",
                   dataset: str = "", device: str = "cpu", threads: int = 1,
                   fleet_poll: float = 0.5, policy: Path | None = None) -> Proc:
        """``storefed deploy supernode`` for one market (SuperNode + warm executor);
        ``policy``: the market's privacy-policy file (default: the private defaults)."""
        cmd = [sys.executable, "-m", "storefed.simulations.cli", "deploy", "supernode",
               "--superlink", self.address, "--ca", str(self.certs / "ca.crt"),
               "--key", str(key), "--market", market, "--state-dir", str(state_dir),
               "--runtime-port", str(free_port()), "--threads", str(threads),
               "--fleet-poll", str(fleet_poll)]
        policy = policy or self.policy
        if policy is not None:
            cmd += ["--policy", str(policy)]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        if dataset:
            cmd += ["--dataset", dataset]
        if device:
            cmd += ["--device", device]
        return self._spawn(f"node-{market}", cmd, self.root / f"home-{market}")

    def start_nodes(self, markets: Sequence[str], state_dir: Path, data_dir: str = "",
                    dataset: str = "", flower: bool = False) -> dict[str, Path]:
        """Register a key for each market and start its node (``start_node``, or Flower's
        default layout with ``flower``); returns each market's private key."""
        keys = {}
        for m in markets:
            keys[m], _ = self.node_keys(m)
            start = self.start_flower_node if flower else self.start_node
            start(m, keys[m], state_dir, data_dir, dataset)
        return keys

    def start_flower_node(self, market: str, key: Path, state_dir: Path, data_dir: str = "",
                          dataset: str = "", device: str = "cpu",
                          policy: Path | None = None) -> Proc:
        """Flower's default layout, for comparison: plain ``flower-supernode --isolation
        subprocess`` (a fresh ``flwr-clientapp`` process per message, 3 s Fleet poll)."""
        policy = policy or self.policy
        nc = node_config_string(market, data_dir, str(state_dir), device, dataset,
                                str(policy.resolve()) if policy else "")
        cmd = supernode_command(self.address, self.certs / "ca.crt", key, nc, free_port(),
                                isolation="subprocess")
        return self._spawn(f"node-{market}", cmd, self.root / f"home-{market}")

    def start_bare_supernode(self, name: str, key: Path | None, ca: Path | None,
                             max_wait: float = 20.0) -> Proc:
        """A plain ``flower-supernode`` (no executor) that gives up after ``max_wait`` s: for
        checking that the SuperLink refuses it."""
        cmd = supernode_command(self.address, ca, key, node_config_string(name), free_port())
        i = cmd.index("--max-wait-time")
        cmd[i + 1] = str(max_wait)
        cmd += ["--max-retries", "3"]
        return self._spawn(name, cmd, self.root / f"home-{name}")

    def nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode list`` as JSON (node-id, status: registered/online/offline...)."""
        doc = json_tail(flwr_cli(["supernode", "list", CONNECTION, "--format", "json"],
                               self.cli_env).stdout)
        return list(doc.get("nodes", []))

    def run(self, values: dict[str, Any], timeout: float) -> tuple[int, str]:
        """Submit a run and wait for it; (run id, final status)."""
        run_id = submit_run(self.app_dir, values, self.cli_env)
        alive = [p for n, p in self.procs.items() if n == "superlink"]
        out, rounds = values.get("out-dir", ""), int(values.get("num-rounds", 1))
        return run_id, wait_run(run_id, self.cli_env, timeout, poll=30.0, alive=alive,
                                done_hint=lambda: bool(out) and rounds_written(out) >= rounds)


# --------------------------------------------------------------------------- options
def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """Options of a command that runs a local cluster (``deploy demo``, ``deploy bench``)."""
    p.add_argument("--dataset", default="synthetic",
                   help="dataset (synthetic: the built-in storefronts, no files)")
    p.add_argument("--data-dir", default=os.environ.get("STOREFED_DATA_DIR", ""),
                   help="dataset directory (default: $STOREFED_DATA_DIR; required for any "
                        "dataset but synthetic)")
    p.add_argument("--markets", default="", help="comma-separated markets (default: all)")
    p.add_argument("--work", default="", help="work directory (default: a temp dir)")
    add_run_config_option(p)
    p.add_argument("--timeout", type=float, default=3600.0)


def choose_markets(dataset: str, data_dir: str, wanted: str) -> list[str]:
    """``wanted`` (comma-separated; empty: every market of the dataset), checked."""
    found = available_markets(dataset, data_dir or None)
    markets = [m.strip() for m in wanted.split(",") if m.strip()] or found
    unknown = [m for m in markets if m not in found]
    if unknown:
        raise ConfigError(f"unknown market(s) {', '.join(unknown)}; known: {', '.join(found)}")
    return markets


def demo_policy(work: Path, secagg: bool, n_markets: int) -> Path:
    """The privacy policy of the regions of a cluster on one host (one person runs every
    region): the private defaults, except plain FedAvg when the run is ``--no-secagg`` and a
    smaller minimum sum when there are fewer than three markets."""
    return write_policy(work / "demo-policy", lab_policy(secagg, n_markets))
