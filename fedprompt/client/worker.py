"""`fedprompt client`: the long-lived process that holds a client's backbone and serves it.

It loads the backbone and its partition once, runs a SuperNode (restarted whenever it exits,
for example when the server went away, so the client outlives server restarts) that executes
nothing itself, and answers each of the SuperNode's tasks right here with fedprompt's own
ClientApp (executor.py): no code from the server ever runs, and no process starts per message.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path


def _user_error(e: BaseException) -> bool:
    from fedprompt.errors import UserError

    return isinstance(e, UserError)


class Worker:
    """Serve `client` (a LocalClient) as partition `partition_id` to the server at `superlink`."""

    def __init__(self, client, *, partition_id: int, superlink: str, quiet: bool = False, root_certificates: str | None = None, auth_key: str | None = None):
        from fedprompt import processes
        from fedprompt.client import executor

        self.client, self.partition_id, self.superlink, self.quiet = client, partition_id, superlink, quiet
        self.root_certificates, self.auth_key = root_certificates, auth_key
        self.fatal: str | None = None  # why this client can never join (set by the supervisor)
        self.folder = Path(tempfile.mkdtemp(prefix="fedprompt-client-"))  # mkdtemp: mode 0700
        self.secret_file, self.secret = executor.secret_file(self.folder)
        self.runtime_port = processes.free_port()
        self.stopping = threading.Event()
        self.supernode = None
        self.requests = 0

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"fedprompt client: {text}", flush=True)

    def _supervise(self) -> None:
        """Keep one SuperNode running; restart it (after a pause) whenever it exits, unless
        it can never connect (untrusted server, unregistered key): then stop the client."""
        from fedprompt import processes, security

        log, home = self.folder / "supernode.log", self.folder / "flwr"
        refused_since = None  # an unregistered key may be registered in a moment (a server starting)
        waiting = False
        while not self.stopping.is_set():
            why = security.check_server(self.superlink, root_certificates=self.root_certificates)
            if why is security.NOT_YET:
                if not waiting:
                    self.say(f"waiting for the server at {self.superlink}")
                waiting, why = True, None
            elif why is None:
                waiting = False
                log.unlink(missing_ok=True)  # its tail must be this SuperNode's
                self.supernode = processes.start_supernode(
                    self.superlink,
                    runtime_port=self.runtime_port,
                    secret_file=self.secret_file,
                    flwr_home=home,
                    log=log,
                    root_certificates=self.root_certificates,
                    auth_key=self.auth_key,
                )
                started = time.monotonic()
                while self.supernode.poll() is None and not self.stopping.is_set():
                    time.sleep(0.5)
                if self.stopping.is_set():
                    return
                if time.monotonic() - started > 60:  # it was connected: a later refusal is news
                    refused_since = None
                why = security.fatal_reason(processes.tail(log, 20), key=self.auth_key)
                if why is not None and security.NOT_REGISTERED in why:
                    refused_since = refused_since or time.monotonic()
                    if time.monotonic() - refused_since < self.client.cfg.client.registration_grace_s:
                        why = None
                else:
                    refused_since = None
                if why is None:
                    # Its runtime API's web server says goodbye last ("INFO:     Finished server process"): skip that.
                    said = [line for line in processes.tail(log, 20).split(" | ") if not line.startswith("INFO:")]
                    self.say(f"SuperNode exited ({said[-1] if said else 'no reason logged'}); reconnecting to {self.superlink}")
            if why is not None:
                self.fatal = why
                self.stopping.set()
                os.kill(os.getpid(), signal.SIGTERM)  # wakes serve() out of its wait
                return
            self.stopping.wait(2.0)

    def handle(self, request):
        """One Request of the ClientApp (in this process), handled and logged in one line; an
        error is logged and raised (the executor answers it as this client's error)."""
        import dataclasses

        from fedprompt.client.handler import handle

        request = dataclasses.replace(request, partition_id=self.partition_id)  # ours, whatever the message says
        t0 = time.perf_counter()
        try:
            reply = handle(self.client, request)
        except Exception as e:
            if not _user_error(e):
                traceback.print_exc()
            self.say(f"round {request.round} {request.kind}: {type(e).__name__}: {e} ({time.perf_counter() - t0:.1f} s)")
            raise
        finally:
            self.requests += 1
        m = reply.metrics
        detail = f"loss {m['train_loss']:.4f}" if "train_loss" in m else (f"accuracy {m['accuracy']:.4f}" if "accuracy" in m else "ok")
        self.say(f"round {request.round} {request.kind}: {detail} ({time.perf_counter() - t0:.1f} s)")
        return reply

    def serve(self) -> None:
        """Answer the SuperNode's tasks until SIGTERM/SIGINT; then stop the SuperNode and
        remove the private folder."""
        from fedprompt import processes
        from fedprompt.client import app as client_app
        from fedprompt.client import executor

        def on_term(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)  # also when inherited as ignored
        client_app.serve_in_process(self.handle)
        tasks = executor.Executor(f"127.0.0.1:{self.runtime_port}", self.secret, client_app.app, say=self.say)
        supervisor = threading.Thread(target=self._supervise, daemon=True)
        supervisor.start()
        self.say(
            f"partition {self.partition_id}: {len(self.client.shard(self.partition_id).train)} training examples; "
            f"serving {self.superlink}; runs only {tasks.expected}"
        )
        try:
            executor.serve_forever(tasks, self.stopping)
        except KeyboardInterrupt:
            if not self.fatal:
                self.say("stopping")
        finally:
            self.stopping.set()
            tasks.close()
            processes.stop(self.supernode)
            supervisor.join(timeout=5)
            processes.reap()
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.fatal:
            from fedprompt.security import SecurityError

            raise SecurityError(self.fatal)


def run_client(cfg, *, partition_id: int, num_partitions: int, server: str | None = None, quiet: bool = False, insecure: bool = False) -> None:
    """`fedprompt client`: load the backbone and this partition once, then serve until stopped.
    Over TLS (client.root_certificates) with this client's key (client.auth_key), unless `insecure`."""
    from fedprompt import security
    from fedprompt.processes import split_address
    from fedprompt.ranks import make_client

    superlink = server or cfg.client.server
    split_address(superlink, "--server")
    trust = key = None
    if insecure:
        print("fedprompt client: " + security.INSECURE_WARNING.format(where=superlink), file=sys.stderr, flush=True)
    else:
        trust, key = security.client_files(cfg.client.root_certificates, cfg.client.auth_key)
    if not 0 <= partition_id < num_partitions:
        from fedprompt.rundir import RunError

        raise RunError(f"--partition-id {partition_id} is out of range for --num-partitions {num_partitions}; allowed 0..{num_partitions - 1}")
    client = make_client(cfg, num_partitions=num_partitions, say=lambda text: None if quiet else print(f"fedprompt client: {text}", flush=True))
    shard = client.shard(partition_id)  # a partition that cannot be made fails here, before Flower starts
    if cfg.privacy.mode in ("sample", "both"):
        from fedprompt import privacy

        # Refuse an unsound or unreachable plan now, not at the first round.
        plan = privacy.plan(cfg, n=len(shard.train), planned_steps=cfg.federation.rounds * cfg.round_steps)
        ledger = client.ledger_path(shard.train)
        spent = privacy.Ledger.open(ledger, cfg.privacy.accountant).epsilon(cfg.privacy.delta)
        if not quiet:
            print(
                f"fedprompt client: DP-SGD sigma {plan.sigma:.3f}, q {plan.q:.4f}; privacy ledger {ledger} "
                f"(epsilon so far {spent:.3f} at delta {cfg.privacy.delta:g})",
                flush=True,
            )
    Worker(client, partition_id=partition_id, superlink=superlink, quiet=quiet, root_certificates=trust, auth_key=key).serve()
