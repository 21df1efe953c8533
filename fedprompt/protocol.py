"""The vocabulary both sides share: what a server asks a client and what the client answers.

One exchange is a `Request` (its kind, the round, the global tensors, the kind's options) and
a `Reply` (tensors, metrics, and for `init` the adapter config). Flower carries them as
messages (client/app.py converts); the client's work (client/handler.py) sees
only these objects. Plain Python and numpy: no Flower, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Kind(StrEnum):
    """What the server asks for."""

    INIT = "init"  # the method's initial tensors (round 0's global state) and adapter config
    FIT = "fit"  # local training from the global tensors; the updated tensors back
    EVALUATE = "evaluate"  # the global tensors' metrics on the client's test split


# The Flower message type that carries each kind (Flower's names for them).
MESSAGE_TYPE = {Kind.INIT: "query", Kind.FIT: "train", Kind.EVALUATE: "evaluate"}
KIND_OF = {t: k for k, t in MESSAGE_TYPE.items()}

# Metric keys of a reply.
NUM_EXAMPLES = "num-examples"  # the client's claimed example count (the FedAvg weight)
UNIFORM_WEIGHT = "uniform-weight"  # 1 in every reply: the weight of a uniform mean (client-level DP)
WORKER_PID = "pid"  # the serving process (one backbone per process: tests count them)
BACKBONE_LOADS = "backbone_loads"  # backbone loads in that process so far
# Reply metrics that describe the worker or its privacy account, not the update: never averaged.
WORKER_KEYS = (WORKER_PID, BACKBONE_LOADS, "epsilon", "noise_multiplier", "sample_rate", "dp_steps")


@dataclass
class Request:
    """One thing the server asks of one client.

    tensors: name -> array, the global payload (empty for `init`). scope (`evaluate`): "local",
    the client's own test split, or "centralized", the whole test set. partition_id: which of
    the client's partitions serves it (the client sets it, never the server)."""

    kind: Kind
    round: int = 0
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    proximal_mu: float = 0.0
    scope: str = "local"
    partition_id: int = 0


@dataclass
class Reply:
    """A client's answer: metrics always (with NUM_EXAMPLES), tensors for `init` and `fit`,
    adapter_config (adapter_config.json text) for `init`."""

    metrics: dict[str, float | int | str]
    tensors: dict[str, np.ndarray] | None = None
    adapter_config: str | None = None
