"""A warm ClientApp executor for one SuperNode (``flower-supernode --isolation process``).

Flower's default (``--isolation subprocess``) starts a fresh ``flwr-clientapp`` process for
every message: each train/evaluate message pays the Python + torch import (~2 s CPU here), the
market's data load and the model build again. This executor is the long-lived process that
``--isolation process`` expects next to the SuperNode: it polls the SuperNode's local Runtime
API for ClientApp tasks and runs each one *in this process* with the same steps as
``flwr-clientapp`` (pull message/context/FAB, run the app, push reply + context). torch, the app
module and the market's data (``shared.data.load_market`` is cached) are loaded once.

Before a run's FAB is installed or loaded, the executor vets it against the market's privacy
policy (``vet_run``): the FAB's SHA-256 must be one the region trusts (``trusted-apps``) and the
run's config overrides only keys it allows (``allowed-run-config``); what a FAB could otherwise
make the node execute is in ``simulations/fab.py``. A refused run's messages get an error reply
(the round treats the node as dropped) and one log line naming the rule.

The ClientApp that runs is the FAB's own ``[tool.flwr.app.components] clientapp`` - the same
``client.client_app:app`` the simulation uses; its private state travels in the context the
SuperNode keeps, exactly as with ``flwr-clientapp``. Tasks run one at a time (one market per
node): the next task is taken once the previous one has pushed its reply and context. Each task
pulls its input in its own thread, though, so a task whose message never arrives cannot hold up
the next one (``WarmExecutor.start_task``). It uses Flower 1.42's runtime client and the helpers
of ``flwr-clientapp`` itself.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from storefed.shared.policy import load_policy
from storefed.simulations.fab import installed_app_sha256

log = logging.getLogger("storefed")


class UntrustedRunError(LoadClientAppError):
    """The market's policy does not let this run's app or config run on the node."""


def vet_run(run_id: int, fab_content: bytes, overrides: Iterable[str],
            node_config: Mapping[str, Any]) -> str:
    """Check a run against the market's policy before anything of it is installed; returns the
    FAB's SHA-256, raises ``UntrustedRunError`` naming the rule otherwise."""
    policy = load_policy(node_config, _market_dir(node_config))
    sha = hashlib.sha256(fab_content).hexdigest()
    if not policy.trusts_app(sha, installed_app_sha256):
        raise UntrustedRunError(
            f"refused run {run_id}: its app bundle (FAB sha256 {sha}) is not one this region "
            f"trusts (privacy policy trusted-apps = {policy.trusted_apps!r})")
    forbidden = policy.forbidden_overrides(overrides)
    if forbidden:
        raise UntrustedRunError(
            f"refused run {run_id}: it overrides run-config keys this region does not allow: "
            f"{', '.join(forbidden)} (privacy policy allowed-run-config = "
            f"{policy.allowed_run_config!r})")
    return sha


def _market_dir(node_config: Mapping[str, Any]) -> Path | None:
    state, market = node_config.get("state-dir"), node_config.get("market")
    return Path(str(state)) / str(market) if state and market else None


def warm_up() -> None:
    """Pay torch's lazy imports before the first task instead of inside round 1: building the
    first optimizer imports ``torch._dynamo`` (sympy & co., ~2-4 s of CPU on these cores)."""
    import torch  # noqa: PLC0415

    param = torch.zeros(1, requires_grad=True)
    torch.optim.Adam([param]).step()


class WarmExecutor:
    """Runs the ClientApp tasks of one SuperNode in this process, one at a time."""

    def __init__(self, runtime_api_address: str, poll_interval: float = 0.2) -> None:
        self.address = runtime_api_address
        self.poll_interval = poll_interval
        self.tasks_done = 0
        self._one_app_at_a_time = threading.Lock()
        # tasks whose input has arrived and whose output is not pushed yet
        self._running = 0
        self._changed = threading.Condition()
        self._apps: dict[str, ClientApp] = {}
        self._installed: set[str] = set()
        self._vetted: dict[tuple[int, str], str] = {}  # (run id, FAB hash) -> refusal or ""
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)

    def _client(self, token: str | None = None) -> RuntimeHttpClient:
        interceptors: list[Any] = [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token
                                          else "SuperExec")]
        if token:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())

    def serve(self, stop: threading.Event | None = None) -> None:
        """Poll for tasks until ``stop`` is set (or forever)."""
        stop = stop or threading.Event()
        warm_up()
        acquirer = self._client()
        try:
            while not stop.is_set():
                if not self._wait_idle(self.poll_interval):
                    continue  # the next task's context is the one this task will push
                try:
                    res = acquirer.AcquireTask(AcquireTaskRequest(
                        supported_task_types=[TaskType.CLIENT_APP.value]))
                except Exception as exc:  # noqa: BLE001 - SuperNode (re)starting
                    log.debug("runtime API not reachable yet: %s", exc)
                    stop.wait(0.5)
                    continue
                if res.HasField("task") and res.token:
                    self.start_task(res.token)
                else:
                    stop.wait(self.poll_interval)
        finally:
            acquirer.close()

    def _vet(self, run_id: int, fab_hash: str, content: bytes, overrides: Iterable[str],
             node_config: Mapping[str, Any]) -> None:
        """``vet_run`` once per run (the refusal is logged once, raised for every message)."""
        key = (run_id, fab_hash)
        if key not in self._vetted:
            try:
                vet_run(run_id, content, overrides, node_config)
                self._vetted[key] = ""
            except UntrustedRunError as exc:
                log.error("%s", exc)
                self._vetted[key] = str(exc)
        if self._vetted[key]:
            raise UntrustedRunError(self._vetted[key])

    def _app(self, fab_id: str, fab_version: str, fab_hash: str, content: bytes) -> ClientApp:
        if fab_hash not in self._installed:
            install_from_fab(content, skip_prompt=True)
            self._installed.add(fab_hash)
        if fab_hash not in self._apps:
            self._apps[fab_hash] = self._load(fab_id, fab_version, fab_hash)
        return self._apps[fab_hash]

    def _wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._running == 0, timeout)

    def start_task(self, token: str) -> None:
        """Run one task (``run_task``) in a thread of its own and return at once.

        Why not in the polling loop: after a SuperLink restart, Flower 1.42's SuperNode can be
        handed a message of a run the restarted SuperLink no longer runs. It has created the task
        before the SuperLink refuses the message's contents (``RunNotRunningException``), and it
        leaves that task pending, its message stored without the contents. Pulling that task's
        input then waits for contents that never come, for up to ``PULL_MAX_TIME`` (2 h). Under
        ``flwr-clientapp`` (one process per task) only that process waits; an executor that
        pulled tasks one after another would wait with it and the node would miss every later
        round. Here only that task's thread waits (it ends with an ``ObjectPullError`` reported
        as a failed task). A task whose input has arrived still runs alone: ``serve`` takes no
        new task until it has pushed its output, since the SuperNode hands the next task the
        context as last pushed."""
        threading.Thread(target=self.run_task, args=(token,), daemon=True,
                         name="storefed-task").start()

    def run_task(self, token: str) -> None:
        """One task, as ``flwr-clientapp --token`` would run it (errors become Error replies).
        Pulling the input may wait; from its arrival to the pushed output the task counts as
        running, and the ClientApp call holds the executor's lock."""
        client = self._client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        reply: Message | None = None
        context: Context | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed"
        counted = False
        try:
            message, context, run, fab = pull_task_input(client)
            with self._changed:
                self._running += 1
                counted = True
            self._vet(run.run_id, fab.hash_str, fab.content, run.override_config.keys(),
                      context.node_config)
            with self._one_app_at_a_time:
                app = self._app(run.fab_id, run.fab_version, fab.hash_str, fab.content)
                t0 = time.perf_counter()
                reply = app(message=message, context=context)
            log.info("%s message of run %s round %s handled in %.2fs",
                     message.metadata.message_type, run.run_id,
                     message.metadata.group_id or "-", time.perf_counter() - t0)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # noqa: BLE001 - report to the server, keep serving
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(exc, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(exc)}:<'{exc}'>"
            if not isinstance(exc, UntrustedRunError):  # logged once by _vet
                log.exception("ClientApp raised an exception")
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001
                log.exception("failed to push the reply message")
                sub_status = SubStatus.FAILED
            push_task_output(client, context, sub_status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            with self._changed:
                self.tasks_done += 1
                if counted:
                    self._running -= 1
                self._changed.notify_all()


class _CappedSleep(ModuleType):
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep`` is capped."""

    def __init__(self, cap: float) -> None:
        super().__init__("time")
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


# Heartbeat interval of the SuperNodes started here: Flower's minimum (its default is 30 s).
# The SuperLink marks a node offline 2 intervals after its last heartbeat; until then a dead
# node is still sampled, and the same key cannot log in again (a restart after a crash).
NODE_HEARTBEAT_S = 10


def supernode_main(argv: list[str], fleet_poll: float) -> int:
    """``flower-supernode`` with its idle Fleet poll shortened from Flower 1.42's fixed 3 s to
    ``fleet_poll`` seconds (a message waits on average half that long before the node sees it),
    a ``NODE_HEARTBEAT_S`` heartbeat, and a restart after a crash that waits for the SuperLink
    to let the crashed session go (see ``rejoin_after_crash``). Everything else is Flower's."""
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415
    from flwr.supernode.cli import flower_supernode  # noqa: PLC0415

    loop.time = _CappedSleep(fleet_poll)
    rejoin_after_crash(NODE_HEARTBEAT_S)
    plain_logs()
    sys.argv = ["flower-supernode", *argv]
    flower_supernode()
    return 0


def rejoin_after_crash(heartbeat: int) -> None:
    """Heartbeat every ``heartbeat`` s and retry a refused login for as long as a crashed
    session of the same key can stay online (2 heartbeats, + 5 s).

    Flower's SuperLink refuses to activate a node id that is still online, and Flower's
    SuperNode exits at once on that refusal. A SuperNode restarted after a crash (SIGKILL, power
    loss: no goodbye) is exactly that case until its old session times out, so it would exit
    instead of rejoining. Any other refusal (e.g. an unregistered key) still ends the SuperNode,
    after that window."""
    import httpx  # noqa: PLC0415
    from flwr.common.constant import HEARTBEAT_PATIENCE  # noqa: PLC0415
    from flwr.supercore import heartbeat as hb  # noqa: PLC0415
    from flwr.supercore.error import ApiErrorCode, FlowerError  # noqa: PLC0415
    from flwr.supercore.retry import exponential  # noqa: PLC0415
    from flwr.supernode import fleet_http_connection as fleet  # noqa: PLC0415

    hb.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    fleet.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    window = HEARTBEAT_PATIENCE * heartbeat + 5.0
    make_invoker = fleet.make_simple_http_retry_invoker

    def refused_login(exc: Exception) -> bool:
        if not (isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 412):
            return False
        err = FlowerError.from_json(exc.response.text)
        return err is not None and err.code == ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED

    def invoker() -> Any:
        inv = make_invoker()
        give_up, start = inv.should_giveup, time.monotonic()

        def should_giveup(exc: Exception) -> bool:
            if refused_login(exc) and time.monotonic() - start < window:
                log.warning("SuperLink refused the login (a crashed session of this key may "
                            "still be online); retrying for up to %.0f s", window)
                return False
            return bool(give_up(exc)) if give_up is not None else False

        inv.should_giveup = should_giveup
        inv.wait_gen_factory = lambda: exponential(max_delay=max(1, heartbeat // 2))
        return inv

    fleet.make_simple_http_retry_invoker = invoker


def plain_logs() -> None:
    """Flower's console log with timestamps and without colour codes (for log files)."""
    from flwr.supercore.logger import update_console_handler  # noqa: PLC0415

    update_console_handler(timestamps=True, colored=False)


def superlink_main(argv: list[str]) -> int:
    """``flower-superlink`` with timestamped, uncoloured logs (used by the local cluster)."""
    from flwr.superlink.cli import flower_superlink  # noqa: PLC0415

    plain_logs()
    sys.argv = ["flower-superlink", *argv]
    flower_superlink()
    return 0


if __name__ == "__main__":
    # python -m storefed.simulations.deploy_exec supernode FLEET_POLL <flower-supernode args...>
    # python -m storefed.simulations.deploy_exec superlink <flower-superlink args...>
    if sys.argv[1:2] == ["superlink"]:
        sys.exit(superlink_main(sys.argv[2:]))
    sys.exit(supernode_main(sys.argv[3:], float(sys.argv[2])))
