"""Multi-rank clients (`client.ranks`, `fedprompt client --ranks N`): one client's local
training as N data-parallel ranks, one per GPU or N CPU processes over gloo.

Rank 0 is the `fedprompt client` process: it alone talks to the server, checks what the
server sends, evaluates, and returns the payload. Ranks 1..N-1 are child processes started
once (each loads the backbone and the client's data itself) and kept for the client's life,
so a client loads its backbone N times in all, not once per round. Per fit, rank 0 sends each
child the request over its stdin (the global payload is a few KB to MB), then every rank runs
the same `LocalClient.fit`: the same seeded global batch, each rank on its slice
batch[rank::N], the gradients averaged by DeepSpeed's engine (engine.py). The update is the
one-rank update of the same global batch.

A rank that dies (or any failure while the ranks train) is never a hang: collectives fail
after RANK_TIMEOUT_S at most (a dead peer's closed socket fails them at once), the request is
answered with an error naming the rank, and every rank is started afresh before the next one.

DP-SGD on N ranks: rank 0 draws a secret seed per round and sends it with the request, so
every rank draws the same Poisson samples and keeps its slice; each rank clips its own
examples, rank 0 alone adds the noise, and the clipped sums are all-reduced
(privacy.dp_optimizer): one noise for the global batch, what the accountant assumes. Rank 0
alone keeps the client's privacy ledger (the children's are throwaway).
"""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import tempfile
import time

from fedprompt.errors import UserError
from fedprompt.local import LocalClient

# Collectives (a step's gradient all-reduce) wait at most this long for a stuck rank; a rank
# that died fails them at once. A step of a backbone that fits one device takes far less.
RANK_TIMEOUT_S = 300.0
READY, DONE = b"R", b"D"  # what a child rank says on its stdout: loaded, and fit finished


class RankError(UserError, RuntimeError):
    """A rank of a multi-rank client failed (the message names it); the ranks restart."""


class Ranks:
    """The child ranks 1..N-1 of rank 0 (this process), for partition-agnostic `cfg`."""

    def __init__(self, cfg, *, num_partitions: int, ranks: int, say=print):
        self.cfg, self.num_partitions, self.n, self.say = cfg, num_partitions, ranks, say
        self.children: list[subprocess.Popen] = []
        self.port = 0
        self.loads = 0  # backbones the children loaded so far
        self.joined = False

    def start(self) -> None:
        """Start ranks 1..N-1 (they load their backbones while this process loads its own)."""
        import torch

        from fedprompt import processes

        extra = {}
        if self.cfg.model.device != "cpu" and torch.cuda.is_available():
            if torch.cuda.device_count() < self.n:
                raise RankError(f"client.ranks: {self.n} ranks need {self.n} GPUs; {torch.cuda.device_count()} are visible; set client.ranks to at most that")
        elif "OMP_NUM_THREADS" not in os.environ:  # on CPU the ranks share the cores
            threads = cpu_threads(self.n)
            torch.set_num_threads(threads)
            extra["OMP_NUM_THREADS"] = str(threads)
        self.port = processes.free_port()
        for r in range(1, self.n):
            child = processes.spawn_piped([sys.executable, "-m", "fedprompt.ranks"], environ=processes.env(LOCAL_RANK=str(r), **extra))
            spec = {"cfg": self.cfg, "num_partitions": self.num_partitions, "rank": r, "world": self.n, "port": self.port}
            self._send(child, spec)
            self.children.append(child)

    def join(self) -> None:
        """Wait until every child has loaded, then form the group (this process is rank 0)."""
        from fedprompt import engine

        for r, child in enumerate(self.children, start=1):
            self._expect(child, r, READY, what="load the backbone")
            self.loads += 1
        engine.close_distributed()  # this process alone so far (or in an old group): rank 0 of the new one
        engine.init_distributed(rank=0, world_size=self.n, port=self.port, timeout_s=RANK_TIMEOUT_S)
        self.joined = True

    def dead(self) -> str | None:
        """Which child rank has exited, and how; None while all live."""
        for r, child in enumerate(self.children, start=1):
            if child.poll() is not None:
                return f"rank {r} of {self.n} exited ({_how(child.returncode)})"
        return None

    def restart(self, why: str) -> None:
        self.say(f"{why}; restarting ranks 1..{self.n - 1}")
        self.close()
        self.start()
        self.join()

    def close(self) -> None:
        """Stop the children and leave the group."""
        from fedprompt import engine, processes

        for child in self.children:
            processes.stop(child, timeout=5.0)
        self.children, self.joined = [], False
        engine.close_distributed()

    def send_fit(self, tensors: dict, **kwargs) -> None:
        for child in self.children:
            self._send(child, ("fit", tensors, kwargs))

    def finish(self) -> None:
        for r, child in enumerate(self.children, start=1):
            self._expect(child, r, DONE, what="finish its steps")

    def _send(self, child: subprocess.Popen, obj) -> None:
        try:
            pickle.dump(obj, child.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            child.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # a dead child: dead() names it, and the collective that waits for it fails

    def _expect(self, child: subprocess.Popen, r: int, token: bytes, *, what: str) -> None:
        """Read `token` from child rank `r`, or raise if it exits or is silent too long."""
        deadline = time.monotonic() + RANK_TIMEOUT_S
        fd = child.stdout.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                got = os.read(fd, 1)
                if got == token:
                    return
                if not got:  # EOF: it exited
                    child.wait(timeout=10)
                    raise RankError(f"rank {r} of {self.n} exited ({_how(child.returncode)}) before it could {what}; its error is above")
        raise RankError(f"rank {r} of {self.n} did not {what} within {RANK_TIMEOUT_S:.0f} s")


def cpu_threads(ranks: int) -> int:
    """Torch threads of each of `ranks` CPU ranks: this process's cores, shared."""
    return max(1, len(os.sched_getaffinity(0)) // ranks)


def _how(code: int | None) -> str:
    import signal

    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class RankedClient(LocalClient):
    """A LocalClient whose `fit` runs on `ranks` data-parallel ranks (this process is rank 0).
    Everything else (init, evaluate, the guard's checks) runs here alone."""

    def __init__(self, cfg, *, num_partitions: int = 1, ranks: int, say=print, **kw):
        self.group = Ranks(cfg, num_partitions=num_partitions, ranks=ranks, say=say)
        self.group.start()  # the children load while this process does
        try:
            super().__init__(cfg, num_partitions=num_partitions, **kw)
            self.group.join()
        except BaseException:
            self.group.close()
            raise

    @property
    def backbone_loads(self) -> int:
        """Backbones loaded by this client's ranks, this process's included."""
        return super().backbone_loads + self.group.loads

    def fit(self, tensors, *, partition_id: int = 0, round_num: int, source: str = "server", proximal_mu: float = 0.0, dp_seed: int | None = None):
        g = self.group
        why = g.dead() or (None if g.joined else "the ranks are stopped (closed, or after a failure)")
        if why:
            g.restart(why)
        if dp_seed is None and self.cfg.privacy.mode in ("sample", "both"):
            dp_seed = int.from_bytes(os.urandom(8), "little")  # the round's Poisson samples, secret to this client
        g.send_fit(tensors, partition_id=partition_id, round_num=round_num, proximal_mu=proximal_mu, dp_seed=dp_seed)
        try:
            res = super().fit(tensors, partition_id=partition_id, round_num=round_num, source=source, proximal_mu=proximal_mu, dp_seed=dp_seed)
            g.finish()
        except Exception as e:
            why = g.dead()
            g.close()  # the children may wait in a collective: start afresh before the next fit
            if why or not isinstance(e, UserError):
                raise RankError(f"round {round_num}: {why or f'the ranks failed ({type(e).__name__}: {e})'}; no update is sent, the ranks restart") from None
            raise
        return res

    def close(self) -> None:
        self.group.close()


def make_client(cfg, *, num_partitions: int, say=print) -> LocalClient:
    """The client of a `fedprompt client`: on client.ranks ranks (1: this process alone)."""
    if cfg.client.ranks > 1:
        return RankedClient(cfg, num_partitions=num_partitions, ranks=cfg.client.ranks, say=say)
    return LocalClient(cfg, num_partitions=num_partitions)


def _serve_rank() -> int:
    """A child rank: read its spec, load, join the group, then run every fit rank 0 sends."""
    import torch

    from fedprompt import engine

    inbox = sys.stdin.buffer
    outbox = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # whatever prints goes to stderr: stdout carries the protocol alone
    spec = pickle.load(inbox)
    rank = spec["rank"]
    if torch.cuda.is_available() and spec["cfg"].model.device != "cpu":
        torch.cuda.set_device(rank)
    try:
        # Its privacy ledger is a throwaway: rank 0 records the client's DP steps, once.
        ledgers = tempfile.TemporaryDirectory(prefix="fedprompt-rank-")
        client = LocalClient(spec["cfg"], num_partitions=spec["num_partitions"], state_dir=ledgers.name)
        outbox.write(READY)
        engine.init_distributed(rank=rank, world_size=spec["world"], port=spec["port"], timeout_s=RANK_TIMEOUT_S)
        while True:
            try:
                kind, tensors, kwargs = pickle.load(inbox)
            except EOFError:  # rank 0 closed the pipe: the client is stopping
                return 0
            if kind == "fit":
                client.fit(tensors, source="rank 0", **kwargs)
                outbox.write(DONE)
    except UserError as e:
        print(f"fedprompt client rank {rank}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(_serve_rank())
