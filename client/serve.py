"""A market's recommendation service: HTTP/JSON on FastAPI + uvicorn, next to its SuperNode.

It scores exactly as the node's evaluation does: the global encoder the node received for its
last round, the market's private per-category heads, and the market's private item-kNN term
(rebuilt from the market's own training data, weighted as the evaluation calibrated it). It
reads one file, ``<state-dir>/<market>/serving.pt`` (``shared/serving_state.py``), which the
node rewrites atomically after every round's evaluation. A poller notices a new file, loads it
into a new model object and swaps one reference: a request takes the reference once when it
starts, so a swap never touches a request in flight, and every response names the round and
version of the model that answered it.

Endpoints (every JSON error is ``{"error": CODE, "detail": TEXT, ...}``):

- ``GET  /v1/recommend?user=U&k=10``  a known user (history = everything the market has of
  them; those items are excluded)
- ``POST /v1/recommend``  ``{"history": [item ids], "k": 10, "exclude": [...],
  "candidates": [...]}``: a cold user (unknown ids are named in ``unknown_items`` and skipped)
- ``POST /v1/recommend/batch``  ``{"requests": [{"user": U} | {"history": [...]}...], "k": 10}``
- ``GET  /v1/users?limit=20&offset=0``  some of the market's user ids (for the page)
- ``GET  /healthz``  200 once a model is loaded, 503 before
- ``GET  /metrics``  Prometheus text: requests, latency histogram, model round
- ``GET  /``  a small page to try it

The market is fixed when the service starts; no request parameter names a file or a market, so
a request cannot read another market's state or anything else on disk.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, Response

from storefed.shared.data import (
    Catalog,
    MarketSplit,
    ReaderOptions,
    load_market,
    pad_histories,
)
from storefed.shared.errors import CheckpointError, ConfigError, StorefedError
from storefed.shared.itemsim import ItemSimilarity
from storefed.shared.model import MarketModel, load_parts
from storefed.shared.ranker import RANKER_FILE, MarketStats, Ranker, features, load_ranker
from storefed.shared.serving_state import ServingSnapshot, load_serving, serving_path

log = logging.getLogger("storefed.serve")

MAX_K = 500
MAX_BATCH = 256
MAX_LIST = 10_000  # items in one history / exclude / candidates list
MAX_BODY = 2 * 1024 * 1024
PAGE = Path(__file__).with_name("serve_page.html")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` with a JSON body."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra


def check_market_name(market: str) -> str:
    """A market name that is one plain path component (it names a folder of the state dir)."""
    if not market or market in (".", "..") or not all(
            c.isalnum() or c in "-_." for c in market):
        raise ConfigError(f"--market {market!r}: use letters, digits, '-', '_' or '.' only")
    return market


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class MarketData:
    """The market's own data the service needs, built once per split: users, what each has,
    the items it ranks, and the private item-kNN."""

    catalog: Catalog
    split: MarketSplit
    user_index: dict[str, int]
    known: list[np.ndarray]  # per user: every item the market has of them, oldest first
    pool: np.ndarray  # the market's items (the candidates of a recommendation)
    pool_position: torch.Tensor  # catalog index -> position in ``pool`` (-1: not in it)
    similarity: ItemSimilarity


_DATA: dict[tuple[Any, ...], MarketData] = {}


def market_data(dataset: str, data_dir: str, market: str, seed: int, n_neg: int,
                max_history: int, options: ReaderOptions | None = None) -> MarketData:
    """Load (once per argument set) the market's catalog, split and item-kNN."""
    opts = options or ReaderOptions()
    key = (dataset, data_dir, market, seed, n_neg, max_history, opts)
    if key not in _DATA:
        catalog, split = load_market(dataset, data_dir or None, market, seed=seed, n_neg=n_neg,
                                     max_history=max_history, options=opts)
        known: list[list[int]] = [[] for _ in split.user_ids]
        for u, i in zip(split.train_users.tolist(), split.train_items.tolist(), strict=True):
            known[u].append(i)
        for r, u in enumerate(split.test.users.tolist()):
            known[u] += [int(split.valid.candidates[r, 0]), int(split.test.candidates[r, 0])]
        pool = np.asarray(split.items, dtype=np.int64)
        position = torch.full((catalog.n_items + 1,), -1, dtype=torch.long)
        position[torch.as_tensor(pool)] = torch.arange(len(pool))
        _DATA[key] = MarketData(
            catalog=catalog, split=split,
            user_index={u: i for i, u in enumerate(split.user_ids)},
            known=[np.asarray(k, dtype=np.int64) for k in known],
            pool=pool, pool_position=position,
            similarity=ItemSimilarity.from_split(split, catalog.n_items))
    return _DATA[key]


@dataclass(frozen=True)
class ServedModel:
    """One round's model with the market's data; immutable once built (swapped whole)."""

    market: str
    round: int
    version: str
    model: MarketModel
    data: MarketData
    max_history: int
    loaded_at: float
    # the market's private ranker fitted to this very model (node config ``ranker = true``)
    ranker: tuple[Ranker, MarketStats] | None = None

    @property
    def tag(self) -> dict[str, Any]:
        return {"round": self.round, "version": self.version}

    @torch.inference_mode()
    def scores(self, histories: list[np.ndarray], items: np.ndarray) -> torch.Tensor:
        """B histories (catalog indices, oldest first), I items -> scores B x I: the model's
        forward in eval mode (encoder + heads + weighted item-kNN), as the evaluation scores,
        or the market's ranker over it where the node fitted one to this model."""
        hist = pad_histories(histories, self.max_history, self.data.catalog.pad_index)
        if self.ranker is not None:
            ranker, stats = self.ranker
            x = features(self.model, stats, hist, np.broadcast_to(items, (len(hist), len(items))),
                         torch.device("cpu"))
            return torch.from_numpy(ranker.scores(x)).float()
        return self.model.score_items(torch.as_tensor(hist), torch.as_tensor(items))

    @torch.inference_mode()
    def top(self, histories: list[np.ndarray], excludes: list[np.ndarray], k: int,
            candidates: np.ndarray | None = None) -> list[list[dict[str, Any]]]:
        """Top-k of ``candidates`` (default: the market's items) per history, without that
        row's excluded items; items as ``{"item", "category", "score"}``."""
        items = self.data.pool if candidates is None else candidates
        if len(items) == 0:
            return [[] for _ in histories]
        s = self.scores(histories, items)
        if candidates is None:
            position = self.data.pool_position
        else:
            position = torch.full((self.data.catalog.n_items + 1,), -1, dtype=torch.long)
            position[torch.as_tensor(candidates)] = torch.arange(len(candidates))
        for r, ex in enumerate(excludes):
            if len(ex):
                cols = position[torch.as_tensor(ex)]
                s[r, cols[cols >= 0]] = -math.inf
        n = min(k, len(items))
        vals, idx = torch.topk(s, n, dim=1)
        cat = self.data.catalog
        out = []
        for row_v, row_i in zip(vals.tolist(), idx.tolist(), strict=True):
            row = []
            for v, i in zip(row_v, row_i, strict=True):
                if v == -math.inf:
                    break
                g = int(items[i])
                row.append({"item": cat.item_ids[g],
                            "category": cat.categories[int(cat.item_category[g])],
                            "score": round(float(v), 6)})
            out.append(row)
        return out


def build_served(snap: ServingSnapshot, dataset: str | None, data_dir: str | None,
                 threads: int = 1, ranker_path: Path | None = None) -> ServedModel:
    """The servable model of ``snap`` over the market's data (``dataset``/``data_dir``, default
    the run config the node wrote), ranked by the market's ranker at ``ranker_path`` when that
    was fitted to this model. CheckpointError if the data's catalog is another one."""
    cfg = snap.config
    ds = dataset or str(cfg.get("dataset", ""))
    dd = data_dir if data_dir is not None else str(cfg.get("data-dir", ""))
    if not ds:
        raise ConfigError("no --dataset given and the serving file's config names none")
    max_history = int(cfg.get("max-history", 50))
    data = market_data(ds, dd, snap.market, int(cfg.get("seed", 0)),
                       int(cfg.get("eval-negatives", 99)), max_history,
                       ReaderOptions.from_run_config(cfg))
    if data.catalog.fingerprint() != snap.catalog_fingerprint:
        raise CheckpointError(f"the serving file of market {snap.market} round {snap.round} "
                              f"was written for another catalog than {ds} {dd!r}")
    model = MarketModel(snap.model, torch.as_tensor(data.catalog.item_category))
    try:
        load_parts(model, encoder=snap.encoder, private=snap.heads)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"serving file of round {snap.round} does not fit the model: "
                              f"{exc}") from exc
    if bool(cfg.get("item-knn", True)):  # as MarketNode: the weight may be 0 (then no term)
        model.attach_item_similarity(data.similarity)
    model.eval()
    return ServedModel(market=snap.market, round=snap.round, version=snap.version, model=model,
                       data=data, max_history=max_history, loaded_at=time.time(),
                       ranker=_ranker(ranker_path, snap, data))


def _ranker(path: Path | None, snap: ServingSnapshot,
            data: MarketData) -> tuple[Ranker, MarketStats] | None:
    """The market's ranker at ``path`` when it was fitted to ``snap``'s model; anything else
    (none, another round's, unreadable) serves the model alone."""
    if path is None or not path.is_file():
        return None
    try:
        ranker = load_ranker(path, snap.market)
    except CheckpointError as exc:
        log.warning("market %s: serving round %d without its ranker: %s", snap.market,
                    snap.round, exc)
        return None
    if ranker.model_version != snap.version:
        log.info("market %s: %s was fitted to model version %s, not round %d's %s: serving "
                 "the model alone", snap.market, path, ranker.model_version, snap.round,
                 snap.version)
        return None
    return ranker, MarketStats.from_split(data.split, data.catalog.n_items)


class ModelStore:
    """Holds the model being served and swaps in a new round's when the serving file changes.

    ``current`` is one reference, replaced whole (an atomic assignment): a request reads it
    once and keeps that model to the end. A file that fails to load is logged and counted and
    the previous model keeps serving; it is retried when the file changes again."""

    def __init__(self, state_dir: str | Path, market: str, dataset: str | None = None,
                 data_dir: str | None = None, poll_seconds: float = 1.0,
                 on_load: Callable[[ServedModel | None, str], None] | None = None) -> None:
        self.market = check_market_name(market)
        self.path = serving_path(Path(state_dir).resolve(), market)
        self.dataset, self.data_dir, self.poll = dataset, data_dir, poll_seconds
        self.current: ServedModel | None = None
        self.last_error = ""
        self._stamp: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_load = on_load

    def check(self) -> bool:
        """Load the serving file if it changed since the last look; True if a model was
        swapped in."""
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            served = build_served(load_serving(self.path, self.market), self.dataset,
                                  self.data_dir, ranker_path=self.path.parent / RANKER_FILE)
        except (StorefedError, OSError) as exc:
            self.last_error = str(exc)
            log.error("market %s: keeping the model of round %s: %s", self.market,
                      self.current.round if self.current else "-", exc)
            if self._on_load:
                self._on_load(None, "failed")
            return False
        previous, self.current = self.current, served
        self.last_error = ""
        log.warning("market %s: serving round %d (version %s)%s", self.market, served.round,
                    served.version, f", was round {previous.round}" if previous else "")
        if self._on_load:
            self._on_load(served, "ok")
        return True

    def start(self) -> None:
        """Poll the serving file every ``poll_seconds`` in a daemon thread."""
        def loop() -> None:
            while True:
                try:
                    self.check()
                except Exception:  # noqa: BLE001 - a poller must never die
                    log.exception("market %s: serving file check failed", self.market)
                if self._stop.wait(self.poll):
                    return
        self._thread = threading.Thread(target=loop, name="serving-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


# --------------------------------------------------------------------------- request parsing
def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status,
                    media_type="application/json", headers=headers)


def parse_k(raw: Any) -> int:
    """k: an integer 1..MAX_K (a JSON int or a query string)."""
    if isinstance(raw, bool):
        raw = None
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        raw = int(raw)
    if not isinstance(raw, int) or not 1 <= raw <= MAX_K:
        raise ApiError(400, "bad_k", f"k must be an integer from 1 to {MAX_K}, got {raw!r}")
    return raw


def _id_list(body: dict[str, Any], key: str) -> list[str]:
    raw = body.get(key, [])
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ApiError(400, "bad_request", f"'{key}' must be a list of item ids")
    if len(raw) > MAX_LIST:
        raise ApiError(413, "too_large", f"'{key}' has {len(raw)} items, at most {MAX_LIST}")
    out = []
    for x in raw:
        if isinstance(x, bool) or not isinstance(x, str | int):
            raise ApiError(400, "bad_request", f"'{key}' must hold item ids (strings), got "
                                               f"{json.dumps(x)[:40]}")
        out.append(str(x))
    return out


def to_indices(catalog: Catalog, ids: list[str]) -> tuple[np.ndarray, list[str]]:
    """Raw item ids -> (catalog indices of the known ones, in order; the unknown ids)."""
    index = catalog.index_of()
    known, unknown = [], []
    for x in ids:
        i = index.get(x)
        if i is None:
            unknown.append(x)
        else:
            known.append(i)
    return np.asarray(known, dtype=np.int64), list(dict.fromkeys(unknown))


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body, or a 4xx ApiError saying what is wrong with it."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise ApiError(413, "too_large", f"request body over {MAX_BODY} bytes")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise ApiError(413, "too_large", f"request body over {MAX_BODY} bytes")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return obj


# --------------------------------------------------------------------------- metrics, auth
class Metrics:
    """Prometheus metrics of one service (its own registry)."""

    ENDPOINTS = frozenset({"/v1/recommend", "/v1/recommend/batch", "/v1/users", "/healthz",
                           "/metrics", "/"})

    def __init__(self, market: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("storefed_serve_requests", "HTTP requests served",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "storefed_serve_request_seconds", "Request latency (server side)", ["endpoint"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry)
        self.round = Gauge("storefed_serve_model_round", "Round of the model being served "
                           "(0: none loaded)", ["market"], registry=self.registry)
        self.loads = Counter("storefed_serve_model_loads", "Serving files loaded",
                             ["result"], registry=self.registry)
        self.market = market
        self.round.labels(market=market).set(0)

    def on_load(self, served: ServedModel | None, result: str) -> None:
        self.loads.labels(result=result).inc()
        if served is not None:
            self.round.labels(market=self.market).set(served.round)

    def endpoint(self, path: str) -> str:
        return path if path in self.ENDPOINTS else "other"


def middleware(app: ASGIApp, metrics: Metrics, token: str | None) -> ASGIApp:
    """Pure ASGI: bearer-token check on /v1/* and /metrics, then request count + latency."""
    protected = ("/v1/", "/metrics")
    expected = f"Bearer {token}".encode() if token else b""

    async def wrapped(scope: Scope, receive: Callable[[], Awaitable[Any]],
                      send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope.get("path", "")
        status = [500]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if token and path.startswith(protected):
                got = dict(scope.get("headers") or []).get(b"authorization", b"")
                if not hmac.compare_digest(got, expected):
                    resp = _json({"error": "unauthorized",
                                  "detail": "missing or wrong bearer token (Authorization: "
                                            "Bearer <token>)"}, 401,
                                 {"WWW-Authenticate": "Bearer"})
                    await resp(scope, receive, send_status)
                    return
            await app(scope, receive, send_status)
        finally:
            ep = metrics.endpoint(path)
            metrics.requests.labels(ep, scope.get("method", ""), str(status[0])).inc()
            metrics.latency.labels(ep).observe(time.perf_counter() - t0)

    return wrapped


# --------------------------------------------------------------------------- micro-batching
class Batcher:
    """Scores the top-k requests that arrive together in one model call (the model's cost is
    mostly per call, not per user: 16 users cost about twice one). A request keeps the model it
    started with: requests are grouped by model, so a swap never mixes rounds in a batch."""

    def __init__(self, max_batch: int = 64) -> None:
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[ServedModel, np.ndarray, np.ndarray, int,
                                         asyncio.Future[list[dict[str, Any]]]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def top(self, m: ServedModel, history: np.ndarray, exclude: np.ndarray,
                  k: int) -> list[dict[str, Any]]:
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run(self._queue))
        fut: asyncio.Future[list[dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((m, history, exclude, k, fut))
        return await fut

    async def _run(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            jobs = [await queue.get()]
            await asyncio.sleep(0)  # requests already read get to enqueue too
            while len(jobs) < self.max_batch and not queue.empty():
                jobs.append(queue.get_nowait())
            groups: dict[int, list[Any]] = {}
            for job in jobs:
                groups.setdefault(id(job[0]), []).append(job)
            for group in groups.values():
                try:
                    rows = group[0][0].top([j[1] for j in group], [j[2] for j in group],
                                           max(j[3] for j in group))
                except Exception as exc:  # noqa: BLE001 - handed to the requests
                    for j in group:
                        if not j[4].done():
                            j[4].set_exception(exc)
                    continue
                for j, row in zip(group, rows, strict=True):
                    if not j[4].done():
                        j[4].set_result(row[:j[3]])


# --------------------------------------------------------------------------- the app
def create_app(store: ModelStore, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app of one market's service over ``store``."""
    metrics = metrics or Metrics(store.market)
    market = store.market
    page = PAGE.read_text(encoding="utf-8").replace("{{MARKET}}", market)
    app = FastAPI(title=f"storefed recommendations: market {market}", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    batcher = Batcher()

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _json({"error": exc.code, "detail": exc.detail, **exc.extra}, exc.status,
                     headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json({"error": code, "detail": str(exc.detail)}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _json({"error": "bad_request", "detail": str(exc.errors())[:500]}, 400)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> Response:  # a bug, still JSON
        log.exception("unhandled error: %s", exc)
        return _json({"error": "internal", "detail": type(exc).__name__}, 500)

    def model() -> ServedModel:
        m = store.current
        if m is None:
            raise ApiError(503, "not_ready", f"no model loaded yet for market {market} "
                                             f"(waiting for the node to write serving.pt)")
        return m

    def check_market(params: Any) -> None:
        asked = params.get("market")
        if asked is not None and asked != market:
            raise ApiError(400, "wrong_market", f"this service serves market {market!r} only, "
                                                f"not {asked!r}")

    def unknown_user(m: ServedModel, user: str) -> ApiError:
        return ApiError(404, "unknown_user",
                        f"market {market} has no user {user!r}; POST /v1/recommend with "
                        f"{{\"history\": [...]}} for a new (cold) user",
                        examples=list(m.data.split.user_ids[:5]))

    @app.get("/healthz")
    async def healthz() -> Response:
        m = store.current
        if m is None:
            return _json({"status": "loading", "market": market,
                          "detail": store.last_error or f"waiting for {store.path.name}"}, 503,
                         {"Retry-After": "1"})
        return _json({"status": "ok", "market": market, "model": m.tag,
                      "loaded_at": m.loaded_at})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index() -> Response:
        return HTMLResponse(page)

    @app.get("/v1/users")
    async def users(request: Request) -> Response:
        m = model()
        q = request.query_params
        try:
            limit, offset = int(q.get("limit", "20")), int(q.get("offset", "0"))
        except ValueError:
            raise ApiError(400, "bad_request", "limit and offset must be integers") from None
        if not (1 <= limit <= 1000 and offset >= 0):
            raise ApiError(400, "bad_request", "limit must be 1..1000 and offset >= 0")
        ids = m.data.split.user_ids
        return _json({"market": market, "total": len(ids),
                      "users": list(ids[offset:offset + limit])})

    @app.get("/v1/recommend")
    async def recommend_user(request: Request) -> Response:
        q = request.query_params
        check_market(q)
        k = parse_k(q.get("k", "10"))
        user = q.get("user")
        if not user:
            raise ApiError(400, "bad_request", "give ?user=ID (or POST a history for a cold "
                                               "user)")
        m = model()
        u = m.data.user_index.get(user)
        if u is None:
            raise unknown_user(m, user)
        hist = m.data.known[u]
        items = await batcher.top(m, hist, hist, k)
        return _json({"market": market, "user": user, "items": items, "model": m.tag})

    def cold_request(m: ServedModel, body: dict[str, Any]) -> tuple[
            np.ndarray, np.ndarray, dict[str, list[str]]]:
        history, unknown = to_indices(m.data.catalog, _id_list(body, "history"))
        exclude, unknown_ex = to_indices(m.data.catalog, _id_list(body, "exclude"))
        notes = {}
        if unknown:
            notes["unknown_items"] = unknown
        if unknown_ex:
            notes["unknown_exclude"] = unknown_ex
        return history, np.concatenate([history, exclude]), notes

    @app.post("/v1/recommend")
    async def recommend_history(request: Request) -> Response:
        body = await read_json(request)
        check_market(body)
        k = parse_k(body.get("k", 10))
        if "user" in body:
            raise ApiError(400, "bad_request", "a known user is GET /v1/recommend?user=ID; "
                                               "POST takes a history")
        if "history" not in body:
            raise ApiError(400, "bad_request", "the body needs 'history': a list of item ids "
                                               "(may be empty)")
        m = model()
        history, exclude, notes = cold_request(m, body)
        candidates = None
        if body.get("candidates") is not None:
            candidates, unknown_c = to_indices(m.data.catalog, _id_list(body, "candidates"))
            candidates = np.asarray(list(dict.fromkeys(candidates.tolist())), dtype=np.int64)
            if unknown_c:
                notes["unknown_candidates"] = unknown_c
        items = (m.top([history], [exclude], k, candidates)[0] if candidates is not None
                 else await batcher.top(m, history, exclude, k))
        return _json({"market": market, "user": None, "items": items, "model": m.tag,
                      **notes})

    @app.post("/v1/recommend/batch")
    async def recommend_batch(request: Request) -> Response:
        body = await read_json(request)
        check_market(body)
        k = parse_k(body.get("k", 10))
        reqs = body.get("requests")
        if not isinstance(reqs, list) or not reqs:
            raise ApiError(400, "bad_request", "the body needs 'requests': a non-empty list of "
                                               "{\"user\": ID} or {\"history\": [...]} objects")
        if len(reqs) > MAX_BATCH:
            raise ApiError(413, "too_large", f"{len(reqs)} requests in one batch, at most "
                                             f"{MAX_BATCH}")
        m = model()
        results: list[dict[str, Any]] = [{} for _ in reqs]
        rows: list[int] = []
        hists: list[np.ndarray] = []
        excludes: list[np.ndarray] = []
        for n, r in enumerate(reqs):
            if not isinstance(r, dict) or ("user" in r) == ("history" in r):
                raise ApiError(400, "bad_request", f"requests[{n}]: give exactly one of "
                                                   f"'user' or 'history'")
            if "user" in r:
                user = r["user"]
                u = m.data.user_index.get(user) if isinstance(user, str) else None
                results[n] = {"user": user}
                if u is None:
                    err = unknown_user(m, str(user))
                    results[n].update({"error": err.code, "status": 404,
                                       "detail": err.detail})
                    continue
                hists.append(m.data.known[u])
                excludes.append(m.data.known[u])
            else:
                try:
                    h, ex, notes = cold_request(m, r)
                except ApiError as exc:
                    raise ApiError(exc.status, exc.code, f"requests[{n}]: {exc.detail}") from None
                results[n] = {"user": None, **notes}
                hists.append(h)
                excludes.append(ex)
            rows.append(n)
        if rows:
            for n, items in zip(rows, m.top(hists, excludes, k), strict=True):
                results[n]["items"] = items
        return _json({"market": market, "results": results, "model": m.tag})

    return app


# --------------------------------------------------------------------------- running it
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def read_token(path: str) -> str:
    """The bearer token: the first line of ``path`` (at least 16 characters)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot read it ({exc})") from exc
    token = text.splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise ConfigError(f"--token-file {path}: the token must be at least 16 characters")
    return token


def check_exposure(host: str, token: str | None, tls: bool, plain_http: bool) -> None:
    """Refuse to listen beyond this host without a bearer token, and without TLS unless
    ``plain_http`` says TLS ends in front of the service."""
    if host in LOOPBACK or host.startswith("127."):
        return
    if not token:
        raise ConfigError(f"REFUSED: --host {host} exposes the market's recommendations beyond "
                          f"this machine; give --token-file FILE (a bearer token) and "
                          f"--tls-cert/--tls-key, or keep the default --host 127.0.0.1")
    if not tls and not plain_http:
        raise ConfigError(f"REFUSED: --host {host} without TLS sends the bearer token in the "
                          f"clear; give --tls-cert/--tls-key (or --plain-http when a proxy in "
                          f"front terminates TLS)")


def serve(state_dir: str, market: str, dataset: str | None, data_dir: str | None,
          host: str = "127.0.0.1", port: int = 8080, tls_cert: str = "", tls_key: str = "",
          token_file: str = "", plain_http: bool = False, poll_seconds: float = 1.0,
          threads: int = 1) -> int:
    """Run the service until SIGINT/SIGTERM; returns the exit code."""
    import uvicorn  # noqa: PLC0415

    check_market_name(market)
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    for f in (tls_cert, tls_key):
        if f and not Path(f).is_file():
            raise ConfigError(f"TLS file {f} does not exist")
    if not Path(state_dir).is_dir():
        raise ConfigError(f"--state-dir {state_dir} is not a directory")
    token = read_token(token_file) if token_file else None
    check_exposure(host, token, bool(tls_cert), plain_http)
    if threads > 0:
        torch.set_num_threads(threads)
    metrics = Metrics(market)
    store = ModelStore(state_dir, market, dataset, data_dir, poll_seconds, metrics.on_load)
    app = middleware(create_app(store, metrics), metrics, token)
    store.start()
    scheme = "https" if tls_cert else "http"
    log.warning("market %s: serving on %s://%s:%d (model file %s)%s", market, scheme, host,
                port, store.path, ", bearer token required" if token else "")
    config = uvicorn.Config(app, host=host, port=port, ssl_certfile=tls_cert or None,
                            ssl_keyfile=tls_key or None, log_level="warning", access_log=False,
                            server_header=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    finally:
        store.stop()
    return 0
