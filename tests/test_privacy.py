"""What an honest-but-curious server learns: it follows the SecAgg+ protocol and reads every
value it receives. The test plays that server over real rounds (the real ServerApp loop and
the real ClientApp through ``FakeGrid``) with three markets on data where some items are sold
in one market only, and checks that nothing it holds (any row of a decoded sum, any weight,
any plaintext field of any reply, listed generically from the messages) equals or determines
one market's own contribution, exactly or up to a scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

import storefed.client.secagg as client_secagg
import storefed.server.secagg as server_secagg
from storefed.client.client_app import make_app
from storefed.shared.config import RunConfig
from storefed.shared.data import load_catalog
from storefed.shared.errors import ConfigError
from storefed.shared.node import MarketNode, initial_encoder
from storefed.shared.policy import (
    LEDGER_FILE,
    PolicyRefusedError,
    PrivacyLedger,
    PrivacyPolicy,
    load_policy,
    write_policy,
)
from storefed.shared.secagg import MESSAGE_TYPE, RECORD, check_coefficients
from storefed.shared.wire import ROWWISE_KEY, WEIGHT_PREFIX
from tests.test_secagg import FakeGrid

MARKETS = ("aa", "bb", "cc")
#: a decoded row within this relative distance of a scaled copy of one market's row is that
#: market's row up to the fixed-point grid and float32 rounding
EXACT = 1e-3


def write_exclusive_market_data(root: Path, seed: int = 0) -> Path:
    """XMarket-format files for three markets sharing 40 items, each also selling 12 items
    that no other market sells."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shared = [f"S{i:03d}" for i in range(40)]
    for m in MARKETS:
        own = [f"X{m}{i:02d}" for i in range(12)]
        lines = ["userId itemId rate date"]
        for u in range(30):
            picks = list(rng.choice(shared, 6, replace=False)) + list(rng.choice(own, 3,
                                                                                replace=False))
            rng.shuffle(picks)
            for d, item in enumerate(picks):
                lines.append(f"U{m}{u:03d} {item} 5.0 2020-01-{d + 1:02d}")
        (root / f"{m}_5core.txt").write_text("\n".join(lines) + "\n")
    return root


def _facts(update: dict[str, np.ndarray], n_train: float, loss: float) -> np.ndarray:
    """Every number of a market's own contribution (its weighted deltas and weights) and its
    private training figures, as one sorted float64 array (zeros left out)."""
    parts = [np.asarray(v, dtype=np.float64).ravel() for v in update.values()]
    parts.append(np.asarray([n_train, loss], dtype=np.float64))
    flat = np.concatenate(parts)
    flat = flat[flat != 0]
    return np.unique(np.concatenate([flat, flat.astype(np.float32).astype(np.float64)]))


def _hits(values: np.ndarray, facts: np.ndarray) -> np.ndarray:
    """The entries of ``values`` equal (relative 1e-9) to one of ``facts``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v != 0)]
    if v.size == 0 or facts.size == 0:
        return v[:0]
    idx = np.clip(np.searchsorted(facts, v), 1, facts.size - 1)
    near = np.minimum(np.abs(facts[idx] - v), np.abs(facts[idx - 1] - v))
    return v[near <= 1e-9 * np.abs(v)]


def _plaintext_numbers(reply) -> list[tuple[str, np.ndarray]]:
    """Every number a reply carries, by record and key, whatever the record is called."""
    out: list[tuple[str, np.ndarray]] = []
    for name, rec in reply.content.array_records.items():
        for k, arr in rec.items():
            out.append((f"{name}/{k}", arr.numpy().astype(np.float64).ravel()))
    for name, rec in reply.content.metric_records.items():
        for k, v in rec.items():
            out.append((f"{name}/{k}", np.asarray(v, dtype=np.float64).ravel()))
    for name, rec in reply.content.config_records.items():
        for k, v in rec.items():
            vals = v if isinstance(v, list) else [v]
            nums = [float(x) for x in vals if isinstance(x, int | float)
                    and not isinstance(x, bool)]
            if nums:
                out.append((f"{name}/{k}", np.asarray(nums, dtype=np.float64)))
    return out


def _row_leaks(summed: dict[str, np.ndarray], update: dict[str, np.ndarray],
               ) -> list[tuple[str, int, float]]:
    """Rows of the decoded sum that are a scaled copy of this market's (non-zero) row:
    (key, row, relative residual). Vectors of one value are compared exactly (scale 1)."""
    leaks = []
    for k, c in update.items():
        if k not in summed or np.asarray(summed[k]).shape != np.asarray(c).shape:
            continue
        s = np.asarray(summed[k], dtype=np.float64)
        c = np.asarray(c, dtype=np.float64)
        s2 = s.reshape(s.shape[0], -1) if s.ndim >= 2 else s.reshape(1, -1)
        c2 = c.reshape(c.shape[0], -1) if c.ndim >= 2 else c.reshape(1, -1)
        if s2.shape[1] == 1:  # scalars per row (weights): equal, with the market's own scale
            for r in np.flatnonzero(c2[:, 0] != 0):
                if abs(s2[r, 0] - c2[r, 0]) <= 1e-6 * abs(c2[r, 0]):
                    leaks.append((k, int(r), 0.0))
            continue
        cc = (c2 * c2).sum(1)
        for r in np.flatnonzero(cc > 0):
            alpha = float(s2[r] @ c2[r]) / float(cc[r])
            res = float(np.linalg.norm(s2[r] - alpha * c2[r]) / max(np.linalg.norm(s2[r]),
                                                                     1e-300))
            if res < EXACT:
                leaks.append((k, int(r), res))
    return leaks


def play_curious_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rounds: int = 2,
                        **extra: object) -> dict[str, object]:
    """Run ``rounds`` SecAgg+ rounds over three markets; return what the server held and what
    each market contributed."""
    data = write_exclusive_market_data(tmp_path / "data")
    contributions: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    private: dict[tuple[str, int], tuple[float, float]] = {}
    current: dict[str, object] = {}
    real_train, real_encode, real_decode = (MarketNode.train_round, client_secagg.encode,
                                            server_secagg.decode)

    def train_spy(self, glob, rnd, *a, **kw):
        update, metrics = real_train(self, glob, rnd, *a, **kw)
        current["key"] = (self.market, rnd)
        private[(self.market, rnd)] = (float(metrics["num-examples"]),
                                       float(metrics["train-loss"]))
        return update, metrics

    def encode_spy(update, *a, **kw):
        contributions[current["key"]] = {k: np.array(v, copy=True) for k, v in update.items()}
        return real_encode(update, *a, **kw)

    decoded: list[dict[str, np.ndarray]] = []

    def decode_spy(*a, **kw):
        out = real_decode(*a, **kw)
        decoded.append({k: np.array(v, copy=True) for k, v in out.items()})
        return out

    monkeypatch.setattr(MarketNode, "train_round", train_spy)
    monkeypatch.setattr(client_secagg, "encode", encode_spy)
    monkeypatch.setattr(server_secagg, "decode", decode_spy)
    overrides = {"dataset": "xmarket", "data-dir": str(data), "markets": ",".join(MARKETS),
                 "embedding-dim": 8, "local-epochs": 1, "device": "cpu", "num-rounds": rounds,
                 "secagg": True, "torch-threads": 1, "item-knn": False, "batch-size": 32,
                 "out-dir": str(tmp_path / "out"), "state-dir": str(tmp_path / "state"),
                 **extra}
    cfg = RunConfig.from_mapping(overrides)
    grid = FakeGrid(make_app(overrides), len(MARKETS), overrides)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)
    return {"grid": grid, "decoded": decoded, "contributions": contributions,
            "private": private}


def test_honest_but_curious_server_learns_no_single_market(tmp_path, monkeypatch):
    seen = play_curious_server(tmp_path, monkeypatch)
    contributions = seen["contributions"]
    decoded = seen["decoded"]
    assert len(decoded) == 2 and len(contributions) == 6  # 2 rounds x 3 markets, all summed
    # the data has teeth: some item rows carry training signal from one market only
    rows_by_market = {}
    for (m, _), u in contributions.items():
        counts = np.abs(u[ROWWISE_KEY]).sum(1) if u[ROWWISE_KEY].ndim == 2 else None
        rows_by_market.setdefault(m, set()).update(np.flatnonzero(counts).tolist())
    positives = {m: set() for m in MARKETS}
    for (m, _), u in contributions.items():
        w = u.get(WEIGHT_PREFIX + ROWWISE_KEY)
        if w is not None and w.size > 1:
            positives[m].update(np.flatnonzero(w).tolist())
    problems: list[str] = []
    for rnd, summed in enumerate(decoded, start=1):
        for m in MARKETS:
            update = contributions[(m, rnd)]
            for k, r, res in _row_leaks(summed, update)[:3]:
                problems.append(f"round {rnd}: decoded {k}[{r}] is market {m}'s own row "
                                f"(residual {res:.1e})")
            facts = _facts(update, *seen["private"][(m, rnd)])
            for k, v in summed.items():
                hit = _hits(v, facts)
                if hit.size:
                    problems.append(f"round {rnd}: decoded {k} holds {hit.size} of market "
                                    f"{m}'s own values (e.g. {hit[0]:g})")
    facts_all = {m: np.unique(np.concatenate([_facts(contributions[(m, r)],
                                                     *seen["private"][(m, r)])
                                              for r in (1, 2)])) for m in MARKETS}
    for reply in seen["grid"].received:
        if reply.has_error():
            continue
        for where, values in _plaintext_numbers(reply):
            for m in MARKETS:
                hit = _hits(values, facts_all[m])
                if hit.size:
                    problems.append(f"reply field {where} carries market {m}'s own value "
                                    f"{hit[0]:g}")
    assert not problems, "\n".join(sorted(set(problems))[:12])


def test_every_released_row_sums_every_market(tmp_path, monkeypatch):
    """The property the README states: with negatives from the public catalog every market's
    update moves every item row, so no released row is one market's alone (the smallest
    distance of a decoded row from a scaled copy of one market's row is reported)."""
    seen = play_curious_server(tmp_path, monkeypatch, rounds=1)
    summed = seen["decoded"][0]
    nonzero = [np.abs(u[ROWWISE_KEY]).sum(1) > 0 for (_, _), u in
               seen["contributions"].items()]
    trained = np.sum(nonzero, axis=0)
    n_items = trained.size - 1  # the last row is padding and never moves
    assert np.all(trained[:n_items] == len(MARKETS))
    assert float(np.abs(summed[ROWWISE_KEY][n_items]).max()) == 0.0


# ---------------------------------------------------------------------------- the market's policy
def _policy(tmp_path: Path, markets: list[str], **rules: object) -> None:
    for m in markets:
        write_policy(tmp_path / "state" / m, PrivacyPolicy(**rules))  # type: ignore[arg-type]


def _client_call(tmp_path: Path, message_type: str, run_config: dict[str, object],
                 state: RecordDict | None = None) -> Message:
    cfg = RunConfig.from_mapping({**SECAGG_BASE, **run_config})
    glob = initial_encoder(cfg, load_catalog(cfg.dataset, None, seed=cfg.seed))
    app = make_app({**SECAGG_BASE, **run_config})
    msg = Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=glob),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=1, message_type=message_type)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                  state=state if state is not None else RecordDict(), run_config={})
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return app(msg, ctx)


SECAGG_BASE = {"embedding-dim": 8, "local-epochs": 1, "device": "cpu", "markets": "m0,m1,m2",
               "torch-threads": 1}


def test_default_policy_refuses_plain_train_and_a_plain_run(tmp_path, caplog):
    base = {"state-dir": str(tmp_path / "state")}
    with pytest.raises(PolicyRefusedError, match="secure-aggregation-only"):
        _client_call(tmp_path, MessageType.TRAIN, base)  # secagg run, plain train message
    with pytest.raises(PolicyRefusedError, match="secagg = false"):
        _client_call(tmp_path, MessageType.TRAIN, {**base, "secagg": False})
    with pytest.raises(PolicyRefusedError, match="secagg = false"):
        _client_call(tmp_path, MessageType.EVALUATE, {**base, "secagg": False})
    assert "refus" in caplog.text
    # the market's own policy (its state directory), not the run config, lets it out
    _policy(tmp_path, ["m0"], secure_aggregation_only=False)
    reply = _client_call(tmp_path, MessageType.TRAIN, {**base, "secagg": False})
    assert not reply.has_error() and "arrays" in reply.content.array_records
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.from_mapping({"secure-aggregation-only": False})  # not a run-config key


def test_policy_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("min-markets = 1\n")
    with pytest.raises(ConfigError, match="min-markets"):
        load_policy({"privacy-policy": str(bad)}, None)
    bad.write_text("min-marketz = 3\n")
    with pytest.raises(ConfigError, match=r"p\.toml.*min-marketz"):
        load_policy({"privacy-policy": str(bad)}, None)
    with pytest.raises(ConfigError, match="no file"):
        load_policy({"privacy-policy": str(tmp_path / "missing.toml")}, None)
    good = PrivacyPolicy(min_markets=4, dp_noise=1.0, dp_clip=0.5, epsilon_budget=8.0)
    path = write_policy(tmp_path / "m", good)
    assert load_policy({}, tmp_path / "m") == good and path.name == "policy.toml"


def _lie_about(field: str, value: object):
    """A client mod that plays a deviating server: rewrites one field of every masked-upload
    request before the client reads it."""

    def mod(msg, ctx, call_next):
        if msg.metadata.message_type == MESSAGE_TYPE:
            rec = msg.content.config_records[RECORD]
            if rec["stage"] == "masked-upload":
                rec[field] = value
        return call_next(msg, ctx)

    return mod


def _run(tmp_path: Path, markets: list[str], mods=None, **extra: object):
    overrides = {**SECAGG_BASE, "markets": ",".join(markets), "num-rounds": 1, "secagg": True,
                 "out-dir": str(tmp_path / "out"), "state-dir": str(tmp_path / "state"),
                 **extra}
    cfg = RunConfig.from_mapping(overrides)
    grid = FakeGrid(make_app(overrides, mods=mods), len(markets), overrides)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return server_secagg.run_server_secagg(grid, Context(1, 0, {}, RecordDict(), {}), cfg)


def test_noise_floor_holds_when_the_server_announces_more_markets(tmp_path, monkeypatch):
    stds: list[float] = []
    real = client_secagg.privatize

    def spy(local, glob, clip, std, rng):
        stds.append(std)
        return real(local, glob, clip, std, rng)

    monkeypatch.setattr(client_secagg, "privatize", spy)
    markets = ["m0", "m1", "m2"]
    _policy(tmp_path, markets, dp_noise=1.0, dp_clip=0.5)
    # the run asks for no noise at all, and the server claims 1000 markets take part
    doc = _run(tmp_path, markets, mods=[_lie_about("sampled", 1000)])
    floor = 1.0 * 0.5 / 3 ** 0.5
    assert len(stds) == 3 and min(stds) == pytest.approx(floor)
    assert doc["rounds"][0]["secagg"]["attempts"][-1]["aggregated"] == markets
    # the run's own DP settings, calibrated on the announced count, cannot lower it either
    stds.clear()
    _policy(tmp_path / "b", markets, dp_noise=1.0, dp_clip=0.5)
    _run(tmp_path / "b", markets, mods=[_lie_about("sampled", 1000)],
         **{"dp-noise": 1.0, "dp-clip": 0.5})
    assert min(stds) >= 1.0 * 0.5 / 3 ** 0.5 - 1e-12


def _corrupt_masked_upload(index: int):
    """A malicious market: adds 1 to its masked vector's market counter, and the change's
    share of the integrity check to the check slot (the check is public and linear)."""

    def mod(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        if (msg.metadata.message_type == MESSAGE_TYPE
                and ctx.node_config["partition-id"] == index
                and msg.content.config_records[RECORD]["stage"] == "masked-upload"):
            vec = reply.content.array_records["arrays"]["masked"].numpy().copy()
            vec[0] += np.uint64(1)
            vec[-1] += check_coefficients(vec.shape[0] - 1)[0]
            reply.content.array_records["arrays"] = ArrayRecord({"masked": Array(vec)})
        return reply

    return mod


def test_a_decoded_then_rejected_sum_is_accounted(tmp_path):
    markets = ["m0", "m1", "m2"]
    doc = _run(tmp_path, markets, mods=[_corrupt_masked_upload(1)],
               **{"dp-noise": 1.0, "dp-clip": 0.5})
    rnd = doc["rounds"][0]
    assert rnd["rejected"] and "market counts" in rnd["rejected"][0]["reason"]
    assert doc["privacy"]["releases"] == 1 and 0 < doc["privacy"]["epsilon"] < math.inf
    # and every market's own ledger holds the release too
    for m in markets:
        ledger = json.loads((tmp_path / "state" / m / LEDGER_FILE).read_text())
        assert len(ledger["releases"]) == 1 and ledger["epsilon"] > 0


def test_a_market_whose_budget_is_spent_stops_contributing(tmp_path, caplog):
    markets = ["m0", "m1", "m2", "m3"]
    _policy(tmp_path, markets, dp_noise=1.0, dp_clip=0.5)
    # m3 allows itself one release at this noise (epsilon 4.73 for one, 7.08 for two)
    write_policy(tmp_path / "state" / "m3",
                 PrivacyPolicy(dp_noise=1.0, dp_clip=0.5, epsilon_budget=6.0))
    doc = _run(tmp_path, markets, **{"num-rounds": 3})
    aggregated = [r["secagg"]["attempts"][-1].get("aggregated") for r in doc["rounds"]]
    assert aggregated[0] == markets
    assert aggregated[1] == aggregated[2] == ["m0", "m1", "m2"]
    # its refusals ride on evaluate messages (pipelined masked uploads): it is still evaluated
    assert all("m3" in r["markets"] for r in doc["rounds"])
    ledger = PrivacyLedger.open(tmp_path / "state" / "m3")
    assert len(ledger.releases) == 1 and ledger.epsilon(1e-5) <= 6.0
    assert "privacy budget" in caplog.text
    others = PrivacyLedger.open(tmp_path / "state" / "m0")
    assert len(others.releases) == 3


def test_min_markets_and_threshold_are_the_markets_own(tmp_path, caplog):
    markets = ["m0", "m1", "m2"]
    _policy(tmp_path, markets, min_markets=4)
    doc = _run(tmp_path, markets)
    assert "aggregated" not in doc["rounds"][0]["secagg"]["attempts"][-1]  # nothing summed
    assert "min-markets" in caplog.text
    caplog.clear()
    # a server asking for a threshold of 1 of 3 (one node alone could rebuild a secret)
    doc = _run(tmp_path / "b", markets, mods=[_lie_share_threshold(1)])
    assert "aggregated" not in doc["rounds"][0]["secagg"]["attempts"][-1]
    assert "more than half" in caplog.text


def _lie_share_threshold(t: int):
    def mod(msg, ctx, call_next):
        if msg.metadata.message_type == MESSAGE_TYPE:
            rec = msg.content.config_records[RECORD]
            if rec["stage"] == "share-keys":
                rec["threshold"] = t
        return call_next(msg, ctx)

    return mod


def test_deploy_identity_prints_a_trusted_markets_line(tmp_path, capsys):
    from storefed.shared.identity import load_or_create, load_trusted, public_hex
    from storefed.simulations.cli import main

    assert main(["deploy", "identity", "--state-dir", str(tmp_path), "--market", "de"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    (tmp_path / "trusted-markets.toml").write_text("\n".join(line) + "\n")
    trusted = load_trusted(tmp_path / "trusted-markets.toml")
    assert trusted == {"de": bytes.fromhex(public_hex(load_or_create(tmp_path / "de")))}
    assert (tmp_path / "de" / "identity.key").stat().st_mode & 0o077 == 0
