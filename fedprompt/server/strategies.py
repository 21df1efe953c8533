"""Flower's own strategy classes, chosen and parameterised by `federation.*`.

fedprompt adds no aggregation math here: sampling and aggregation are Flower's. It adds the
pieces a resumable server needs: which metrics are averaged, and the strategy's internal state
(FedAdam/FedYogi moments) as named arrays for the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from fedprompt.config import Config, FederationConfig
from fedprompt.protocol import NUM_EXAMPLES as WEIGHT_KEY
from fedprompt.protocol import UNIFORM_WEIGHT as UNIFORM_KEY  # client-level DP: a uniform mean (share <= clip/m)
from fedprompt.protocol import WORKER_KEYS  # worker bookkeeping and privacy accounts: never averaged


def weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Mean of every metric but the weights and the worker bookkeeping, weighted by
    `weight_key`; the example count is always the sum of num-examples."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in rows) or 1.0
    # Keys every reply has (the replies' metrics were checked against protocol.METRICS).
    keys = [k for k in rows[0].keys() if k not in (weight_key, WEIGHT_KEY, UNIFORM_KEY, *WORKER_KEYS) and all(k in m for m in rows)]
    out = {k: sum(float(m[k]) * float(m[weight_key]) for m in rows) / total for k in keys}
    out[WEIGHT_KEY] = int(sum(float(m[WEIGHT_KEY]) for m in rows))
    return MetricRecord(out)


def client_dp(cfg: Config) -> bool:
    return cfg.privacy.mode in ("client", "both")


def sampled_clients(cfg: Config) -> int:
    """Clients per training round when all federation.num_clients are connected (always so
    under client-level DP, see make_strategy)."""
    return max(int(cfg.federation.num_clients * cfg.federation.fraction_fit), 1)


def make_strategy(cfg: Config) -> fl.Strategy:
    """The Flower strategy of `federation.strategy`, sampling `fraction_fit` of the connected
    clients to train (at least `min_clients`) once `min_clients` are connected; under
    client-level DP wrapped in Flower's DP wrapper of `privacy.clipping` / `adaptive_clipping`."""
    f = cfg.federation
    common = dict(
        fraction_train=f.fraction_fit,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        # Client-level DP noise is sized for a fixed number of clients per round: wait for all.
        min_available_nodes=f.num_clients if client_dp(cfg) else f.min_clients,
        # Example counts are claims: round loop caps them (server/trust.py) before this weighs by them.
        weighted_by_key=UNIFORM_KEY if client_dp(cfg) or f.weighting == "uniform" else WEIGHT_KEY,
        train_metrics_aggr_fn=weighted_mean,
        # Evaluation figures are always example-weighted (the uniform weight is for updates).
        evaluate_metrics_aggr_fn=lambda records, _key: weighted_mean(records, WEIGHT_KEY),
    )
    inner = _inner(cfg, common)
    return _dp_wrap(cfg, inner) if client_dp(cfg) else inner


def _dp_wrap(cfg: Config, inner: fl.FedAvg) -> fl.Strategy:
    # Fixed clipping only: config/checks.py refuses Flower's adaptive wrappers (see there).
    p, m = cfg.privacy, sampled_clients(cfg)
    cls = fl.DifferentialPrivacyServerSideFixedClipping if p.clipping == "server" else fl.DifferentialPrivacyClientSideFixedClipping
    return cls(inner, p.client_noise_multiplier, p.client_clip_norm, m)


@dataclass(frozen=True)
class StrategySpec:
    """How `federation.strategy` = a name becomes a Flower strategy. `build(f, common)` makes it
    from the federation section and the shared keyword arguments; `select(f, n)`, for the Krum
    family, says how many of the round's n replies robust.krum_select keeps before the mean
    (Flower's Krum scores raw float32 parameters, where distances between tiny updates drown in
    rounding: the choice is fedprompt's, on the updates in float64, and FedAvg means the kept)."""

    build: Callable[[FederationConfig, dict], fl.FedAvg]
    select: Callable[[FederationConfig, int], int] | None = None


STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(lambda f, c: fl.FedAvg(**c)),
    "fedprox": StrategySpec(lambda f, c: fl.FedProx(**c, proximal_mu=f.proximal_mu)),
    # Server momentum (Hsu et al. 2019) on the clients' mean update at server learning rate 1:
    # the first round steps like FedAvg, later ones carry server_momentum of the previous step.
    "fedavgm": StrategySpec(lambda f, c: fl.FedAvgM(**c, server_learning_rate=1.0, server_momentum=f.server_momentum)),
    "fedadam": StrategySpec(lambda f, c: fl.FedAdam(**c, eta=f.server_lr)),
    "fedyogi": StrategySpec(lambda f, c: fl.FedYogi(**c, eta=f.server_lr)),
    "fedmedian": StrategySpec(lambda f, c: fl.FedMedian(**c)),
    "trimmedmean": StrategySpec(lambda f, c: fl.FedTrimmedAvg(**c, beta=f.trim_fraction)),
    "krum": StrategySpec(lambda f, c: fl.FedAvg(**c), select=lambda f, n: 1),
    "multikrum": StrategySpec(lambda f, c: fl.FedAvg(**c), select=lambda f, n: n - f.num_malicious),
}


def _inner(cfg: Config, common: dict) -> fl.FedAvg:
    return STRATEGIES[cfg.federation.strategy].build(cfg.federation, common)  # config/checks.py validated the name


# Server-optimizer moments of FedOpt strategies (FedAdam, FedYogi): dicts name -> array.
_STATE_SLOTS = ("m_t", "v_t")


def begin_round(strategy: fl.Strategy) -> None:
    """Before configure_train: FedAvgM steps from the global it is given there (fedprompt's
    global is the truth, also after a rollback or a resume: Flower's FedAvgM would keep the one
    it saw first and then its own last aggregate)."""
    inner = getattr(strategy, "strategy", strategy)
    if isinstance(inner, fl.FedAvgM):
        inner.current_arrays = None  # configure_train sets it from the arrays it is passed


def strategy_state(strategy: fl.Strategy) -> dict[str, dict[str, np.ndarray]]:
    """The strategy's state that a resumed server must restore to continue exactly (and, under
    client-level DP, the adaptive clip norm)."""
    inner = getattr(strategy, "strategy", strategy)
    state = {slot: dict(getattr(inner, slot)) for slot in _STATE_SLOTS if getattr(inner, slot, None)}
    if isinstance(inner, fl.FedAvgM) and inner.momentum_vector is not None:
        # A list in the order of the arrays it steps (the global's): kept by name.
        state["momentum"] = {k: np.array(v) for k, v in zip(inner.current_arrays.keys(), inner.momentum_vector, strict=True)}
    if inner is not strategy:
        state["dp"] = {"clipping_norm": np.array([strategy.clipping_norm], dtype=np.float64)}
    return state


def restore_strategy(strategy: fl.Strategy, state: dict[str, dict[str, np.ndarray]], order: list[str]) -> None:
    """Put back a `strategy_state` snapshot; a slot the snapshot lacks was unset (None) then."""
    inner = getattr(strategy, "strategy", strategy)
    for slot in _STATE_SLOTS:
        if hasattr(inner, slot):
            setattr(inner, slot, {k: np.array(v) for k, v in state[slot].items()} if slot in state else None)
    if isinstance(inner, fl.FedAvgM):  # `order`: the global's keys, the order configure_train passes them in
        inner.momentum_vector = [np.array(state["momentum"][k]) for k in order] if "momentum" in state else None
    if "dp" in state and inner is not strategy:
        strategy.clipping_norm = float(state["dp"]["clipping_norm"][0])
