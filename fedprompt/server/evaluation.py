"""A round's evaluation: the global payload's figures, federated (each sampled client on its own
test split) and, in simulation, centralized (the whole held-out test split, on one worker).

The federated headline is robust to a lying client (server/trust.py, robust_figures): the
median of the clients' own figures once three or more reported, with the weighted mean (claims
capped) and each node's figures beside it in the row.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedprompt.config import Config
from fedprompt.protocol import NUM_EXAMPLES, UNIFORM_WEIGHT, WORKER_KEYS, Kind, MetricError
from fedprompt.server.aggregate import log
from fedprompt.server.messages import ask, exchange, known_metrics
from fedprompt.server.strategies import client_dp
from fedprompt.server.trust import Patience, cap_weights, robust_figures
from fedprompt.wire import error_reason, to_record

NOT_FIGURES = (NUM_EXAMPLES, UNIFORM_WEIGHT, *WORKER_KEYS)


def evaluate(grid: Grid, cfg: Config, strategy, rnd: int, tensors: dict, *, centralized: bool, patience: Patience, busy: frozenset[int] = frozenset()) -> dict:
    """The row's evaluation figures of `tensors` after round `rnd`. `busy`: nodes that did not
    answer this round's training (still working, or hung): not asked to evaluate."""
    row: dict = {}
    msgs = [m for m in strategy.configure_evaluate(rnd, to_record(tensors), ConfigRecord({}), grid) if m.metadata.dst_node_id not in busy]
    if msgs:
        t0 = time.monotonic()
        replies = exchange(grid, msgs, patience.timeout(Kind.EVALUATE))
        if len(replies) == len(msgs):
            patience.took(Kind.EVALUATE, time.monotonic() - t0)
        else:
            log(f"round {rnd}: {len(msgs) - len(replies)} of {len(msgs)} clients did not answer the evaluation within {patience.timeout(Kind.EVALUATE):.0f} s")
        row.update(_federated(cfg, rnd, replies))
    if centralized:
        node = sorted(grid.get_node_ids())[0]
        content = RecordDict({"arrays": to_record(tensors), "config": ConfigRecord({"scope": "centralized", "server-round": rnd})})
        reply = ask(grid, node, Kind.EVALUATE, content, patience.timeout(Kind.EVALUATE))
        metrics = checked(reply, rnd, "evaluation")
        if metrics is not None:
            row.update({k: float(v) for k, v in metrics.items() if k not in NOT_FIGURES})
    else:  # deployment: the server holds no data; the federated figures are the figures
        row.update({k[4:]: v for k, v in list(row.items()) if k.startswith("fed_") and not k.endswith(("_weighted", "_examples", "_nodes"))})
    row.setdefault("accuracy", None)
    row.setdefault("loss", None)
    return row


def _federated(cfg: Config, rnd: int, replies: list[Message]) -> dict:
    per_node: dict[int, dict[str, float]] = {}
    claims: dict[int, float] = {}
    for rep in replies:
        metrics = checked(rep, rnd, "evaluation")
        if metrics is None:
            continue
        node = rep.metadata.src_node_id
        claims[node] = float(metrics[NUM_EXAMPLES])
        per_node[node] = {k: float(v) for k, v in metrics.items() if k not in NOT_FIGURES}
    if not per_node:
        return {}
    f = cfg.federation
    weights = {n: 1.0 for n in claims} if f.weighting == "uniform" else cap_weights(claims, f.max_weight_factor)[0]
    row = robust_figures(per_node, weights)
    row["fed_examples"] = int(sum(claims[n] if f.weighting == "uniform" else weights[n] for n in claims))
    if not client_dp(cfg):  # under client-level DP nothing is published per client
        row["fed_nodes"] = {str(n): {**per_node[n], "examples": int(claims[n])} for n in sorted(per_node)}
    return row


def checked(rep: Message, rnd: int, what: str) -> dict | None:
    """The reply's known metrics (messages.known_metrics), or None (logged, its node named)."""
    node = rep.metadata.src_node_id
    if rep.has_error():
        log(f"round {rnd}: node {node} failed the {what}: {error_reason(rep)}")
        return None
    try:
        return known_metrics(rep, rnd)
    except MetricError as e:
        log(f"round {rnd}: {what} of node {node} rejected: {e}")
        return None
