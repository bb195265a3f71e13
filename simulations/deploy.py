"""The deployment library behind ``storefed deploy ...`` (``simulations/deploy_cli.py``): run
storefed as a real Flower deployment, one SuperNode per region.

Steps (each a sub-command; ``docs/deployment.md`` walks through them):

- ``deploy certs``     CA + SuperLink TLS certificate (SANs: localhost, 127.0.0.1 + --host ...)
- ``deploy keys``      a region's SuperNode authentication key pair (EC P-384, OpenSSH format)
- ``deploy superlink`` start ``flower-superlink`` with TLS + SuperNode authentication
- ``deploy connect``   write a SuperLink connection into ``$FLWR_HOME/config.toml`` for ``flwr``
- ``deploy register``  register a region's public key with the SuperLink
- ``deploy supernode`` start a region's SuperNode (``--node-config`` market/data/state/device)
                        plus its warm ClientApp executor (``simulations/deploy_exec.py``)
- ``deploy run``       submit a federated run (``flwr run``) and wait for it
- ``deploy demo``      all of it on 127.0.0.1 with every market (``simulations/cluster.py``)
- ``deploy bench``     per-round time of deployment vs simulation (the lab's)

Every Flower process gets ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (nothing is
pip/uv-installed at run time: install storefed on every host beforehand).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig
from storefed.shared.errors import ConfigError, StorefedError
from storefed.shared.policy import NODE_CONFIG_KEY

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


def read_passphrase(path: str) -> bytes | None:
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
    exe = ([sys.executable, "-m", "storefed.simulations.deploy_exec", "superlink"] if plain_logs
           else [str(Path(sys.executable).parent / "flower-superlink")])
    cmd = [*exe, "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
           "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth",
           "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database:
        cmd += ["--database", str(database)]
    return cmd


def node_config_string(market: str, data_dir: str = "", state_dir: str = "",
                       device: str = "", dataset: str = "", policy: str = "",
                       ranker: bool = False) -> str:
    """The ``--node-config`` value client/client_app.py reads (TOML values, space separated);
    ``policy``: the market's privacy-policy file (``shared/policy.py``); ``ranker``: fit the
    market's private ranker after every evaluation (``shared/ranker.py``)."""
    items: dict[str, Any] = {"market": market, "data-dir": data_dir, "state-dir": state_dir,
                             "device": device, "dataset": dataset, NODE_CONFIG_KEY: policy,
                             "ranker": ranker}
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
    exe = ([sys.executable, "-m", "storefed.simulations.deploy_exec", "supernode", str(fleet_poll)]
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


def flwr_cli(args: Sequence[str], env: Mapping[str, str], timeout: float = 120.0,
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


def json_tail(text: str) -> dict[str, Any]:
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
    doc = json_tail(flwr_cli(args, env).stdout)
    if not doc.get("success"):
        raise DeployError(f"registering {public_key} failed: {doc}")
    return int(doc["node-id"])


def unregister_node(node_id: int, env: Mapping[str, str], connection: str = CONNECTION) -> None:
    """Revoke a SuperNode: remove its registration (its public key) from the SuperLink."""
    doc = json_tail(flwr_cli(["supernode", "unregister", str(node_id), connection, "--format",
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
    res = flwr_cli(["run", str(app_dir), connection, "--run-config", run_config_string(values),
                 "--format", "json"], env, timeout=300)
    doc = json_tail(res.stdout)
    if not doc.get("success") or doc.get("run-id") is None:
        raise DeployError(f"flwr run failed: {doc}")
    return int(doc["run-id"])


def run_status(run_id: int, env: Mapping[str, str], connection: str = CONNECTION) -> str:
    """The run's status text, e.g. ``running`` or ``finished:completed``."""
    doc = json_tail(flwr_cli(["list", connection, "--run-id", str(run_id), "--format", "json"],
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
        res = flwr_cli(["log", str(run_id), connection, "--show"], env, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(no run log: {exc})"
    return (res.stdout + res.stderr).strip()[-chars:]


def rounds_written(out_dir: str | Path) -> int:
    """How many rounds ``OUT/metrics.json`` holds (0 when absent or unreadable)."""
    try:
        return len(json.loads((Path(out_dir) / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
