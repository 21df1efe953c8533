"""A client does not trust the server blindly: every global payload it receives is checked
before anything is loaded, and what it received and sent is recorded.

A received global must match this client's own manifest, be finite, come with a round number
that never goes back within a run, and stay within `client.max_global_norm_factor` x the L2
norm of the method's seeded initial payload (published attacks plant crafted soft prompts or
adapters, typically far from anything training produces). Otherwise the request is refused
with a reason naming the round and the tensor. Every request leaves one line in an
append-only JSON-lines record in the client's state folder (run, round, kind, the digest of
the global received, the digest of the tensors sent back, or the refusal), so what a server
sent can be audited later against its own log.
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedprompt import payload
from fedprompt.errors import UserError
from fedprompt.lora_aggregation import MAX_LORA_RANK, manifest_at, rank_of
from fedprompt.protocol import Kind, Reply, Request


class GlobalRefused(UserError, ValueError):
    """The server's global payload is not one this client accepts (names the round and tensor)."""


def _norm(t: np.ndarray) -> float:
    return float(np.linalg.norm(t.astype(np.float64).ravel())) if t.dtype.kind == "f" else 0.0


class Guard:
    """The checks and the record of one partition served by one LocalClient."""

    def __init__(self, manifest: payload.Manifest, initial: Callable[[int | None], dict], factor: float, record: Path, rank: int | None = None):
        """`initial(rank)`: the seeded initial payload (LoRA: at `rank`, None: the client's
        own); `rank`: the LoRA rank this partition trains at (None: not LoRA)."""
        self.manifest, self.factor, self.record_path, self.rank = manifest, factor, record, rank
        self._initial_of, self._norms = initial, {}
        self.last: dict[int, int] = {}  # run -> the highest round received
        for line in _lines(record):  # a restarted client still refuses rounds that go back
            if isinstance(line.get("run"), int) and isinstance(line.get("round"), int) and "refused" not in line:
                self.last[line["run"]] = max(self.last.get(line["run"], 0), line["round"])

    def check(self, req: Request) -> None:
        """Raise GlobalRefused unless `req` (its global tensors, its round) is acceptable."""
        where = f"refuses the global of round {req.round} (run {req.run})"
        if req.round < self.last.get(req.run, 0):
            raise GlobalRefused(f"{where}: round {req.round} goes back, this client already received round {self.last[req.run]} of that run")
        rank = req.lora_rank if req.kind == Kind.INIT else rank_of(req.tensors) if self.rank is not None else None
        if rank and rank != self.rank and not (self.rank or 0) <= rank <= MAX_LORA_RANK:
            raise GlobalRefused(f"{where}: its LoRA rank {rank} is not between this client's peft.lora_r {self.rank} and {MAX_LORA_RANK}")
        if req.kind == Kind.INIT:
            return
        try:
            payload.validate(req.tensors, manifest_at(self.manifest, rank) if rank else self.manifest, source="the server")
        except payload.PayloadError as e:
            raise GlobalRefused(f"{where}: {e}") from None
        norms = {k: _norm(v) for k, v in req.tensors.items()}
        total = math.sqrt(sum(n * n for n in norms.values()))
        initial = self._initial_norms(rank)
        initial_norm = math.sqrt(sum(n * n for n in initial.values()))
        if self.factor and initial_norm > 0 and total > self.factor * initial_norm:
            worst = max(norms, key=lambda k: norms[k] / initial[k] if initial[k] > 0 else math.inf)
            raise GlobalRefused(
                f"{where}: its L2 norm {total:.4g} is {total / initial_norm:.1f} x the initial payload's {initial_norm:.4g} "
                f"(client.max_global_norm_factor {self.factor:g}); largest growth in tensor {worst!r} "
                f"({norms[worst]:.4g}, initially {initial[worst]:.4g})"
            )
        self.last[req.run] = max(self.last.get(req.run, 0), req.round)

    def _initial_norms(self, rank: int | None) -> dict[str, float]:
        """Per-tensor L2 norms of the seeded initial payload at `rank` (made once per rank)."""
        if rank not in self._norms:
            self._norms[rank] = {k: _norm(v) for k, v in self._initial_of(rank).items()}
        return self._norms[rank]

    def record(self, req: Request, reply: Reply | None, refused: str = "") -> None:
        """Append what was received and sent (or refused) for `req` to the record."""
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run": req.run,
            "round": req.round,
            "kind": str(req.kind),
            "received": payload.digest(req.tensors) if req.tensors else None,
            "sent": payload.digest(reply.tensors) if reply is not None and reply.tensors else None,
        }
        if refused:
            line["refused"] = refused
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record_path, "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
            f.write(json.dumps(line) + "\n")


def _lines(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    out = []
    for raw in text.splitlines():
        try:
            d = json.loads(raw)
        except ValueError:
            continue  # a line cut by a crash: the others still count
        if isinstance(d, dict):
            out.append(d)
    return out


_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LocalClient -> {partition: Guard}


def guard_for(client, partition_id: int) -> Guard:
    """The Guard of partition `partition_id` of `client` (a LocalClient), made on first use."""
    per = _GUARDS.setdefault(client, {})
    if partition_id not in per:
        ref = weakref.ref(client)  # a strong reference from the value would keep the key alive

        def initial(rank: int | None) -> dict[str, np.ndarray]:
            return {k: v.detach().cpu().numpy() for k, v in ref().initial_payload(rank).items()}

        record = Path(client.state_dir) / f"record-partition-{partition_id}.jsonl"
        per[partition_id] = Guard(client.manifest, initial, client.cfg.client.max_global_norm_factor, record, client.rank_for(partition_id))
    return per[partition_id]
