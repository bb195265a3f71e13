"""``storefed deploy ...``: run storefed as a real Flower deployment, one SuperNode per region.

Steps (each a sub-command; the README section "Deploy per region" walks through them):

- ``deploy certs``     CA + SuperLink TLS certificate (SANs: localhost, 127.0.0.1 + --host ...)
- ``deploy keys``      a region's SuperNode authentication key pair (EC P-384, OpenSSH format)
- ``deploy superlink`` start ``flower-superlink`` with TLS + SuperNode authentication
- ``deploy connect``   write a SuperLink connection into ``$FLWR_HOME/config.toml`` for ``flwr``
- ``deploy register``  register a region's public key with the SuperLink
- ``deploy supernode`` start a region's SuperNode (``--node-config`` market/data/state/device)
                        plus its warm ClientApp executor (``simulations/deploy_exec.py``)
- ``deploy run``       submit a federated run (``flwr run``) and wait for it
- ``deploy demo``      all of it on 127.0.0.1 with every market (``simulations/deploy_demo.py``)
- ``deploy bench``     per-round time of deployment vs simulation on the same work

Every Flower process gets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (nothing is
pip/uv-installed at run time: install storefed on every host beforehand).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.checkpoint import atomic_write_bytes
from shared.config import RunConfig
from shared.errors import ConfigError, StorefedError
from shared.identity import IDENTITY_FILE, TRUSTED_FILE, load_or_create, public_hex
from shared.policy import NODE_CONFIG_KEY, load_policy
from simulations.fab import app_sha256, write_app

CONNECTION = "storefed"


class DeployError(StorefedError):
    """A deployment step failed (a Flower process exited, a run failed, a file is missing)."""


# --------------------------------------------------------------------------- certificates
def _write_key(path: Path, key: ec.EllipticCurvePrivateKey,
               fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
               passphrase: bytes | None = None) -> None:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption())
    data = key.private_bytes(serialization.Encoding.PEM, fmt, enc)
    atomic_write_bytes(path, data)
    path.chmod(0o600)


def _load_pem_key(path: Path, passphrase: bytes | None = None) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    except TypeError as exc:  # encrypted without a passphrase, or a passphrase for a plain key
        raise DeployError(f"cannot read private key {path}: {exc} (an encrypted CA key needs "
                          f"--ca-passphrase-file)") from exc
    except (OSError, ValueError) as exc:
        raise DeployError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{path} is not an EC private key")
    return key


def check_certificates(paths: Sequence[str | Path], warn_days: int = 30,
                       now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Each certificate's subject, expiry and days left; ``status`` is ``expired``,
    ``expires soon`` (within ``warn_days``), ``not yet valid`` or ``ok``. A server certificate
    is also checked against a ``ca.crt`` beside it (``issuer`` is ``ok`` or why not)."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for p in paths:
        path = Path(p)
        cert = _load_cert(path)
        left = (cert.not_valid_after_utc - now).total_seconds() / 86400
        status = ("not yet valid" if cert.not_valid_before_utc > now else "expired"
                  if left <= 0 else "expires soon" if left <= warn_days else "ok")
        row: dict[str, Any] = {"file": str(path), "subject": cert.subject.rfc4514_string(),
                               "not_after": cert.not_valid_after_utc.isoformat(),
                               "days_left": round(left, 1), "status": status}
        ca = path.parent / "ca.crt"
        if path.name != "ca.crt" and ca.is_file():
            try:
                cert.verify_directly_issued_by(_load_cert(ca))
                row["issuer"] = "ok"
            except (ValueError, TypeError, InvalidSignature) as exc:
                row["issuer"] = f"not signed by {ca}: {type(exc).__name__} {exc}".rstrip()
        out.append(row)
    return out


def _read_passphrase(path: str) -> bytes | None:
    """The CA key's passphrase from ``path`` (first line), or None without a file."""
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--ca-passphrase-file {path}: cannot read it ({exc})") from exc
    secret = text.splitlines()[0].encode() if text.strip() else b""
    if len(secret) < 8:
        raise ConfigError(f"--ca-passphrase-file {path}: the passphrase needs at least 8 "
                          f"characters")
    return secret


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise DeployError(f"cannot read certificate {path}: {exc}") from exc


def generate_ca(directory: str | Path, common_name: str = "storefed CA",
                days: int = 825, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """A self-signed CA (EC P-384): ``ca.crt`` and ``ca.key`` under ``directory``; with a
    ``passphrase``, ``ca.key`` is encrypted with it (PKCS#8, the best available scheme)."""
    d = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    crt_path, key_path = d / "ca.crt", d / "ca.key"
    _write_key(key_path, key, passphrase=passphrase)
    atomic_write_bytes(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    return crt_path, key_path


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def generate_server_cert(directory: str | Path, ca_crt: str | Path, ca_key: str | Path,
                         hosts: Sequence[str] = (), days: int = 397,
                         ca_passphrase: bytes | None = None,
                         valid_from: dt.datetime | None = None) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate signed by the CA: ``server.crt``/``server.key``.

    SANs: ``localhost``, ``127.0.0.1`` and every entry of ``hosts`` (DNS names or IPs) - the
    names SuperNodes and ``flwr`` use to reach the SuperLink must be among them. Valid for
    ``days`` from ``valid_from`` (default: now)."""
    d = Path(directory)
    ca_cert, ca_priv = _load_cert(Path(ca_crt)), _load_pem_key(Path(ca_key), ca_passphrase)
    names: list[str] = []
    for h in ("localhost", "127.0.0.1", *hosts):
        h = h.strip()
        if h and h not in names:
            names.append(h)
    return _issue(d, "server", ca_cert, ca_priv, names[-1], ExtendedKeyUsageOID.SERVER_AUTH,
                  days, valid_from, [_san(h) for h in names])


def generate_operator_cert(directory: str | Path, ca_crt: str | Path, ca_key: str | Path,
                           name: str, days: int = 90,
                           ca_passphrase: bytes | None = None) -> tuple[Path, Path]:
    """An operator's TLS client certificate (client-auth purpose only) signed by the CA:
    ``<name>.crt``/``<name>.key``, what the gateway's operator listener asks for."""
    if not name or "/" in name or name.startswith(".") or name in ("ca", "server"):
        raise ConfigError(f"invalid operator name {name!r}")
    ca_cert, ca_priv = _load_cert(Path(ca_crt)), _load_pem_key(Path(ca_key), ca_passphrase)
    return _issue(Path(directory), name, ca_cert, ca_priv, f"operator {name}",
                  ExtendedKeyUsageOID.CLIENT_AUTH, days, None, [])


def _issue(d: Path, stem: str, ca_cert: x509.Certificate, ca_priv: ec.EllipticCurvePrivateKey,
           common_name: str, purpose: x509.ObjectIdentifier, days: int,
           valid_from: dt.datetime | None, sans: list[x509.GeneralName]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = valid_from or dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_priv.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_priv, hashes.SHA384())
    crt_path, key_path = d / f"{stem}.crt", d / f"{stem}.key"
    _write_key(key_path, key)
    atomic_write_bytes(crt_path, cert.public_bytes(serialization.Encoding.PEM))
    return crt_path, key_path


def generate_node_keys(directory: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (EC P-384, OpenSSH encodings, as Flower expects):
    ``<name>.key`` (private, stays on the node) and ``<name>.pub`` (registered on the SuperLink)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"invalid node key name {name!r}")
    d = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    _write_key(priv, key, serialization.PrivateFormat.OpenSSH)
    atomic_write_bytes(pub, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


# --------------------------------------------------------------------------- processes
def flower_env(flwr_home: str | Path | None = None,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process: this interpreter's bin first on PATH (so
    ``flower-superexec``/``flwr-serverapp`` resolve), no runtime dependency installation."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra or {})
    return env


def superlink_command(certs: str | Path, host: str = "127.0.0.1", port: int = 9092,
                      database: str | Path | None = None,
                      plain_logs: bool = False) -> list[str]:
    """``flower-superlink`` with TLS (``certs``/ca.crt, server.crt, server.key) and SuperNode
    authentication. ``database`` keeps registrations and runs across SuperLink restarts."""
    c = Path(certs)
    for f in ("ca.crt", "server.crt", "server.key"):
        if not (c / f).is_file():
            raise DeployError(f"{c / f} is missing: run `storefed deploy certs --out {c}` first")
    exe = ([sys.executable, "-m", "simulations.deploy_exec", "superlink"] if plain_logs
           else [str(Path(sys.executable).parent / "flower-superlink")])
    cmd = [*exe, "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
           "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database:
        cmd += ["--database", str(database)]
    return cmd


def node_config_string(market: str, data_dir: str = "", state_dir: str = "",
                       device: str = "", dataset: str = "", policy: str = "") -> str:
    """The ``--node-config`` value client/client_app.py reads (TOML values, space separated);
    ``policy``: the market's privacy-policy file (``shared/policy.py``)."""
    items = {"market": market, "data-dir": data_dir, "state-dir": state_dir,
             "device": device, "dataset": dataset, NODE_CONFIG_KEY: policy}
    return " ".join(f"{k}={_toml_value(k, v)}" for k, v in items.items() if v)


def _toml_value(key: str, value: Any) -> str:
    """A value as Flower's ``key=value`` parser reads it (its pattern cannot carry quotes or
    backslashes inside a string, so such values are refused instead of silently mangled)."""
    if isinstance(value, str):
        if any(c in value for c in ("\"", "'", "\\", "\n")):
            raise ConfigError(f"value of '{key}' must not contain quotes, backslashes or "
                              f"newlines for Flower's config parser: {value!r}")
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def supernode_command(superlink: str, ca: str | Path | None, key: str | Path | None,
                      node_config: str, runtime_port: int = 9094,
                      runtime_host: str = "127.0.0.1", fleet_poll: float = 3.0,
                      isolation: str = "process") -> list[str]:
    """``flower-supernode`` over TLS (``ca`` verifies the SuperLink), authenticated with ``key``,
    ``--isolation process``: ClientApps run in the warm executor next to it. ``fleet_poll`` < 3
    runs it through ``simulations.deploy_exec`` with a shorter idle poll of the SuperLink."""
    exe = ([sys.executable, "-m", "simulations.deploy_exec", "supernode", str(fleet_poll)]
           if fleet_poll < 3
           else [str(Path(sys.executable).parent / "flower-supernode")])
    cmd = [*exe, "--superlink", superlink,
           "--isolation", isolation, "--host", runtime_host, "--port", str(runtime_port),
           "--node-config", node_config, "--max-wait-time", "3600"]
    cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key:
        cmd += ["--auth-supernode-private-key", str(key)]
    return cmd


def stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a process we started (and its process group when it leads one): SIGTERM, then
    SIGKILL after ``grace`` seconds. Safe to call twice."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        _signal(proc, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(proc.pid):
            return
        time.sleep(0.2)
    _signal(proc, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)  # the group this process leads (start_new_session=True)
            return
    except ProcessLookupError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # leftover children of an exited group leader
    if proc.poll() is None:
        proc.send_signal(sig)


# --------------------------------------------------------------------------- flwr CLI
def write_connection(flwr_home: str | Path, address: str, ca: str | Path | None,
                     name: str = CONNECTION, make_default: bool = True) -> Path:
    """Add/replace SuperLink connection ``name`` in ``$FLWR_HOME/config.toml`` (what ``flwr
    run``/``flwr supernode register`` read). Other connections in the file are kept."""
    import tomllib  # noqa: PLC0415

    path = Path(flwr_home) / "config.toml"
    doc: dict[str, Any] = {}
    if path.is_file():
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    links = doc.get("superlink", {})
    default = name if make_default else links.get("default", name)
    conns = {k: v for k, v in links.items() if isinstance(v, dict)}
    conns[name] = {"address": address}
    if ca:
        conns[name]["root-certificates"] = str(Path(ca).resolve())
    else:
        conns[name]["insecure"] = True
    lines = ["[superlink]", f"default = {json.dumps(default)}", ""]
    for cname, conn in conns.items():
        lines.append(f"[superlink.{cname}]")
        for k, v in conn.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int | float):
                lines.append(f"{k} = {v}")
            elif isinstance(v, str):
                lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _flwr(args: Sequence[str], env: Mapping[str, str], timeout: float = 120.0,
          check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "flwr"), *args]
    # run outside any project directory: flwr would migrate a pyproject.toml it finds in cwd
    cwd = env.get("FLWR_HOME") or tempfile.gettempdir()
    Path(cwd).mkdir(parents=True, exist_ok=True)
    res = subprocess.run(cmd, env=dict(env), capture_output=True, text=True, timeout=timeout,
                         check=False, stdin=subprocess.DEVNULL, cwd=cwd)
    if check and res.returncode != 0:
        raise DeployError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}): "
                          f"{(res.stderr or res.stdout).strip()[-1500:]}")
    return res


def _json_tail(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise DeployError(f"expected JSON from flwr, got: {text.strip()[-500:]}")
    try:
        obj: dict[str, Any] = json.loads(text[start:])
    except json.JSONDecodeError as exc:
        raise DeployError(f"unreadable JSON from flwr ({exc}): {text.strip()[-500:]}") from exc
    return obj


def register_node(public_key: str | Path, env: Mapping[str, str], connection: str = CONNECTION,
                  name: str | None = None) -> int:
    """Register a SuperNode's public key with the SuperLink; returns its node id."""
    args = ["supernode", "register", str(public_key), connection, "--format", "json"]
    if name:
        args += ["--name", name]
    doc = _json_tail(_flwr(args, env).stdout)
    if not doc.get("success"):
        raise DeployError(f"registering {public_key} failed: {doc}")
    return int(doc["node-id"])


def unregister_node(node_id: int, env: Mapping[str, str], connection: str = CONNECTION) -> None:
    """Revoke a SuperNode: remove its registration (its public key) from the SuperLink."""
    doc = _json_tail(_flwr(["supernode", "unregister", str(node_id), connection, "--format",
                            "json"], env).stdout)
    if not doc.get("success"):
        raise DeployError(f"unregistering node {node_id} failed: {doc}")


def run_config_string(values: Mapping[str, Any]) -> str:
    """``flwr run --run-config`` value: space separated TOML ``key=value`` pairs."""
    RunConfig.from_mapping(dict(values), source="deploy run")  # reject typos before submitting
    return " ".join(f"{k}={_toml_value(k, v)}" for k, v in values.items())


def submit_run(app_dir: str | Path, values: Mapping[str, Any], env: Mapping[str, str],
               connection: str = CONNECTION) -> int:
    """``flwr run APP CONNECTION --run-config ...``; returns the run id (does not wait)."""
    res = _flwr(["run", str(app_dir), connection, "--run-config", run_config_string(values),
                 "--format", "json"], env, timeout=300)
    doc = _json_tail(res.stdout)
    if not doc.get("success") or doc.get("run-id") is None:
        raise DeployError(f"flwr run failed: {doc}")
    return int(doc["run-id"])


def run_status(run_id: int, env: Mapping[str, str], connection: str = CONNECTION) -> str:
    """The run's status text, e.g. ``running`` or ``finished:completed``."""
    doc = _json_tail(_flwr(["list", connection, "--run-id", str(run_id), "--format", "json"],
                           env).stdout)
    runs = doc.get("runs") or []
    return str(runs[0].get("status", "")) if runs else ""


def wait_run(run_id: int, env: Mapping[str, str], timeout: float, connection: str = CONNECTION,
             poll: float = 30.0, alive: Iterable[subprocess.Popen] = (),
             done_hint: Callable[[], bool] | None = None) -> str:
    """Wait until the run is finished; returns its status (``finished:completed`` on success).

    Each status check is a ``flwr list`` process, so it runs every ``poll`` seconds, or sooner
    once ``done_hint()`` says the run looks done (e.g. the last round's metrics were written).
    Raises DeployError on timeout or when one of ``alive`` (e.g. the SuperLink) exits."""
    watched = list(alive)
    end = time.monotonic() + timeout
    last_check = -1e9
    while time.monotonic() < end:
        since = time.monotonic() - last_check
        if since >= poll or (since >= 2.0 and done_hint is not None and done_hint()):
            status = run_status(run_id, env, connection)
            if status.startswith("finished"):
                return status
            last_check = time.monotonic()
        for p in watched:
            if p.poll() is not None:
                raise DeployError(f"process {p.pid} exited with {p.returncode} while run "
                                  f"{run_id} was running")
        time.sleep(0.5)
    raise DeployError(f"run {run_id} did not finish within {timeout:.0f}s")


def run_log(run_id: int, env: Mapping[str, str], connection: str = CONNECTION,
            chars: int = 4000) -> str:
    """The tail of a run's ServerApp log as the SuperLink keeps it (``flwr log --show``), for
    error reports: a failed ServerApp's traceback lives there, not in the SuperLink's output."""
    try:
        res = _flwr(["log", str(run_id), connection, "--show"], env, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(no run log: {exc})"
    return (res.stdout + res.stderr).strip()[-chars:]


def rounds_written(out_dir: str | Path) -> int:
    """How many rounds ``OUT/metrics.json`` holds (0 when absent or unreadable)."""
    try:
        return len(json.loads((Path(out_dir) / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# --------------------------------------------------------------------------- node process
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
    from simulations.deploy_exec import WarmExecutor  # noqa: PLC0415 - imports flwr

    if args.threads > 0:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    import client.client_app  # noqa: F401, PLC0415 - warm the app (torch, storefed) up front
    from simulations.deploy_exec import plain_logs  # noqa: PLC0415

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
    from simulations.fab import installed_app_sha256  # noqa: PLC0415

    print(f"this node runs app bundles: trusted-apps = {rules.trusted_apps!r} (installed = "
          f"sha256 {installed_app_sha256()}); run-config overrides: allowed-run-config = "
          f"{rules.allowed_run_config!r}", flush=True)
    nc = node_config_string(args.market, str(Path(args.data_dir).resolve()) if args.data_dir
                            else "", str(Path(args.state_dir).resolve()), args.device or "",
                            args.dataset or "", policy)
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
    u.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="any [tool.flwr.app.config] key (repeatable)")
    u.add_argument("--timeout", type=float, default=24 * 3600.0)
    u.add_argument("--no-wait", action="store_true", help="print the run id and return")

    from simulations.deploy_demo import add_demo_parsers  # noqa: PLC0415

    add_demo_parsers(dsub)
    return "deploy", _run


def _run(args: argparse.Namespace) -> int:
    cmd = args.deploy_command
    if cmd == "certs":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        ca_crt, ca_key = (out / "ca.crt", out / "ca.key")
        secret = _read_passphrase(args.ca_passphrase_file)
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
                                          _read_passphrase(args.ca_passphrase_file))
        print(f"wrote {crt} and {key} (the operator's only; `deploy operator-forward` uses them)")
        return 0
    if cmd in ("gateway", "operator-forward"):
        return _front_door(args)
    if cmd == "app-hash":
        from simulations.fab import installed_app_sha256  # noqa: PLC0415

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
    from simulations.deploy_demo import run_demo_command  # noqa: PLC0415

    return run_demo_command(args)


def _front_door(args: argparse.Namespace) -> int:
    from simulations.gateway import (  # noqa: PLC0415 - uvicorn/starlette only here
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
    from simulations.simulate import parse_overrides, print_summary  # noqa: PLC0415

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
