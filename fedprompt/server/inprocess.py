"""The in-process simulation engine (federation.engine: inprocess).

The ServerApp's own entry point (server/app.py `main`) runs in a thread of this process on the
in-process grid (server/localgrid.py), whose nodes are every virtual client served by one
LocalClient (one backbone, as one Flower simulation worker holds). The round loop, the
strategies, the Flower messages, the client code (client/app.py, client/handler.py, the
guard) and the run directory are the ones Flower's engine uses; what is left out is the
transport: no SuperLink, no `flwr run`, no Ray. On a 2-core machine their daemons wake
~600 times a second and slow the clients' training steps by ~10% (docs/sim-engines.md);
with one worker, Ray brings nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


class Rounds:
    """The round loop in a thread, looking like the `flwr run` process that
    server/progress.follow watches (poll() is None while it runs)."""

    def __init__(self, out: Path):
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._body, args=(out,), name="fedprompt-rounds", daemon=True)

    def _body(self, out: Path) -> None:
        from fedprompt.server.app import main
        from fedprompt.server.localgrid import LocalContext

        context = LocalContext({})
        context.run_config = {"output": str(out.resolve()), "mode": "simulation"}
        try:
            main(_grid(out), context)
        except BaseException as e:  # main wrote the reason to status.json, which follow() reports
            self.error = e

    def start(self) -> Rounds:
        self._thread.start()
        return self

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else (0 if self.error is None else 1)


def exit_interrupted() -> None:
    """Ctrl-C while the rounds run: exit now with the CLI's interrupted status (130). A
    thread cannot be stopped mid-step, and a normal exit with it still inside torch aborts
    the process ("terminate called without an active exception") as C++ destructors run
    under it. Nothing is lost: the checkpoint and metrics rows are written by atomic renames,
    and the run resumes from the last completed round."""
    print("fedprompt: interrupted", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)


def _grid(out: Path):
    """The virtual clients as nodes 1..num_clients, node i+1 serving partition i, all served
    by one LocalClient of this run (not client/handler's per-process cache: a second run in
    this process must keep its privacy ledgers in its own run directory, as a worker does)."""
    from fedprompt.config import load_config
    from fedprompt.local import LocalClient
    from fedprompt.server.localgrid import LocalGrid, client_responder

    cfg = load_config(out / "config.yaml")
    n = cfg.federation.num_clients
    client = LocalClient(cfg, num_partitions=n, state_dir=cfg.client.state_dir or out / "clients")
    return LocalGrid({pid + 1: client_responder(client, pid) for pid in range(n)}, keep_sent=False)


@contextlib.contextmanager
def running(out: Path, log: Path) -> Iterator[Rounds]:
    """Start the rounds of the run in `out`; the round loop's lines and Flower's log go to `log`
    (follow() shows the notes from it, as from a ServerApp's log)."""
    from fedprompt.server import aggregate

    log.parent.mkdir(parents=True, exist_ok=True)
    flwr = logging.getLogger("flwr")
    handlers = flwr.handlers[:]
    with open(log, "a", encoding="utf-8") as f:
        sink = logging.StreamHandler(f)
        sink.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        flwr.handlers = [sink]
        aggregate.LOG_FILE = f
        try:
            yield Rounds(out).start()
        finally:
            aggregate.LOG_FILE = None
            flwr.handlers = handlers
