"""A server round loop (real LocalClients on a tiny model behind the in-process grid) run as
its own process, that SIGKILLs itself at a chosen point: tests/test_server_faults.py.

    python -m tests.faultserver OUT POINT ROUND

POINT: none | aggregate | checkpoint-write | checkpoint-rename | metrics-append; ROUND: the
round in which to die (the first time the point is reached in it).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch


def config():
    from tests.tiny import tiny_config

    return tiny_config(
        "bert",
        "prompt",
        federation__num_clients=3,
        federation__rounds=4,
        federation__min_clients=2,
        data__partition="iid",
        train__lr=0.05,
        federation__fraction_fit=1.0,
        federation__strategy="fedadam",
        federation__server_lr=0.05,
    )


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, rnd: int) -> None:
    """Patch the one function in whose middle this process dies in round `rnd`."""
    import safetensors.numpy
    from flwr.serverapp import strategy as fl

    from fedprompt.server import app as server_app

    current = {"round": 0}
    if point == "aggregate":  # after Flower computed the aggregate, before anything is kept
        original = fl.FedAdam.aggregate_train

        def aggregate(self, server_round, replies):
            out = original(self, server_round, replies)
            if server_round == rnd:
                die()
            return out

        fl.FedAdam.aggregate_train = aggregate
        return
    original_save = server_app.checkpoint.save

    def save(folder, state):
        current["round"] = state.round
        return original_save(folder, state)

    server_app.checkpoint.save = save
    if point == "checkpoint-write":  # half of the new file's bytes on disk, then death
        write = safetensors.numpy.save_file

        def save_file(arrays, path, metadata=None):
            write(arrays, path, metadata=metadata)
            if current["round"] == rnd:
                data = Path(path).read_bytes()
                Path(path).write_bytes(data[: len(data) // 2])
                die()

        safetensors.numpy.save_file = save_file
    elif point == "checkpoint-rename":  # the old checkpoint moved aside, the new one not yet in place
        replace = os.replace

        def os_replace(src, dst):
            replace(src, dst)
            if current["round"] == rnd and str(dst).endswith(".prev.safetensors"):
                die()

        os.replace = os_replace
    elif point == "metrics-append":  # the checkpoint written, its metrics row not yet
        append = server_app.append_jsonl

        def append_jsonl(path, row):
            if row["round"] == rnd:
                die()
            append(path, row)

        server_app.append_jsonl = append_jsonl
    else:
        raise SystemExit(f"unknown point {point!r}")


def main(out: str, point: str, rnd: int) -> None:
    torch.set_num_threads(1)  # the same arithmetic in every process, so digests compare
    from fedprompt.local import LocalClient
    from fedprompt.server.app import serve
    from tests.fakegrid import FakeGrid, client_responder

    cfg = config()
    client = LocalClient(cfg, num_partitions=3)
    grid = FakeGrid({101 + i: client_responder(client, i) for i in range(3)})
    if point != "none":
        arm(point, rnd)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(cfg.to_yaml())
    serve(grid, cfg, folder, centralized=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
