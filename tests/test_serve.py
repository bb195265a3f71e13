"""The market's recommendation service (``storefed serve``, client/serve.py) as a real process
on 127.0.0.1, driven with a real HTTP client (httpx): readiness before and after the first
model, known and cold users, the batch form, every kind of bad input, /metrics, the same ranking
as the node's evaluation, a new round picked up without a failed request, the bearer token and
TLS, the page in a real headless Chromium, and (slow) a TLS + node-auth federation of three
markets whose served round moves from 1 to 2 under a steady stream of requests.

The market's node runs in the test process (``Rounds``): it trains on the synthetic market and
writes the serving file exactly as a SuperNode's client app does after each evaluation. Every
service process is stopped by PID in its fixture's teardown (also when a test fails).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from storefed.shared.checkpoint import atomic_write_bytes
from storefed.shared.config import RunConfig
from storefed.shared.model import encoder_state
from storefed.shared.node import MarketNode, initial_encoder, split_scores
from storefed.shared.serving_state import load_serving, serving_path, write_node_serving
from storefed.simulations.experiments.bench_serve import ServiceProcess

MARKET = "m0"
CFG = {"dataset": "synthetic", "embedding-dim": 16, "local-epochs": 1, "torch-threads": 1}


class Rounds:
    """The market's node, producing one round after another into ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        cfg = RunConfig.from_mapping({**RunConfig().to_mapping(), **CFG}, source="test")
        self.node = MarketNode(cfg, MARKET, state_dir)
        self.encoder = initial_encoder(cfg, self.node.catalog)
        self.round = 0
        self.path = serving_path(state_dir, MARKET)

    def next(self) -> str:
        """Train a round, evaluate it (as the client app does) and write the serving file."""
        self.round += 1
        self.node.train_round(self.encoder, self.round)
        self.encoder = encoder_state(self.node.model)  # as if the sum of one market
        self.node.evaluate(self.encoder, "test")
        assert write_node_serving(self.node, self.round) == self.path
        return load_serving(self.path, MARKET).version

    def known_items(self, user: str) -> set[str]:
        s, ids = self.node.split, self.node.catalog.item_ids
        u = s.user_ids.index(user)
        items = {ids[i] for i in s.train_items[s.train_users == u]}
        r = int(np.flatnonzero(s.test.users == u)[0])
        return items | {ids[s.valid.candidates[r, 0]], ids[s.test.candidates[r, 0]]}


def _wait_round(client: httpx.Client, round_: int, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get("/healthz")
        if r.status_code == 200 and r.json()["model"]["round"] >= round_:
            return r.json()
        time.sleep(0.1)
    raise AssertionError(f"round {round_} never served: {r.status_code} {r.text}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    state = root / "state"
    state.mkdir()
    rounds = Rounds(state)
    svc = ServiceProcess(state, MARKET, "synthetic", extra=["--poll", "0.2"])
    try:
        svc.start()
        svc.wait_listening()
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            yield svc, rounds, client
    finally:
        svc.stop()
        assert svc.proc is not None and svc.proc.poll() is not None


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == code and body["detail"], body
    return body


# --------------------------------------------------------------------------- API
def test_healthz_is_503_until_a_model_is_loaded(served):
    svc, rounds, client = served
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    _error(client.get("/v1/recommend", params={"user": "m0_u0001"}), 503, "not_ready")
    version = rounds.next()
    doc = _wait_round(client, 1)
    assert doc["status"] == "ok" and doc["market"] == MARKET
    assert doc["model"] == {"round": 1, "version": version}


def test_known_user_gets_top_k_without_what_they_have(served):
    _, rounds, client = served
    user = "m0_u0007"
    r = client.get("/v1/recommend", params={"user": user, "k": 15})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["market"] == MARKET and doc["user"] == user
    assert doc["model"]["round"] == rounds.round
    items = [it["item"] for it in doc["items"]]
    assert len(items) == 15 == len(set(items))
    assert not set(items) & rounds.known_items(user)
    market_items = {rounds.node.catalog.item_ids[i] for i in rounds.node.split.items}
    assert set(items) <= market_items
    scores = [it["score"] for it in doc["items"]]
    assert scores == sorted(scores, reverse=True)
    cat = rounds.node.catalog
    for it in doc["items"]:
        g = cat.index_of()[it["item"]]
        assert it["category"] == cat.categories[int(cat.item_category[g])]
    # the default k is 10, and it is the head of the longer list
    short = client.get("/v1/recommend", params={"user": user}).json()
    assert [it["item"] for it in short["items"]] == items[:10]


def test_cold_user_history_names_unknown_items_and_ranks_with_the_rest(served):
    _, rounds, client = served
    ids = rounds.node.catalog.item_ids
    history = [ids[i] for i in rounds.node.split.items[:3]]
    base = client.post("/v1/recommend", json={"history": history, "k": 10})
    assert base.status_code == 200, base.text
    assert "unknown_items" not in base.json() and base.json()["user"] is None
    r = client.post("/v1/recommend", json={"history": [history[0], "no-such-item", *history[1:],
                                                       "../../etc/passwd"],
                                           "k": 10, "exclude": [ids[5], "nope"]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["unknown_items"] == ["no-such-item", "../../etc/passwd"]
    assert doc["unknown_exclude"] == ["nope"]
    got = [it["item"] for it in doc["items"]]
    assert not set(got) & {*history, ids[5]}
    # the unknown ids changed nothing: the same ranking as the known history alone, minus ids[5]
    want = [it["item"] for it in client.post(
        "/v1/recommend", json={"history": history, "k": 11}).json()["items"] if it["item"] !=
        ids[5]][:10]
    assert got == want
    # an empty history is a user with no history: scored, not refused
    empty = client.post("/v1/recommend", json={"history": [], "k": 5})
    assert empty.status_code == 200 and len(empty.json()["items"]) == 5


def test_batch_answers_each_entry(served):
    _, _, client = served
    r = client.post("/v1/recommend/batch", json={"k": 4, "requests": [
        {"user": "m0_u0003"}, {"user": "ghost"}, {"history": ["i0001", "zzz"]}]})
    assert r.status_code == 200, r.text
    known, ghost, cold = r.json()["results"]
    single = client.get("/v1/recommend", params={"user": "m0_u0003", "k": 4}).json()
    assert known["items"] == single["items"]
    assert ghost["status"] == 404 and ghost["error"] == "unknown_user" and "items" not in ghost
    assert cold["unknown_items"] == ["zzz"] and len(cold["items"]) == 4
    alone = client.post("/v1/recommend", json={"history": ["i0001"], "k": 4}).json()
    assert [it["item"] for it in cold["items"]] == [it["item"] for it in alone["items"]]


BIG = json.dumps({"history": ["i0001"] * 400_000})


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), [
    ("GET", "/v1/recommend?user=nobody", None, 404, "unknown_user"),
    ("GET", "/v1/recommend?user=m0_u0001&k=0", None, 400, "bad_k"),
    ("GET", "/v1/recommend?user=m0_u0001&k=501", None, 400, "bad_k"),
    ("GET", "/v1/recommend?user=m0_u0001&k=ten", None, 400, "bad_k"),
    ("GET", "/v1/recommend?user=m0_u0001&k=-3", None, 400, "bad_k"),
    ("GET", "/v1/recommend", None, 400, "bad_request"),
    ("GET", "/v1/recommend?user=m0_u0001&market=m1", None, 400, "wrong_market"),
    ("POST", "/v1/recommend", b'{"history": ["i0001"', 400, "malformed_json"),
    ("POST", "/v1/recommend", b"\xff\xfe", 400, "malformed_json"),
    ("POST", "/v1/recommend", b"[1, 2]", 400, "bad_request"),
    ("POST", "/v1/recommend", b'{"k": 3}', 400, "bad_request"),
    ("POST", "/v1/recommend", b'{"history": "i0001"}', 400, "bad_request"),
    ("POST", "/v1/recommend", b'{"history": [{"a": 1}]}', 400, "bad_request"),
    ("POST", "/v1/recommend", b'{"history": [], "k": 1e9}', 400, "bad_k"),
    ("POST", "/v1/recommend", b'{"history": [], "k": true}', 400, "bad_k"),
    ("POST", "/v1/recommend", b'{"history": [], "market": "m1"}', 400, "wrong_market"),
    ("POST", "/v1/recommend", BIG.encode(), 413, "too_large"),
    ("POST", "/v1/recommend/batch", b'{"requests": []}', 400, "bad_request"),
    ("POST", "/v1/recommend/batch", b'{"requests": [{"user": "a", "history": []}]}', 400,
     "bad_request"),
    ("POST", "/v1/recommend/batch",
     json.dumps({"requests": [{"user": "m0_u0001"}] * 257}).encode(), 413, "too_large"),
    ("GET", "/v1/users?limit=0", None, 400, "bad_request"),
    ("DELETE", "/v1/recommend", None, 405, "method_not_allowed"),
    ("GET", "/v1/nothing", None, 404, "not_found"),
])
def test_bad_input_gets_a_json_error_never_a_500(served, method, path, body, status, code):
    _, _, client = served
    r = client.request(method, path, content=body)
    doc = _error(r, status, code)
    if code == "unknown_user":
        assert doc["examples"] and all(u.startswith("m0_u") for u in doc["examples"])
        assert "history" in doc["detail"]  # the hint: a cold user is a POST with a history


@pytest.mark.parametrize("raw", [
    "/../m1/serving.pt", "/..%2fm1%2fserving.pt", "/%2e%2e/%2e%2e/etc/passwd",
    "/v1/recommend/..%2f..%2fm0%2fserving.pt", "/serving.pt", "/m0/serving.pt",
    "/v1/recommend?user=..%2fm1%2fserving.pt", "/static/../../etc/passwd",
])
def test_no_path_reads_a_file(served, raw):
    svc, _, _ = served
    with httpx.Client(timeout=10) as c:  # sent as written, not normalised by the client
        r = c.send(c.build_request("GET", httpx.URL(svc.url + raw)))
    assert r.status_code == 404, (raw, r.status_code, r.text[:200])
    assert r.json()["error"] in ("not_found", "unknown_user")
    assert b"storefed-serving" not in r.content and b"root:" not in r.content


def test_ranking_equals_the_evaluation(served):
    """For the test users, the service ranks each user's evaluation candidates (held-out
    positive + 99 negatives, history = the evaluation's input) as the node's evaluation does."""
    _, rounds, client = served
    node = rounds.node
    ev, ids = node.split.test, node.catalog.item_ids
    evaluated = split_scores(node.model, node.split, "test", node.device, node._knn)
    pad = node.catalog.pad_index
    assert client.get("/healthz").json()["model"]["round"] == rounds.round
    checked = 0
    for r in range(0, len(ev.users), 7):
        history = [ids[i] for i in ev.histories[r] if i != pad]
        cands = [ids[i] for i in ev.candidates[r]]
        resp = client.post("/v1/recommend", json={"history": history, "candidates": cands,
                                                  "k": len(cands)})
        assert resp.status_code == 200, resp.text
        served_items = resp.json()["items"]
        assert len(served_items) == len(cands)
        want = dict(zip(cands, evaluated[r].tolist(), strict=True))
        got = [it["item"] for it in served_items]
        # same scores (float32 noise only) ...
        np.testing.assert_allclose([it["score"] for it in served_items],
                                   [want[i] for i in got], rtol=1e-5, atol=1e-4)
        # ... and the same order: the evaluation's scores in the service's order never go up
        # (beyond a tie), and the held-out positive lands on the same rank
        seq = [want[i] for i in got]
        assert all(b <= a + 1e-5 for a, b in zip(seq, seq[1:], strict=False)), r
        pos_rank = got.index(cands[0])
        assert pos_rank == int((evaluated[r] > evaluated[r, 0] + 1e-5).sum()), r
        checked += 1
    assert checked >= 20


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or ("/usr/bin/chromium"
                                           if os.path.exists("/usr/bin/chromium") else None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists(
        "/usr/bin/chromedriver") else None)
    return (browser, driver) if browser and driver else None


def test_page_in_a_headless_browser(served):
    found = _chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: chromium + chromium-driver are not "
                        "installed (simulations/setup.sh installs them as root)")
        pytest.skip("chromium and chromedriver (Debian: apt-get install chromium "
                    "chromium-driver) are not installed on this machine")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    svc, rounds, client = served
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(svc.url + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
        assert f"round {rounds.round}" in driver.find_element(By.ID, "status").text
        user = driver.find_element(By.ID, "user").get_attribute("value")
        assert user == "m0_u0000"  # the first of the market's users, picked for us

        def rows() -> list[list[str]]:
            return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                    for tr in driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")]

        driver.find_element(By.ID, "go-user").click()
        wait.until(lambda d: len(rows()) == 10)
        api = client.get("/v1/recommend", params={"user": user, "k": 10}).json()["items"]
        assert [r[1] for r in rows()] == [it["item"] for it in api]
        assert [r[2] for r in rows()] == [it["category"] for it in api]
        assert [float(r[3]) for r in rows()] == pytest.approx([it["score"] for it in api],
                                                              abs=1e-4)
        # a cold user: a typed history, with an unknown id named
        driver.find_element(By.ID, "history").send_keys("i0001, i0002 not-an-item")
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys("5")
        driver.find_element(By.ID, "go-history").click()
        wait.until(lambda d: "not-an-item" in d.find_element(By.ID, "note").text)
        api = client.post("/v1/recommend", json={"history": ["i0001", "i0002"], "k": 5}).json()
        assert [r[1] for r in rows()] == [it["item"] for it in api["items"]]
        # an unknown user: the error and the example ids are shown
        field = driver.find_element(By.ID, "user")
        field.clear()
        field.send_keys("nobody-here")
        driver.find_element(By.ID, "go-user").click()
        wait.until(lambda d: "unknown_user" in d.find_element(By.ID, "error").text)
        assert "m0_u0000" in driver.find_element(By.ID, "error").text
        assert not driver.find_element(By.ID, "results").is_displayed()
    finally:
        driver.quit()


def test_metrics_count_requests_latency_and_round(served):
    _, rounds, client = served
    for _ in range(3):
        client.get("/v1/recommend", params={"user": "m0_u0002"})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    ok = 'storefed_serve_requests_total{endpoint="/v1/recommend",method="GET",status="200"}'
    assert values[ok] >= 3
    assert values['storefed_serve_requests_total{endpoint="/v1/recommend",method="GET",'
                  'status="404"}'] >= 1
    assert values[f'storefed_serve_model_round{{market="{MARKET}"}}'] == rounds.round
    assert values['storefed_serve_request_seconds_count{endpoint="/v1/recommend"}'] >= 3
    assert 'storefed_serve_request_seconds_bucket{endpoint="/v1/recommend",le="0.01"}' in values
    assert values['storefed_serve_model_loads_total{result="ok"}'] >= 1
    assert not [n for n in values if n.startswith("storefed_serve_requests_total")
                and 'status="5' in n and not n.endswith('status="503"}')], "a 5xx was served"


def _stream(client: httpx.Client, stop: threading.Event, seen: list[tuple[int, int | None]],
            user: str = "m0_u0004", every: float = 0.0) -> None:
    while not stop.is_set():
        try:
            r = client.get("/v1/recommend", params={"user": user, "k": 10})
            rnd = r.json()["model"]["round"] if r.status_code == 200 else None
            seen.append((r.status_code, rnd))
        except httpx.HTTPError as exc:  # a refused or dropped connection is a failure too
            seen.append((-1, repr(exc)))  # type: ignore[arg-type]
        if every:
            time.sleep(every)


def test_a_new_round_is_served_without_a_restart_or_a_failed_request(served):
    svc, rounds, client = served
    before = client.get("/healthz").json()["model"]
    seen: list[tuple[int, int | None]] = []
    stop = threading.Event()
    with httpx.Client(base_url=svc.url, timeout=30) as c:
        t = threading.Thread(target=_stream, args=(c, stop, seen))
        t.start()
        try:
            time.sleep(0.5)
            version = rounds.next()  # the node writes round 2 while requests keep coming
            _wait_round(client, before["round"] + 1)
            time.sleep(0.5)
        finally:
            stop.set()
            t.join(timeout=30)
    assert seen and all(s == 200 for s, _ in seen), [x for x in seen if x[0] != 200][:5]
    served_rounds = [r for _, r in seen]
    assert served_rounds[0] == before["round"] and served_rounds[-1] == before["round"] + 1
    assert served_rounds == sorted(served_rounds)  # never back to an older model
    now = client.get("/healthz").json()["model"]
    assert now == {"round": before["round"] + 1, "version": version} and version != \
        before["version"]
    assert svc.proc is not None and svc.proc.poll() is None  # the same process


def test_a_corrupt_serving_file_keeps_the_last_model(served):
    svc, rounds, client = served
    current = client.get("/healthz").json()["model"]
    atomic_write_bytes(rounds.path, b"not a checkpoint")
    end = time.monotonic() + 20
    while "result=\"failed\"" not in client.get("/metrics").text:
        assert time.monotonic() < end, "the corrupt file was never looked at"
        time.sleep(0.1)
    assert client.get("/healthz").json()["model"] == current
    assert client.get("/v1/recommend", params={"user": "m0_u0001"}).status_code == 200
    rounds.next()  # the next good round is picked up
    assert _wait_round(client, current["round"] + 1)["model"]["round"] == current["round"] + 1


# --------------------------------------------------------------------------- exposure
def test_token_and_tls(served, tmp_path):
    from storefed.simulations.deploy import generate_ca, generate_server_cert

    svc0, rounds, _ = served
    state = tmp_path / "state"
    (state / MARKET).mkdir(parents=True)
    shutil.copy(rounds.path, state / MARKET / "serving.pt")
    ca_crt, ca_key = generate_ca(tmp_path / "pki")
    crt, key = generate_server_cert(tmp_path / "pki", ca_crt, ca_key)
    token = "s3cret-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    svc = ServiceProcess(state, MARKET, "synthetic", extra=[
        "--tls-cert", str(crt), "--tls-key", str(key), "--token-file", str(tmp_path / "token")])
    try:
        svc.start()
        svc.wait_listening()
        assert svc.url.startswith("https://")
        with httpx.Client(base_url=svc.url, verify=ssl.create_default_context(cafile=str(ca_crt)),
                          timeout=30) as c:
            end = time.monotonic() + 120
            while c.get("/healthz").status_code != 200:  # open: load balancers probe it
                assert time.monotonic() < end
                time.sleep(0.2)
            q = {"user": "m0_u0001"}
            _error(c.get("/v1/recommend", params=q), 401, "unauthorized")
            _error(c.get("/v1/recommend", params=q, headers={"Authorization": "Bearer nope"}),
                   401, "unauthorized")
            _error(c.get("/metrics"), 401, "unauthorized")
            auth = {"Authorization": f"Bearer {token}"}
            r = c.get("/v1/recommend", params=q, headers=auth)
            assert r.status_code == 200 and len(r.json()["items"]) == 10
            assert c.get("/metrics", headers=auth).status_code == 200
        with httpx.Client(timeout=10) as plain, pytest.raises(httpx.HTTPError):
            plain.get(f"http://127.0.0.1:{svc.port}/healthz")  # no plain HTTP on that port
    finally:
        svc.stop()


def test_refuses_a_non_loopback_host_without_token_or_tls(tmp_path, capsys):
    from storefed.simulations.cli import main

    (tmp_path / MARKET).mkdir()
    base = ["serve", "--state-dir", str(tmp_path), "--market", MARKET, "--port", "9"]
    assert main([*base, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "REFUSED" in err and "--token-file" in err
    (tmp_path / "token").write_text("x" * 20)
    assert main([*base, "--host", "0.0.0.0", "--token-file", str(tmp_path / "token")]) == 2
    assert "--tls-cert" in capsys.readouterr().err
    assert main([*base, "--market", "../m1"]) == 2  # a market is one folder name, no path
    assert "--market" in capsys.readouterr().err


# --------------------------------------------------------------------------- deployment
@pytest.mark.slow
def test_served_round_moves_during_a_tls_federation(tmp_path):
    """Three markets (the private defaults' minimum sum) on a real SuperLink with TLS and
    SuperNode authentication run 2 SecAgg+ rounds; market m0's service answers a steady stream
    of requests the whole time: its round goes 1 -> 2 and no request fails."""
    from storefed.simulations.cluster import LocalCluster

    markets = ["m0", "m1", "m2"]
    state = tmp_path / "state"
    values = {**CFG, "markets": ",".join(markets), "num-rounds": 2, "secagg": True,
              "out-dir": str(tmp_path / "out")}
    c = LocalCluster(tmp_path)  # the markets' own (private) default policy
    svc = ServiceProcess(state, "m0", "synthetic", extra=["--poll", "0.2"],
                         log_path=tmp_path / "serve.log")
    result: list[object] = []
    try:
        c.make_certs()
        c.start_superlink()
        c.start_nodes(markets, state, dataset="synthetic")
        state.mkdir(exist_ok=True)
        svc.start()
        svc.wait_listening()

        def federate() -> None:
            try:
                result.append(c.run(values, 900))
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                result.append(exc)

        run = threading.Thread(target=federate)
        run.start()
        try:
            first = svc.wait_ready(timeout=900)
        except Exception:
            run.join(timeout=900)
            raise AssertionError(f"no round was ever served: {result}\n{svc.log_tail()}\n"
                                 f"{c.log_tail('node-m0')}") from None
        assert first["model"]["round"] == 1
        seen: list[tuple[int, int | None]] = []
        stop = threading.Event()
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            stream = threading.Thread(target=_stream, args=(client, stop, seen, "m0_u0004",
                                                            0.05))
            stream.start()
            try:
                run.join(timeout=900)
                end = time.monotonic() + 60
                while not (seen and seen[-1][1] == 2) and time.monotonic() < end:
                    time.sleep(0.2)
                time.sleep(1.0)
            finally:
                stop.set()
                stream.join(timeout=30)
        assert result and isinstance(result[0], tuple), result
        assert result[0][1] == "finished:completed", result
        assert len(seen) >= 20, seen
        assert all(s == 200 for s, _ in seen), [x for x in seen if x[0] != 200][:5]
        rounds_seen = [r for _, r in seen]
        assert rounds_seen[0] == 1 and rounds_seen[-1] == 2, sorted(set(rounds_seen))
        assert rounds_seen == sorted(rounds_seen)
        # what is served is what the node wrote after round 2, the round the server finished
        snap = load_serving(serving_path(state, "m0"), "m0")
        assert snap.round == 2
        from storefed.shared.checkpoint import load_encoder

        final = load_encoder(tmp_path / "out" / "encoder.pt")
        assert final.round == 2
        assert all(torch.equal(final.state[k], snap.encoder[k]) for k in final.state)
    finally:
        svc.stop()
        c.close()
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"
