"""``storefed bench-serve``: load on one market's recommendation service (``storefed serve``).

Starts the service on 127.0.0.1 (or uses ``--url``), then an open-loop load generator in this
process: for each fixed rate, requests ``GET /v1/recommend?user=U&k=K`` (U cycling over the
market's users) are *scheduled* at even intervals for ``--duration`` seconds over a pool of
keep-alive connections, whether or not earlier ones have answered. Latency is measured from
the scheduled time to the last byte of the response, so a service that falls behind shows it in
its latency (no coordinated omission). Per rate: achieved throughput, p50/p95/p99/max latency,
errors, and the CPU share the service and the generator used. A rate is *sustained* when every
request answered 200, the achieved rate is at least 97 % of the target and the run drained
within one second of its last scheduled request. Reported: the maximum sustained rate, and the
maximum sustained rate whose p99 stays within ``--slo-ms``. Results go to ``--out`` (JSON).

Both run on the same machine: on a 2-core machine the generator takes one core and the
service the other, so the figures are bounded by a single core on each side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from storefed.shared.data import DATASETS
from storefed.shared.errors import ConfigError, StorefedError

log = logging.getLogger("storefed")


class ServiceError(StorefedError):
    """The service process exited or never became ready."""


def _free_port() -> int:
    from storefed.simulations.cluster import free_port  # noqa: PLC0415

    return free_port()


class ServiceProcess:
    """``storefed serve`` in a process of its own (own process group), stopped by PID (SIGTERM,
    then SIGKILL) by ``stop`` or on leaving the ``with`` block."""

    def __init__(self, state_dir: str | Path, market: str, dataset: str | None = None,
                 data_dir: str | None = None, port: int | None = None,
                 extra: list[str] | None = None, log_path: str | Path | None = None) -> None:
        self.port = port or _free_port()
        self.cmd = [sys.executable, "-m", "storefed.simulations.cli", "serve", "--state-dir",
                    str(state_dir), "--market", market, "--port", str(self.port)]
        if dataset:
            self.cmd += ["--dataset", dataset]
        if data_dir is not None:
            self.cmd += ["--data-dir", data_dir]
        self.cmd += list(extra or [])
        self.log_path = Path(log_path) if log_path else Path(state_dir) / f"serve-{market}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.scheme = "https" if "--tls-cert" in self.cmd else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> ServiceProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=env, cwd=Path(__file__).resolve().parent.parent)
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() \
            else ""

    def wait_listening(self, timeout: float = 120.0) -> None:
        from storefed.simulations.cluster import wait_port  # noqa: PLC0415
        from storefed.simulations.deploy import DeployError  # noqa: PLC0415

        assert self.proc is not None, "start() first"
        try:
            wait_port(self.port, self.proc, timeout)
        except DeployError as exc:
            raise ServiceError(f"{exc}\n{self.log_tail()}") from exc

    def wait_ready(self, timeout: float = 300.0) -> dict[str, Any]:
        """Wait for ``/healthz`` to answer 200 (a model loaded); returns its JSON (http only)."""
        assert self.proc is not None, "start() first"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise ServiceError(f"storefed serve exited with {self.proc.returncode}\n"
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as r:
                    return dict(json.loads(r.read()))
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise ServiceError(f"the service never became ready in {timeout:.0f}s\n"
                           f"{self.log_tail()}")

    def stop(self) -> int | None:
        """Stop the process (by PID and its group); returns its exit code."""
        from storefed.simulations.deploy import stop_process  # noqa: PLC0415

        if self.proc is None:
            return None
        stop_process(self.proc)
        return self.proc.returncode


# --------------------------------------------------------------------------- load generator
def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[i]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for ln in lines[1:]:
        if ln[:15].lower() == b"content-length:":
            length = int(ln[15:].strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


async def run_rate(host: str, port: int, paths: list[str], rate: float, duration: float,
                   connections: int, timeout: float = 10.0) -> dict[str, Any]:
    """Open-loop load at ``rate`` requests/s for ``duration`` s; latencies from schedule."""
    n = max(1, int(rate * duration))
    reqs = [f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode() for p in paths]
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    latency: list[float] = []
    service: list[float] = []
    errors: dict[str, int] = {}
    last_done = [0.0]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (job := await queue.get()) is not None:
                i, scheduled = job
                sent = time.perf_counter()
                try:
                    writer.write(reqs[i % len(reqs)])
                    status, body = await asyncio.wait_for(_read_response(reader), timeout)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    with contextlib.suppress(Exception):
                        writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                done = time.perf_counter()
                last_done[0] = max(last_done[0], done)
                if status != 200 or b'"items"' not in body:
                    errors[f"http {status}"] = errors.get(f"http {status}", 0) + 1
                    continue
                latency.append(done - scheduled)
                service.append(done - sent)
        finally:
            writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # connections open before the clock starts
    t0 = time.perf_counter()
    sent = 0
    while sent < n:
        due = min(n, int((time.perf_counter() - t0) * rate) + 1)
        while sent < due:
            queue.put_nowait((sent, t0 + sent / rate))
            sent += 1
        next_at = t0 + sent / rate
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), timeout + duration)
    last_scheduled = t0 + (n - 1) / rate
    lat = sorted(latency)
    svc = sorted(service)
    elapsed = max(last_done[0], last_scheduled) - t0
    ok = len(latency)
    achieved = ok / elapsed if elapsed > 0 else 0.0
    drained = last_done[0] - last_scheduled <= 1.0
    return {
        "target_rps": rate, "requests": n, "ok": ok, "errors": errors,
        "achieved_rps": round(achieved, 1),
        "p50_ms": round(_percentile(lat, 50) * 1e3, 2),
        "p95_ms": round(_percentile(lat, 95) * 1e3, 2),
        "p99_ms": round(_percentile(lat, 99) * 1e3, 2),
        "max_ms": round(lat[-1] * 1e3, 2) if lat else None,
        "service_p50_ms": round(_percentile(svc, 50) * 1e3, 2),
        "service_p99_ms": round(_percentile(svc, 99) * 1e3, 2),
        "sustained": bool(not errors and ok == n and achieved >= 0.97 * rate and drained),
    }


def benchmark(url: str, rates: list[float], duration: float, connections: int, k: int,
              slo_ms: float, server_pid: int | None = None, users: int = 1000) -> dict[str, Any]:
    """Every rate in turn (stops after two rates in a row are not sustained)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ConfigError(f"--url {url}: give http://HOST:PORT (the generator speaks plain "
                          f"HTTP/1.1)")
    with urllib.request.urlopen(f"{url}/v1/users?limit={users}", timeout=10) as r:
        ids = json.loads(r.read())["users"]
    with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
        health = json.loads(r.read())
    paths = [f"/v1/recommend?user={quote(u)}&k={k}" for u in ids]
    runner: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]] = asyncio.run
    with contextlib.suppress(ImportError):  # uvloop: a dependency on Linux
        import uvloop  # noqa: PLC0415

        runner = uvloop.run
    host, port = parts.hostname, parts.port
    runner(run_rate(host, port, paths, min(rates), 2.0, connections))  # warm-up, not kept
    rows = []
    misses = 0
    for rate in rates:
        s0 = _cpu_seconds(server_pid) if server_pid else 0.0
        g0, w0 = time.process_time(), time.perf_counter()
        row = runner(run_rate(host, port, paths, rate, duration, connections))
        wall = time.perf_counter() - w0
        row["server_cpu"] = (round((_cpu_seconds(server_pid) - s0) / wall, 2)
                             if server_pid else None)
        row["generator_cpu"] = round((time.process_time() - g0) / wall, 2)
        rows.append(row)
        print(f"{rate:>7.0f}/s  achieved {row['achieved_rps']:>7.1f}/s  p50 {row['p50_ms']:>7.2f}"
              f"  p95 {row['p95_ms']:>7.2f}  p99 {row['p99_ms']:>8.2f} ms  errors "
              f"{sum(row['errors'].values()):>4}  cpu server {row['server_cpu']} generator "
              f"{row['generator_cpu']}  {'sustained' if row['sustained'] else 'NOT sustained'}",
              flush=True)
        misses = 0 if row["sustained"] else misses + 1
        if misses >= 2:
            break
    sustained = [r["target_rps"] for r in rows if r["sustained"]]
    within = [r["target_rps"] for r in rows if r["sustained"] and r["p99_ms"] <= slo_ms]
    return {"url": url, "model": health.get("model"), "market": health.get("market"), "k": k,
            "duration_s": duration, "connections": connections, "users": len(ids),
            "slo_p99_ms": slo_ms, "cpus": os.cpu_count(), "rates": rows,
            "max_sustained_rps": max(sustained) if sustained else 0,
            "max_rps_within_slo": max(within) if within else 0}


def prepare_serving(state_dir: Path, market: str, dataset: str, data_dir: str | None,
                    rounds: int = 1) -> Path:
    """A serving file for ``market`` from ``rounds`` local training rounds of one node (no
    federation: what the load costs does not depend on how well the model was trained)."""
    from storefed.shared.config import RunConfig  # noqa: PLC0415
    from storefed.shared.model import encoder_state  # noqa: PLC0415
    from storefed.shared.node import MarketNode, initial_encoder  # noqa: PLC0415
    from storefed.shared.serving_state import write_node_serving  # noqa: PLC0415

    cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), "dataset": dataset,
                                  "data-dir": data_dir or ""}, source="bench-serve")
    node = MarketNode(cfg, market, state_dir)
    enc = initial_encoder(cfg, node.catalog)
    for rnd in range(1, rounds + 1):
        node.train_round(enc, rnd)
        enc = encoder_state(node.model)
        node.evaluate(enc, "test")
    path = write_node_serving(node, rounds)
    assert path is not None
    return path


def register(sub: argparse._SubParsersAction) -> tuple[str, Any]:
    p = sub.add_parser("bench-serve", help="load benchmark of a market's recommendation service",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--state-dir", help="the node's state directory (starts `storefed serve`)")
    p.add_argument("--market", help="the market served")
    p.add_argument("--dataset", choices=DATASETS, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--url", default="", help="benchmark a service already running here instead")
    p.add_argument("--prepare", action="store_true",
                   help="write STATE_DIR/MARKET/serving.pt from one local training round when "
                        "it is missing")
    p.add_argument("--rates", default="250,500,1000,1500,2000,2500,3000",
                   help="requests/s, comma-separated, in the order run")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--slo-ms", type=float, default=20.0, help="p99 latency objective (ms)")
    p.add_argument("--out", default="runs/bench-serve/bench-serve.json")
    return "bench-serve", run


def run(args: argparse.Namespace) -> int:
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--rates {args.rates!r}: numbers separated by commas") from None
    if not rates or min(rates) <= 0 or args.duration <= 0 or args.connections < 1:
        raise ConfigError("--rates, --duration and --connections must be positive")
    if args.url:
        result = benchmark(args.url.rstrip("/"), rates, args.duration, args.connections,
                           args.k, args.slo_ms)
    else:
        if not args.state_dir or not args.market:
            raise ConfigError("give --state-dir and --market (or --url)")
        state = Path(args.state_dir).resolve()
        if args.prepare and not (state / args.market / "serving.pt").is_file():
            print(f"preparing {state / args.market / 'serving.pt'} (one local round)...")
            prepare_serving(state, args.market, args.dataset or "synthetic", args.data_dir)
        with ServiceProcess(state, args.market, args.dataset, args.data_dir) as svc:
            svc.start()
            svc.wait_ready()
            assert svc.proc is not None
            result = benchmark(svc.url, rates, args.duration, args.connections, args.k,
                               args.slo_ms, server_pid=svc.proc.pid)
            result["service_command"] = " ".join(svc.cmd[2:])
    from storefed.shared.checkpoint import atomic_write_bytes  # noqa: PLC0415 - torch: only here

    out = Path(args.out)
    atomic_write_bytes(out, json.dumps(result, indent=2).encode())
    print(f"max sustained: {result['max_sustained_rps']:.0f} requests/s; max with p99 <= "
          f"{args.slo_ms:g} ms: {result['max_rps_within_slo']:.0f} requests/s; wrote {out}")
    return 0
