"""What a client does with one request from the server. Plain Python: no Flower, no sockets.

A request is a dict: kind ("init" | "fit" | "evaluate"), round, tensors (name -> numpy array),
partition_id, and for fit proximal_mu, for evaluate scope ("local" | "centralized"). The
reply is a dict: tensors (init and fit), metrics (numbers, with "num-examples", the worker's
"pid" and its "backbone_loads") and, for init, adapter_config (the adapter_config.json text).
The same function serves a simulation worker (in the Ray actor) and a `fedprompt client`
process (behind the bridge).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_CLIENTS: dict[tuple, object] = {}  # (config text, num_partitions) -> LocalClient, one per process


def client_for(config_file: str | Path, num_partitions: int):
    """The LocalClient of this config in this process: built on first use, then reused by
    every virtual client the process serves (one backbone per worker process)."""
    from fedprompt.config import load_config
    from fedprompt.local import LocalClient

    text = Path(config_file).read_text(encoding="utf-8")
    key = (text, num_partitions)
    if key not in _CLIENTS or _CLIENTS[key].cfg.client.reload_per_message:
        _CLIENTS.clear()  # a new run in a reused worker: drop the previous backbone first
        cfg = load_config(config_file)
        # A simulation keeps its virtual clients' privacy ledgers in the run directory.
        state_dir = cfg.client.state_dir or Path(config_file).parent / "clients"
        _CLIENTS[key] = LocalClient(cfg, num_partitions=num_partitions, state_dir=state_dir)
    return _CLIENTS[key]


def handle(client, request: dict) -> dict:
    """Serve one request with `client` (a fedprompt.local.LocalClient)."""
    import torch

    from fedprompt import local

    kind, pid = request["kind"], int(request.get("partition_id", 0))
    source = f"server (round {request.get('round', 0)})"
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in request.get("tensors", {}).items()}
    worker = {"pid": os.getpid(), "backbone_loads": local.BACKBONE_LOADS}
    if kind == "init":
        init = client.initial_payload()
        return {"tensors": _numpy(init), "adapter_config": client.adapter_config_json(),
                "metrics": {"num-examples": len(client.shard(pid).train), **worker}}
    if kind == "fit":
        res = client.fit(tensors, partition_id=pid, round_num=int(request["round"]), source=source,
                         proximal_mu=float(request.get("proximal_mu", 0.0)))
        metrics = {"num-examples": res.num_examples, "uniform-weight": 1, **res.metrics, **worker}
        # In the order the server sent them: Flower's DP clipping pairs arrays by position.
        ordered = {k: res.tensors[k] for k in tensors} if set(tensors) == set(res.tensors) else res.tensors
        reply = _numpy(ordered)
        if attacking(client.cfg, pid):
            from fedprompt.federation.robust import scale_update

            reply = scale_update(_numpy(tensors), reply, client.cfg.attack.scale)
        return {"tensors": reply, "metrics": metrics}
    if kind == "evaluate":
        scope = None if request.get("scope") == "centralized" else pid
        metrics, n = client.evaluate(tensors, partition_id=scope, source=source)
        return {"metrics": {"num-examples": n, "uniform-weight": 1, **metrics, **worker}}
    raise ValueError(f"unknown request kind {kind!r}")


def attacking(cfg, partition_id: int) -> bool:
    """Partition `partition_id` poisons its updates (attack.*, simulation only: the last
    attack.clients of federation.num_clients, so the audited client 0 stays honest)."""
    return cfg.attack.clients > 0 and partition_id >= cfg.federation.num_clients - cfg.attack.clients


def _numpy(tensors: dict) -> dict[str, np.ndarray]:
    return {k: t.detach().cpu().numpy() for k, t in tensors.items()}
