"""The SuperLink's front door: the regions get the Fleet API, operators the Control API, and
nobody gets both by reaching one port.

Decision record
---------------
* **Why a gateway.** Flower 1.42 serves the Fleet (``/v1/fleet/...``), Control
  (``/v1/control/...``) and Runtime APIs from one HTTPS port, and open-source Flower checks no
  operator on the Control API: whoever reaches the port can submit a run, and a run is code the
  regions execute. So the SuperLink binds to the server host's loopback only
  (``storefed deploy superlink --host 127.0.0.1``) and this gateway faces the networks:

  - the **public listener** (the address the regions dial) forwards ``/v1/fleet/`` and nothing
    else; any other path gets ``403`` and a log line. SuperNode authentication still happens at
    the SuperLink (the node's signature headers travel unchanged);
  - the **operator listener** (optional) requires a TLS client certificate signed by the
    deployment's CA with the client-auth purpose (``storefed deploy operator-cert``) and forwards
    ``/v1/control/`` only. The ``flwr`` CLI cannot present a client certificate, so on the
    operator's machine ``storefed deploy operator-forward`` listens on its loopback and adds
    it; operators without one use an SSH tunnel to the SuperLink's loopback port instead.
* **TLS end to end.** The gateway terminates TLS with the SuperLink's own certificate (the
  regions verify it against the CA as before) and talks TLS to the SuperLink, verifying it
  against the same CA. It forwards bodies and streamed responses (``flwr log``) as they come.
* **Stack.** Starlette on uvicorn, httpx as the client: the same stack Flower's own HTTP
  APIs run on (FastAPI/uvicorn, httpx), so no new dependency and the same HTTP/1.1 behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("storefed.gateway")

FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"
# headers of one hop, not of the request (RFC 9110 7.6.1), plus what httpx/uvicorn set anew
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                  "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length"})


@dataclass(frozen=True)
class Upstream:
    """Where requests go: the SuperLink's ``https://host:port`` and the CA that signed it (or
    ``verify=False`` semantics with ``ca=None`` for a plain-HTTP upstream, e.g. the
    operator-forward's own loopback hop never uses that)."""

    url: str
    ca: Path | None
    client_cert: tuple[Path, Path] | None = None  # (cert, key) presented upstream


def _client(up: Upstream) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = False
    if up.url.startswith("https://"):
        ctx = ssl.create_default_context(cafile=str(up.ca) if up.ca else None)
        if up.client_cert is not None:
            ctx.load_cert_chain(str(up.client_cert[0]), str(up.client_cert[1]))
        verify = ctx
    return httpx.AsyncClient(base_url=up.url, verify=verify, timeout=None)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in raw if k.decode("latin-1").lower() not in _HOP]


def forwarding_app(upstream: Upstream, allowed_prefix: str, name: str) -> Starlette:
    """An ASGI app that forwards requests whose path starts with ``allowed_prefix`` to
    ``upstream`` and refuses every other path with 403."""
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["client"] = _client(upstream)
        try:
            yield
        finally:
            await state["client"].aclose()

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(allowed_prefix):
            peer = request.client.host if request.client else "?"
            log.warning("%s: refused %s %s from %s (only %s* is served here)", name,
                        request.method, path, peer, allowed_prefix)
            return PlainTextResponse(
                f"storefed gateway ({name}): {path} is not served here; only {allowed_prefix}*."
                f" Operators reach the Control API through the operator path (see "
                f"docs/deployment-trust.md).\n", status_code=403)
        client = state["client"]
        url = path + (f"?{request.url.query}" if request.url.query else "")
        req = client.build_request(request.method, url, content=await request.body(),
                                   headers=_headers(request.headers.raw))
        try:
            resp = await client.send(req, stream=True)
        except httpx.HTTPError as exc:
            log.error("%s: upstream %s unreachable: %s", name, upstream.url, exc)
            return PlainTextResponse(f"storefed gateway ({name}): upstream unreachable\n",
                                     status_code=502)
        return StreamingResponse(resp.aiter_raw(), status_code=resp.status_code,
                                 headers=dict(_decoded(_headers(resp.headers.raw))),
                                 background=BackgroundTask(resp.aclose))

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)],
                     lifespan=lifespan)


def _decoded(raw: Iterable[tuple[bytes, bytes]]) -> Iterable[tuple[str, str]]:
    return ((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)


def serve(apps: list[tuple[Starlette, str, int, dict[str, object]]]) -> None:
    """Run several listeners in one process: (app, host, port, uvicorn ssl options)."""
    import asyncio  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    servers = [uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                             access_log=False, **opts))  # type: ignore[arg-type]
               for app, host, port, opts in apps]

    async def main() -> None:
        await asyncio.gather(*(s.serve() for s in servers))

    asyncio.run(main())


def gateway_listeners(certs: Path, superlink: str, public: tuple[str, int],
                      operator: tuple[str, int] | None) -> list[tuple[Starlette, str, int,
                                                                      dict[str, object]]]:
    """The public (Fleet only) and, when asked, the operator (Control only, client
    certificate required) listeners in front of the SuperLink at ``superlink`` (host:port)."""
    ca = certs / "ca.crt"
    tls: dict[str, object] = {"ssl_certfile": str(certs / "server.crt"),
                              "ssl_keyfile": str(certs / "server.key")}
    up = Upstream(f"https://{superlink}", ca)
    out = [(forwarding_app(up, FLEET_PREFIX, "public"), public[0], public[1], tls)]
    if operator is not None:
        mtls = {**tls, "ssl_ca_certs": str(ca), "ssl_cert_reqs": int(ssl.CERT_REQUIRED)}
        out.append((forwarding_app(up, CONTROL_PREFIX, "operator"), operator[0], operator[1],
                    mtls))
    return out


def operator_forward_listener(gateway: str, ca: Path, cert: Path, key: Path,
                              listen: tuple[str, int]) -> tuple[Starlette, str, int,
                                                                dict[str, object]]:
    """On an operator's machine: plain HTTP on its loopback (what ``flwr`` dials, with
    ``insecure = true``), forwarded over TLS with the operator's client certificate to the
    gateway's operator listener."""
    if listen[0] not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"operator-forward listens on loopback only (plain HTTP), got "
                         f"{listen[0]!r}")
    up = Upstream(f"https://{gateway}", ca, (cert, key))
    return forwarding_app(up, CONTROL_PREFIX, "operator-forward"), listen[0], listen[1], {}
