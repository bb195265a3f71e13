"""Faults in a real deployment: a SuperLink (TLS + SuperNode auth) with three SuperNodes on
127.0.0.1 and one federated run with a short ``round-timeout``, during which

- m2's SuperNode hangs right after it started receiving a round's train message: the process
  started as its SuperNode (``storefed deploy supernode``, which runs the ClientApp) is
  SIGSTOPped, while its Flower child keeps the connection and the heartbeat, so the SuperLink
  still lists the node online and only ``round-timeout`` can end the wait. It is resumed
  (SIGCONT) when the round's evaluation starts;
- two rounds later m1's SuperNode is killed (SIGKILL of its whole process group) at the same
  point of its round - it goes silent, the SuperLink marks it offline 15-20 s later - and is
  restarted at once with the same node key and state directory.

Each faulty round must complete from the two other markets within the round timeout, the run
must finish, and the restarted m1 must continue from the heads it had saved before the kill:
its first post-restart heads are recomputed in the test from the saved heads and the global
encoder of that round (same seeds: bit-for-bit the same training), and must differ from what
freshly initialised heads would have become.

One run serves the three tests (a module-scoped fixture drives it; the tests check its record).
Every process is stopped by PID in the fixture's teardown, also when something fails: stopped
processes are resumed first, the ServerApp (a grandchild of the SuperLink) is stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid.http_grid import HttpGrid

from storefed.server.exchange import send_and_receive
from storefed.server.rounds import go_on_with_online_nodes, prepare_run
from storefed.shared.checkpoint import load_encoder, load_private
from storefed.shared.config import RunConfig
from storefed.shared.node import MarketNode
from storefed.shared.policy import write_policy
from storefed.simulations.cluster import LocalCluster
from storefed.simulations.deploy import DeployError, rounds_written, submit_run, wait_run
from storefed.simulations.simulate import lab_policy
from tests.test_deploy import SMALL, _fail_with_logs, _private_round

MARKETS = ["m0", "m1", "m2"]
HUNG, KILLED = "m2", "m1"
ROUND_TIMEOUT = 20.0  # s: ~1 s per healthy phase on 2 idle cores, ~12 s seen at load 11
ROUNDS = 7  # the killed node needs ~20 s to log in again; it must get rounds to rejoin
SLACK = 8.0  # s on top of the timeout: sampling, pushing, aggregating on a busy machine
DEADLINE = 480.0  # s for the whole run before the fixture gives up (and shows the logs)
# Plain FedAvg in CI; STOREFED_FAULTS_SECAGG=1 runs the same faults under SecAgg+ (each of its
# stages waits up to secagg-timeout, so a faulty round's train phase may take a few timeouts)
SECAGG = os.environ.get("STOREFED_FAULTS_SECAGG") == "1"
VALUES: dict[str, Any] = {**SMALL, "secagg": SECAGG, "num-rounds": ROUNDS,
                          "round-timeout": ROUND_TIMEOUT, "secagg-timeout": ROUND_TIMEOUT}
TRAIN_PHASE_MAX = (3 if SECAGG else 1) * ROUND_TIMEOUT + SLACK


# --------------------------------------------------------------------------- fast checks
@pytest.fixture
def as_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages can be made in this process as if it were the ServerApp (node 0)."""
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class _Link(HttpGrid):
    """Flower's deployment grid, faked: nodes ``online``; ``dead`` ones never reply; pushing
    to a ``refused`` one fails (Flower returns None for its message id)."""

    def __init__(self, online: Iterable[int], dead: Iterable[int] = (),
                 refused: Iterable[int] = ()) -> None:  # no SuperLink connection
        self.online, self.dead, self.refused = list(online), set(dead), set(refused)
        self.pushed: list[Message] = []
        self.replies: dict[str, Message] = {}
        self.asked = 0

    def get_node_ids(self) -> list[int]:
        self.asked += 1
        if self.asked > 5:
            raise RuntimeError("still waiting for nodes")  # ends Flower's endless wait
        return list(self.online)

    def push_messages(self, messages: Iterable[Message]) -> list[Any]:  # str, or None
        ids: list[str | None] = []
        for msg in messages:
            self.pushed.append(msg)
            if msg.metadata.dst_node_id in self.refused:
                ids.append(None)
                continue
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if msg.metadata.dst_node_id not in self.dead:
                self.replies[msg.metadata.message_id] = Message(RecordDict(), reply_to=msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        ids = list(message_ids)
        assert None not in ids, "pulled a message that was never pushed"
        return [self.replies.pop(i) for i in ids if i in self.replies]


def test_messages_expire_with_the_round_timeout_and_a_refused_push_is_no_reply(as_server):
    link = _Link([1, 2, 3, 4], dead=[3], refused=[4])
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2, 3, 4)]
    assert all(m.metadata.ttl == 43200 for m in msgs)  # Flower's default: 12 h
    replies = send_and_receive(link, msgs, timeout=0.3)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(
        m.metadata.message_id for m in msgs[:2])
    for m in link.pushed:  # a message nobody took in time expires on the SuperLink
        assert 0.3 <= m.metadata.ttl < 5.0
    # without a timeout nothing is cut
    link = _Link([1])
    send_and_receive(link, [Message(RecordDict(), dst_node_id=1, message_type="train")])
    assert link.pushed[0].metadata.ttl == 43200


class _Executor:
    """``WarmExecutor`` with the SuperNode's Runtime API faked: ``tokens`` are the tasks it is
    handed; pulling the input of a task named ``stale`` waits until ``release`` is set, as a
    task whose message contents never arrive does (``WarmExecutor.start_task``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tokens: list[str],
                 app_seconds: float = 0.0) -> None:
        import storefed.simulations.deploy_exec as X
        self.release, self.stop = threading.Event(), threading.Event()
        self.done: dict[str, threading.Event] = {t: threading.Event() for t in tokens}
        self.in_app, self.most_in_app = 0, 0
        self.events: list[tuple[str, str]] = []  # ("pull" | "output", token)
        pending = list(tokens)
        outer = self

        class Client:
            def __init__(self, token: str | None = None) -> None:
                self.token = token

            def AcquireTask(self, req: object) -> SimpleNamespace:  # noqa: N802 - Flower's name
                token = pending.pop(0) if pending else ""
                return SimpleNamespace(token=token, HasField=lambda f: bool(token))

            def close(self) -> None:
                pass

        def pull(client: Client) -> tuple[object, ...]:
            outer.events.append(("pull", str(client.token)))  # the SuperNode hands the context
            if client.token == "stale":
                outer.release.wait(60)
                raise RuntimeError("message contents never arrived")
            meta = SimpleNamespace(message_type="train", group_id="1")
            return (SimpleNamespace(metadata=meta, token=client.token),
                    SimpleNamespace(node_config={}),
                    SimpleNamespace(run_id=1, fab_id="f", fab_version="1", override_config={}),
                    SimpleNamespace(hash_str="h", content=b""))

        def app(message: SimpleNamespace, context: object) -> str:
            outer.in_app += 1
            outer.most_in_app = max(outer.most_in_app, outer.in_app)
            time.sleep(app_seconds)
            outer.in_app -= 1
            outer.done[message.token].set()
            return "reply"

        class Heartbeat:
            is_running = False

            def __init__(self, fn: object) -> None:
                pass

            def start(self) -> None:
                pass

        monkeypatch.setattr(X, "pull_task_input", pull)
        monkeypatch.setattr(X, "push_message", lambda client, reply, context: None)
        monkeypatch.setattr(X, "push_task_output", lambda client, context, status, details:
                            outer.events.append(("output", str(client.token))))
        monkeypatch.setattr(X, "HeartbeatSender", Heartbeat)
        monkeypatch.setattr(X, "make_task_heartbeat_fn_http", lambda client: None)
        monkeypatch.setattr(X, "warm_up", lambda: None)
        self.executor = X.WarmExecutor("127.0.0.1:1", poll_interval=0.01)
        monkeypatch.setattr(self.executor, "_client", Client)
        monkeypatch.setattr(self.executor, "_app", lambda *a: app)
        monkeypatch.setattr(self.executor, "_vet", lambda *a: None)  # trust: test_app_trust
        self.thread = threading.Thread(target=self.executor.serve, args=(self.stop,),
                                       daemon=True)

    def __enter__(self) -> _Executor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.stop.set()
        self.thread.join(10)

    def wait_tasks_done(self, n: int) -> int:
        """Wait (10 s at most) until ``n`` tasks have pushed their output; returns the count."""
        end = time.monotonic() + 10
        while self.executor.tasks_done < n and time.monotonic() < end:
            time.sleep(0.01)
        return self.executor.tasks_done


def test_a_task_whose_message_never_arrives_does_not_hold_up_the_next(monkeypatch):
    """After a SuperLink restart the SuperNode can leave a task pending whose message contents
    never arrive (seen in CI: one market's node then missed every round of the resumed run).
    The node's next task must still run."""
    with _Executor(monkeypatch, ["stale", "next"]) as ex:
        assert ex.done["next"].wait(10), "the next task waited for the stale one"
        assert not ex.done["stale"].is_set()
    # released (on exit), the stale task ends as a failed task: no ClientApp call
    assert ex.wait_tasks_done(2) == 2 and not ex.done["stale"].is_set()


def test_tasks_still_run_one_after_another(monkeypatch):
    """The SuperNode hands a task the context as last pushed, so a task's input must be pulled
    only after the previous task pushed its output (context included)."""
    with _Executor(monkeypatch, ["a", "b", "c"], app_seconds=0.2) as ex:
        assert ex.wait_tasks_done(3) == 3
    assert ex.events == [(e, t) for t in "abc" for e in ("pull", "output")]
    assert ex.most_in_app == 1


def test_after_the_first_round_the_server_goes_on_with_the_nodes_online(tmp_path, monkeypatch,
                                                                      as_server):
    import flwr.serverapp.strategy.strategy_utils as sampling

    monkeypatch.setattr(sampling, "sleep", lambda s: None)
    cfg = RunConfig.from_mapping({**VALUES, "out-dir": str(tmp_path)})
    run = prepare_run(cfg)
    s = run.strategy
    arrays = ArrayRecord(torch_state_dict=s.global_state)
    config = ConfigRecord({"server-round": 2})
    # round 1 waits for every market; one node gone: Flower's sampler would wait forever
    with pytest.raises(RuntimeError, match="still waiting"):
        list(s.configure_train(2, arrays, config, _Link([11, 12])))
    go_on_with_online_nodes(run)  # finish_round calls it after round 1's train phase
    assert len(list(s.configure_train(2, arrays, config, _Link([11, 12])))) == 2
    assert len(list(s.configure_evaluate(2, arrays, config, _Link([11, 12])))) == 2
    with pytest.raises(RuntimeError, match="still waiting"):  # below min-nodes (2): wait
        list(s.configure_train(2, arrays, config, _Link([11])))


# --------------------------------------------------------------------------- real processes
@dataclass
class Record:
    """What happened during the run (filled by ``_drive``)."""

    root: Path
    doc: dict[str, Any] = field(default_factory=dict)
    status: str = ""
    hang_round: int = 0
    kill_round: int = 0
    heads_before_kill: Path | None = None
    rejoin_round: int = 0  # first round the restarted node trained in (its heads' round)
    heads_after_rejoin: Path | None = None
    encoders: dict[int, Path] = field(default_factory=dict)  # round -> copy of encoder.pt


def _train_messages(cluster: LocalCluster, market: str) -> int:
    """Train messages (SecAgg+: train.secagg) the market's SuperNode has started receiving
    (its log, all restarts)."""
    return cluster.log_tail(f"node-{market}", 10**8).count("Receiving: train")


def _evaluate_messages(cluster: LocalCluster, market: str) -> int:
    return cluster.log_tail(f"node-{market}", 10**8).count("Receiving: evaluate message")


def _signal_group(cluster: LocalCluster, name: str, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(cluster.procs[name].pid, sig)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Record]:
    root = tmp_path_factory.mktemp("deploy-faults")
    # a faulty round completes from the two other markets: their policy allows sums of two
    c = LocalCluster(root, policy=write_policy(root / "policy", lab_policy(SECAGG, 2)))
    try:
        c.make_certs()
        c.start_superlink()
        keys = c.start_nodes(MARKETS, root / "state", dataset="synthetic")
        yield _drive(c, keys, Record(root))
    finally:
        for name in c.procs:  # a stopped process must be able to act on SIGTERM
            _signal_group(c, name, signal.SIGCONT)
        c.close()  # also stops SuperExec + ServerApp (own session) by PID
        for name, proc in c.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"


def _drive(c: LocalCluster, keys: dict[str, Path], rec: Record) -> Record:
    """Submit the run and inject the faults at the right moments; returns the record."""
    out = rec.root / "out"
    state = rec.root / "state"
    values = {**VALUES, "out-dir": str(out)}
    run_id = submit_run(c.app_dir, values, c.cli_env)
    snap = rec.root / "snapshots"
    snap.mkdir()
    armed: dict[str, int] = {}  # market -> train messages it had when its fault was armed
    resumed = False
    evaluations = 0  # evaluate messages m0 had received when m2 was frozen
    end = time.monotonic() + DEADLINE
    while True:
        if time.monotonic() > end:
            _fail_with_logs(c, f"run {run_id} not done in {DEADLINE:.0f}s: {rec}")
        if c.procs["superlink"].poll() is not None:
            _fail_with_logs(c, "the SuperLink exited")
        n = rounds_written(out)
        if n and n not in rec.encoders:  # the global encoder each round ended with
            tmp = snap / "encoder.tmp"
            shutil.copy(out / "encoder.pt", tmp)
            rnd = load_encoder(tmp).round
            rec.encoders[rnd] = tmp.rename(snap / f"encoder-{rnd}.pt")
        # --- hang: m2 freezes while receiving a train message (round 2 or later)
        if n >= 1 and HUNG not in armed:
            armed[HUNG] = _train_messages(c, HUNG)
        if not rec.hang_round and HUNG in armed and _train_messages(c, HUNG) > armed[HUNG]:
            os.kill(c.procs[f"node-{HUNG}"].pid, signal.SIGSTOP)  # not its Flower child
            rec.hang_round = n + 1  # round r's train goes out after round r-1 is written
            evaluations = _evaluate_messages(c, "m0")
        if rec.hang_round and not resumed and (n >= rec.hang_round
                                               or _evaluate_messages(c, "m0") > evaluations):
            _signal_group(c, f"node-{HUNG}", signal.SIGCONT)  # the train phase is over
            resumed = True
        # --- kill: m1 dies the same way two rounds later, and is restarted at once
        if resumed and n >= rec.hang_round + 1 and KILLED not in armed:
            armed[KILLED] = _train_messages(c, KILLED)
        if (not rec.kill_round and KILLED in armed
                and _train_messages(c, KILLED) > armed[KILLED]):
            heads = state / KILLED / "private.pt"
            rec.heads_before_kill = snap / "m1-before-kill.pt"
            shutil.copy(heads, rec.heads_before_kill)
            c.stop(f"node-{KILLED}", signal.SIGKILL)
            rec.kill_round = n + 1
            if _private_round(heads) != rec.kill_round - 1:
                _fail_with_logs(c, f"killed too late: {KILLED} had finished round "
                                   f"{_private_round(heads)} of {rec.kill_round}")
            c.start_node(KILLED, keys[KILLED], state, dataset="synthetic")
        if rec.kill_round and not rec.rejoin_round:
            r = _private_round(state / KILLED / "private.pt")
            if r >= rec.kill_round:  # the restarted node has trained (and saved its heads)
                rec.rejoin_round = r
                rec.heads_after_rejoin = snap / f"m1-round{r}.pt"
                shutil.copy(state / KILLED / "private.pt", rec.heads_after_rejoin)
        if n >= ROUNDS:
            break
        time.sleep(0.02)
    try:
        rec.status = wait_run(run_id, c.cli_env, 120, poll=5.0, alive=[c.procs["superlink"]])
    except DeployError as exc:
        _fail_with_logs(c, f"run {run_id}: {exc}")
    rec.doc = json.loads((out / "metrics.json").read_text())
    return rec


def _round(rec: Record, rnd: int) -> dict[str, Any]:
    (r,) = [r for r in rec.doc["rounds"] if r["round"] == rnd]
    return r


def _trained(r: dict[str, Any]) -> set[str]:
    return {m for m, v in r["markets"].items() if v["trained"]}


def _check_faulty_round(rec: Record, rnd: int, survivors: set[str], timed_out: bool) -> None:
    assert rec.status == "finished:completed"
    assert [r["round"] for r in rec.doc["rounds"]] == list(range(1, ROUNDS + 1))
    r = _round(rec, rnd)
    # trained: exactly the two others; their metrics are in (the faulty node's evaluation may be
    # too if it was back in time for the round's evaluation)
    assert _trained(r) == survivors and survivors <= set(r["markets"]), r["markets"]
    for m in survivors:
        v = r["markets"][m]
        assert 0.0 <= v["ndcg@10"] <= v["hr@10"] <= 1.0
        assert SECAGG or v["train_examples"] > 0  # a market's own count: plain FedAvg only
    assert r["rejected"] == []
    # the train phase ended within the round timeout; for a node that stays online (hung), only
    # the timeout could end it: the server waited for it that long, not less
    assert r["train_seconds"] <= TRAIN_PHASE_MAX, r
    if timed_out:
        assert r["train_seconds"] >= ROUND_TIMEOUT - 0.5, r
    # the survivors' aggregate became the new global encoder
    before = load_encoder(rec.encoders[rnd - 1]).state
    after = load_encoder(rec.encoders[rnd]).state
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_hung_supernode_round_completes_without_it(run):
    assert run.hang_round >= 2
    _check_faulty_round(run, run.hang_round, {"m0", "m1"}, timed_out=True)
    # resumed, the node takes part again (it trains in the kill round)
    assert HUNG in _trained(_round(run, run.kill_round))


@pytest.mark.slow
def test_killed_supernode_round_completes_without_it(run):
    assert run.kill_round >= run.hang_round + 2
    _check_faulty_round(run, run.kill_round, {"m0", "m2"}, timed_out=False)


def _replay(heads: Path | None, state_dir: Path, global_encoder: dict[str, torch.Tensor],
            rnd: int) -> dict[str, torch.Tensor]:
    """What m1's node computes in round ``rnd``, starting from ``heads`` (None: fresh)."""
    (state_dir / KILLED).mkdir(parents=True)
    if heads is not None:
        shutil.copy(heads, state_dir / KILLED / "private.pt")
    cfg = RunConfig.from_mapping({**VALUES, "device": "cpu"})  # + the node's own config
    threads = torch.get_num_threads()
    try:
        node = MarketNode(cfg, KILLED, state_dir)  # torch-threads 1, as on the node
        assert node.restore(None) == ("disk" if heads is not None else "fresh")
        node.train_round(global_encoder, rnd)
        return node.private()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_restarted_supernode_continues_from_its_saved_heads(run, tmp_path):
    assert run.rejoin_round > run.kill_round, (
        f"the restarted {KILLED} never trained again (killed in round {run.kill_round})")
    assert run.heads_before_kill is not None and run.heads_after_rejoin is not None
    assert _private_round(run.heads_before_kill) == run.kill_round - 1
    # it came back into the federation: trained in a round after the kill
    assert any(KILLED in _trained(r) for r in run.doc["rounds"] if r["round"] > run.kill_round)

    j = run.rejoin_round
    global_j = load_encoder(run.encoders[j - 1]).state  # what the server sent in round j
    saved, rnd = load_private(run.heads_after_rejoin, KILLED,
                              load_encoder(run.encoders[j - 1]).catalog_fingerprint)
    assert rnd == j
    restored = _replay(run.heads_before_kill, tmp_path / "restored", global_j, j)
    fresh = _replay(None, tmp_path / "fresh", global_j, j)
    assert set(saved) == set(restored)
    for k in saved:  # continued from the heads saved before the kill ...
        torch.testing.assert_close(saved[k], restored[k], rtol=1e-5, atol=1e-6, msg=k)
    # ... which matters: re-initialised heads would have ended elsewhere
    assert max(float((saved[k] - fresh[k]).abs().max()) for k in saved) > 1e-3
