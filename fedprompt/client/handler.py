"""What a client does with one request from the server. Plain Python: no Flower, no sockets.

A `protocol.Request` in, a `protocol.Reply` out, one function per kind (KINDS). The same code
serves a simulation worker (in the Ray actor) and a `fedprompt client` process.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedprompt.protocol import BACKBONE_LOADS, NUM_EXAMPLES, UNIFORM_WEIGHT, WORKER_PID, Kind, Reply, Request

_CLIENTS: dict[tuple, object] = {}  # (config text, num_partitions) -> LocalClient, one per process


def client_for(config_file: str | Path, num_partitions: int):
    """The LocalClient of this config in this process: built on first use, then reused by
    every virtual client the process serves (one backbone per worker process)."""
    from fedprompt.config import load_config
    from fedprompt.local import LocalClient

    text = Path(config_file).read_text(encoding="utf-8")
    key = (text, num_partitions)
    if key not in _CLIENTS or _CLIENTS[key].cfg.client.reload_per_message:
        if _CLIENTS:  # a new run in a reused worker: free the previous backbone first
            _CLIENTS.clear()
            _free_accelerator_memory()
        cfg = load_config(config_file)
        # A simulation keeps its virtual clients' privacy ledgers in the run directory.
        state_dir = cfg.client.state_dir or Path(config_file).parent / "clients"
        _CLIENTS[key] = LocalClient(cfg, num_partitions=num_partitions, state_dir=state_dir)
    return _CLIENTS[key]


def _free_accelerator_memory() -> None:
    """Return a dropped backbone's GPU memory to the device: PyTorch's caching allocator keeps
    freed blocks for reuse by this process, so the next run's backbone (or another process on
    the GPU) would otherwise find the memory still taken."""
    import gc

    import torch

    gc.collect()  # the LocalClient's tensors are freed once nothing refers to them
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _init(client, req: Request, tensors: dict, worker: dict) -> Reply:
    rank = req.lora_rank or None  # a LoRA federation's global rank, whatever this client's own
    return Reply(
        tensors=_numpy({**client.initial_payload(rank), **client.fixed_payload()}),  # the whole seeded adapter
        adapter_config=client.adapter_config_json(rank),
        labels=list(client.state.data.labels),
        metrics={NUM_EXAMPLES: len(client.shard(req.partition_id).train), **worker},
    )


def _fit(client, req: Request, tensors: dict, worker: dict) -> Reply:
    res = client.fit(tensors, partition_id=req.partition_id, round_num=req.round, source=f"server (round {req.round})", proximal_mu=req.proximal_mu)
    metrics = {NUM_EXAMPLES: res.num_examples, UNIFORM_WEIGHT: 1, **res.metrics, **worker}
    # In the order the server sent them: Flower's DP clipping pairs arrays by position.
    ordered = {k: res.tensors[k] for k in tensors} if set(tensors) == set(res.tensors) else res.tensors
    reply = _numpy(ordered)
    if attacking(client.cfg, req.partition_id):
        from fedprompt.lora_aggregation import rank_of, truncate
        from fedprompt.server.robust import scale_update

        reply = scale_update(_numpy(truncate(tensors, rank_of(reply) or 0)), reply, client.cfg.attack.scale)
    return Reply(tensors=reply, metrics=metrics)


def _evaluate(client, req: Request, tensors: dict, worker: dict) -> Reply:
    scope = None if req.scope == "centralized" else req.partition_id
    metrics, n = client.evaluate(tensors, partition_id=scope, source=f"server (round {req.round})")
    return Reply(metrics={NUM_EXAMPLES: n, UNIFORM_WEIGHT: 1, **metrics, **worker})


KINDS = {Kind.INIT: _init, Kind.FIT: _fit, Kind.EVALUATE: _evaluate}


def handle(client, request: Request) -> Reply:
    """Serve one request with `client` (a fedprompt.local.LocalClient), once the client's
    guard accepts the server's global (client/guard.py: GlobalRefused otherwise)."""
    import torch

    from fedprompt.client.guard import GlobalRefused, guard_for

    if request.kind == Kind.CLAIM:  # no global received, nothing to check or record
        return Reply(metrics={NUM_EXAMPLES: len(client.shard(request.partition_id).train)})
    guard = guard_for(client, request.partition_id)
    try:
        guard.check(request)
    except GlobalRefused as e:
        guard.record(request, None, refused=str(e))
        raise
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in request.tensors.items()}
    worker = {WORKER_PID: os.getpid(), BACKBONE_LOADS: client.backbone_loads}
    reply = KINDS[request.kind](client, request, tensors, worker)
    reply.metrics[BACKBONE_LOADS] = client.backbone_loads  # after the work: a multi-rank fit may restart its ranks
    guard.record(request, reply)
    return reply


def attacking(cfg, partition_id: int) -> bool:
    """Partition `partition_id` poisons its updates (attack.*, simulation only: the last
    attack.clients of federation.num_clients, so the audited client 0 stays honest)."""
    return cfg.attack.clients > 0 and partition_id >= cfg.federation.num_clients - cfg.attack.clients


def _numpy(tensors: dict) -> dict[str, np.ndarray]:
    return {k: t.detach().cpu().numpy() for k, t in tensors.items()}
