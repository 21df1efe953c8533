"""Serve a SuperNode's messages in this process, with the fedprompt installed here.

By default a SuperNode runs whatever app the server's run names: it fetches the run's app
bundle (FAB) from the SuperLink, installs it and starts its ClientApp code in a new process
for every message. A `fedprompt client` must never execute code that arrived over the wire,
so its SuperNode runs with `--isolation process` (it starts nothing), and this process takes
each task from the SuperNode's runtime API on loopback (the role of Flower's SuperExec, with
a shared secret so no other local process can take them), checks which app the run is, and
answers with fedprompt's own ClientApp object, imported from this installation. A run of any
other app (publisher, name, version or bundle hash not this fedprompt's) gets an error reply,
logged with its run id; its bundle is never unpacked.

Serving in this process also means no process start and no re-import per message, and the
backbone loaded once stays where the ClientApp runs: no socket bridge in between.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Error, Message
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedprompt.processes import APP_DIR, one_line

# Error codes of the replies this process makes (Flower's ErrorCode values start at 0; ours
# are apart so a server's log tells them from Flower's own).
FOREIGN_APP, CLIENT_ERROR = 4301, 4302
_COMPLETED, _FAILED = "completed", "failed"  # flwr.common.constant.SubStatus values


@dataclass(frozen=True)
class AppIdentity:
    """Which Flower app a run is: `publisher/name`, version and the sha256 of its bundle."""

    fab_id: str
    version: str
    fab_hash: str

    def __str__(self) -> str:
        return f"{self.fab_id} {self.version} (bundle sha256 {self.fab_hash[:12]})"


def installed_app() -> AppIdentity:
    """The identity of the fedprompt app installed here, as `flwr run` bundles it."""
    from flwr.cli.build import build_fab_from_disk

    meta = tomllib.loads((APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    fab = build_fab_from_disk(APP_DIR)  # deterministic: fixed timestamps and order
    return AppIdentity(f"{meta['tool']['flwr']['app']['publisher']}/{meta['project']['name']}", meta["project"]["version"], hashlib.sha256(fab).hexdigest())


def mismatch(expected: AppIdentity, fab_id: str, version: str, content: bytes) -> str | None:
    """Why a run of (`fab_id`, `version`, bundle `content`) is not `expected`; None if it is."""
    got = AppIdentity(str(fab_id), str(version), hashlib.sha256(content).hexdigest())
    if got.fab_id != expected.fab_id:
        return f"app {got.fab_id!r} is not {expected.fab_id!r}"
    if got.version != expected.version:
        return f"app version {got.version!r} is not this client's {expected.version!r} (install the same fedprompt on both sides)"
    if got.fab_hash != expected.fab_hash:
        return f"app bundle sha256 {got.fab_hash[:12]}... is not this client's {expected.fab_hash[:12]}..."
    return None


def _retries() -> RetryInvoker:
    """Retry a call to the local SuperNode on connection errors for up to 20 s. (Flower's own
    invoker retries for ever and answers a 401 by sending SIGINT to the whole process: right
    for a throwaway ClientApp process, wrong for the long-lived client.)"""
    import httpx

    return RetryInvoker(lambda: exponential(max_delay=2.0), httpx.TransportError, max_tries=None, max_time=20.0)


class Executor:
    """Take the SuperNode's ClientApp tasks from its runtime API at `address` (plain HTTP on
    loopback, AcquireTask signed with `secret`) and answer each with `app` (a ClientApp)."""

    def __init__(self, address: str, secret: bytes, app, *, say=print):
        self.address, self.app, self.say = address, app, say
        self.expected = installed_app()
        self._tasks = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})),
            ],
            retry_invoker=None,
        )  # serve_forever waits and asks again

    def close(self) -> None:
        self._tasks.close()

    def poll(self) -> bool:
        """Serve one waiting task, if any; whether one was served. Raises httpx errors when
        the SuperNode is not reachable (the caller waits and retries)."""
        res = self._tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if not (res.HasField("task") and res.token):
            return False
        try:
            self._serve(res.token)
        except Exception as e:  # one broken task (a SuperNode restarting, a malformed message) is not the client's end
            self.say(f"task of run {res.task.run_id} not served: {type(e).__name__}: {one_line(e)}")
        return True

    def _serve(self, token: str) -> None:
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
            retry_invoker=_retries(),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))  # a long fit is not a dead task
        heartbeat.start()
        context, status, details = None, _FAILED, "not served"
        try:
            message, context, run, fab = pull_task_input(client)
            why = mismatch(self.expected, run.fab_id, run.fab_version, fab.content)
            if why is not None:
                details = f"fedprompt client refuses run {run.run_id}: {why}; it runs only {self.expected}"
                self.say(f"refused run {run.run_id}: {why} (none of its code runs here)")
                reply = Message(Error(code=FOREIGN_APP, reason=details), reply_to=message)
            else:
                try:
                    reply = self.app(message=message, context=context)
                    status, details = _COMPLETED, ""
                except Exception as e:  # answered as this client's error; the process lives on
                    details = f"{type(e).__name__}: {e}"
                    reply = Message(Error(code=CLIENT_ERROR, reason=details), reply_to=message)
            push_message(client, reply, context)
        finally:
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()


def serve_forever(executor: Executor, stopping, *, idle_s: float = 0.2, unreachable_s: float = 0.5) -> None:
    """Poll `executor` until the `stopping` event is set (tasks back to back, `idle_s` between
    empty polls; the SuperNode may be restarting: wait `unreachable_s` and ask again)."""
    import httpx

    while not stopping.is_set():
        try:
            if executor.poll():
                continue
        except (httpx.HTTPError, OSError):
            stopping.wait(unreachable_s)
            continue
        stopping.wait(idle_s)


def secret_file(folder: Path) -> tuple[Path, bytes]:
    """A fresh SuperExec secret in `folder` (mode 0600): only this process takes tasks."""
    import os
    import secrets

    secret = secrets.token_bytes(32)
    f = folder / "superexec.secret"
    f.write_bytes(secret)
    os.chmod(f, 0o600)
    return f, secret
