"""The vocabulary both sides share: what a server asks a client and what the client answers.

One exchange is a `Request` (its kind, the round, the global tensors, the kind's options) and
a `Reply` (tensors, metrics, and for `init` the adapter config). Flower carries them as
messages (client/app.py converts); the client's work (client/handler.py) sees
only these objects. Plain Python and numpy: no Flower, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from fedprompt.errors import UserError


class Kind(StrEnum):
    """What the server asks for."""

    INIT = "init"  # the method's initial tensors (round 0's global state) and adapter config
    FIT = "fit"  # local training from the global tensors; the updated tensors back
    EVALUATE = "evaluate"  # the global tensors' metrics on the client's test split
    # The partition's size, before training: a secure round's weight is fixed before anything is
    # masked (client/secagg.py). Never a message of its own: it rides in a secure round's setup.
    CLAIM = "claim"


# The Flower message type that carries each kind (Flower's names for them).
MESSAGE_TYPE = {Kind.INIT: "query", Kind.FIT: "train", Kind.EVALUATE: "evaluate"}
KIND_OF = {t: k for k, t in MESSAGE_TYPE.items()}

# Metric keys of a reply.
NUM_EXAMPLES = "num-examples"  # the client's claimed example count (the FedAvg weight)
UNIFORM_WEIGHT = "uniform-weight"  # 1 in every reply: the weight of a uniform mean (client-level DP)
WORKER_PID = "pid"  # the serving process (one backbone per process: tests count them)
BACKBONE_LOADS = "backbone_loads"  # backbone loads in that process so far
# A secure round (server/secagg.py, client/secagg.py): the stage-2 request's config carries the
# weight the server assigned to the node (its capped claim, scaled so the largest is Flower's
# max_weight) and federation.client_norm_bound; the setup reply carries the claim.
SECAGG_WEIGHT = "secagg-weight"
SECAGG_NORM_BOUND = "secagg-norm-bound"
SECAGG_CLAIM = "claim"
# Reply metrics that describe the worker or its privacy account, not the update: never averaged.
WORKER_KEYS = (WORKER_PID, BACKBONE_LOADS, "epsilon", "noise_multiplier", "sample_rate", "dp_steps")


@dataclass(frozen=True)
class MetricSpec:
    """What a reply may say under one metric key: a finite number in [lo, hi], an integer
    when `integer`."""

    lo: float = -math.inf
    hi: float = math.inf
    integer: bool = False


# Every metric a fedprompt client sends. A reply's metrics are untrusted input: the server keeps
# only these keys (others are dropped and logged) and rejects a reply whose value is out of range.
METRICS: dict[str, MetricSpec] = {
    NUM_EXAMPLES: MetricSpec(lo=1, integer=True),
    UNIFORM_WEIGHT: MetricSpec(lo=1, hi=1, integer=True),
    WORKER_PID: MetricSpec(lo=1, integer=True),
    BACKBONE_LOADS: MetricSpec(lo=0, integer=True),
    "epsilon": MetricSpec(lo=0),  # the client's sample-level DP spend so far
    "noise_multiplier": MetricSpec(lo=0),
    "sample_rate": MetricSpec(lo=0, hi=1),
    "dp_steps": MetricSpec(lo=0, integer=True),
    "train_loss": MetricSpec(lo=0),  # cross-entropy (+ FedProx's term): never negative
    "train_s": MetricSpec(lo=0),  # seconds of local training
    "loss": MetricSpec(lo=0),
    "accuracy": MetricSpec(lo=0, hi=1),
    "personal_accuracy": MetricSpec(lo=0, hi=1),  # the global under the client's own label prior
    "macro_f1": MetricSpec(lo=0, hi=1),
    "exact_match": MetricSpec(lo=0, hi=1),
}


class MetricError(UserError, ValueError):
    """A reply's metric that no honest client sends (non-finite, out of range, not a number)."""


def check_metrics(metrics: dict) -> tuple[dict[str, float | int], list[str]]:
    """(the known metrics, the unknown keys dropped) of a reply; MetricError names the first
    known metric whose value is not a finite number in its range, or a missing example count."""
    kept: dict[str, float | int] = {}
    for key, value in metrics.items():
        spec = METRICS.get(key)
        if spec is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MetricError(f"metric {key!r} is {_show(value)}, not a finite number")
        if spec.integer and value != int(value):
            raise MetricError(f"metric {key!r} is {value!r}, not an integer")
        if not spec.lo <= value <= spec.hi:
            raise MetricError(f"metric {key!r} is {value!r}, outside [{spec.lo:g}, {spec.hi:g}]")
        kept[key] = int(value) if spec.integer else float(value)
    if NUM_EXAMPLES not in kept:
        raise MetricError(f"metric {NUM_EXAMPLES!r} (the example count) is missing")
    return kept, sorted(_show(k) for k in metrics if k not in METRICS)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."  # a hostile value may be megabytes long


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
    run: int = 0  # the Flower run the request belongs to (a client's record of what it received)
    lora_rank: int = 0  # `init` of a LoRA federation: the global's rank (0: the client's own)


@dataclass
class Reply:
    """A client's answer: metrics always (with NUM_EXAMPLES), tensors for `init` and `fit`,
    adapter_config (adapter_config.json text) and labels (class index -> name; empty for
    generation) for `init`."""

    metrics: dict[str, float | int | str]
    tensors: dict[str, np.ndarray] | None = None
    adapter_config: str | None = None
    labels: list[str] | None = None
