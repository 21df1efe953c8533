"""Flower's own strategy classes, chosen and parameterised by `federation.*`.

fedprompt adds no aggregation math here: sampling and aggregation are Flower's. It adds the
pieces a resumable server needs: which metrics are averaged, and the strategy's internal state
(FedAdam/FedYogi moments) as named arrays for the checkpoint.
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from fedprompt.config import Config

# Reply metrics that describe the worker, not the update: never averaged.
WORKER_KEYS = ("pid", "backbone_loads")
WEIGHT_KEY = "num-examples"


def _weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean of every metric but the weight and the worker bookkeeping."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in rows) or 1.0
    keys = [k for k in rows[0].keys() if k != weight_key and k not in WORKER_KEYS]
    out = {k: sum(float(m[k]) * float(m[weight_key]) for m in rows) / total for k in keys}
    out[weight_key] = int(total)
    return MetricRecord(out)


def make_strategy(cfg: Config) -> fl.FedAvg:
    """The Flower strategy of `federation.strategy`, sampling `fraction_fit` of the connected
    clients to train (at least `min_clients`) once `min_clients` are connected."""
    f = cfg.federation
    common = dict(
        fraction_train=f.fraction_fit,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=f.min_clients,
        weighted_by_key=WEIGHT_KEY,
        train_metrics_aggr_fn=_weighted_mean,
        evaluate_metrics_aggr_fn=_weighted_mean,
    )
    if f.strategy == "fedavg":
        return fl.FedAvg(**common)
    if f.strategy == "fedprox":
        return fl.FedProx(**common, proximal_mu=f.proximal_mu)
    if f.strategy == "fedadam":
        return fl.FedAdam(**common, eta=f.server_lr)
    if f.strategy == "fedyogi":
        return fl.FedYogi(**common, eta=f.server_lr)
    if f.strategy == "fedmedian":
        return fl.FedMedian(**common)
    if f.strategy == "trimmedmean":
        return fl.FedTrimmedAvg(**common, beta=f.trim_fraction)
    raise ValueError(f"federation.strategy: {f.strategy!r} is not known")  # config.py validates first


# Server-optimizer moments of FedOpt strategies (FedAdam, FedYogi): dicts name -> array.
_STATE_SLOTS = ("m_t", "v_t")


def strategy_state(strategy: fl.FedAvg) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's state that a resumed server must restore to continue exactly."""
    return {slot: dict(getattr(strategy, slot)) for slot in _STATE_SLOTS if getattr(strategy, slot, None)}


def restore_strategy(strategy: fl.FedAvg, state: dict[str, dict[str, np.ndarray]]) -> None:
    for slot, arrays in state.items():
        if slot in _STATE_SLOTS and hasattr(strategy, slot):
            setattr(strategy, slot, {k: np.array(v) for k, v in arrays.items()})
