"""A secure training round: Flower 1.42's SecAgg+ stages driven from fedprompt's round loop.

The server never holds one client's update, only the weighted mean of the round's updates.
All the cryptography and the protocol's arithmetic are Flower's (`SecAggPlusWorkflow`'s four
stage methods; `secaggplus_mod` on the clients, see client/secagg.py). fedprompt supplies
what the stages expect around them:
- a `StageGrid` whose `send_and_receive` is fedprompt's `exchange` (its patience, its polling),
  counting wire bytes per stage and per client;
- a capture-only legacy Strategy (`_Capture`): `configure_fit` names the nodes fedprompt's
  strategy sampled, `aggregate_fit` keeps the unmasked mean and aggregates nothing itself;
- the weights: the clients' claims arrive with the setup replies and are capped as in a plain
  round before anything is masked; each node's stage-2 request (fedprompt's usual train request)
  carries its weight, scaled so the largest is Flower's `max_weight`;
- one restart of setup with the survivors when a node is lost before its key shares went out
  (Flower's stages alone would halt at unmask: the survivors never received its shares).

A round that halts releases nothing and says why; the caller keeps the global state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

from fedprompt.config import Config
from fedprompt.config.checks import SECAGG_MODULUS, secagg_problem, secagg_shares
from fedprompt.protocol import NUM_EXAMPLES, MetricError, check_metrics
from fedprompt.protocol import SECAGG_CLAIM as CLAIM
from fedprompt.protocol import SECAGG_NORM_BOUND as NORM_BOUND
from fedprompt.protocol import SECAGG_WEIGHT as WEIGHT
from fedprompt.server.messages import exchange
from fedprompt.server.strategies import client_dp
from fedprompt.server.trust import Patience
from fedprompt.wire import error_reason, wire_bytes

MAX_WEIGHT = 1000.0  # Flower's max_weight: the largest weight is scaled to exactly this (d_i = 1)
KEYS = "secagg-keys"  # Patience's kind for the key stages (setup, share-keys, unmask): no training
KEY_FIRST_WAIT = 120.0  # seconds a key stage waits before any history (a SuperNode polls every 3 s)
STAGES = tuple(Stage.all())  # setup, share_keys, collect_masked_vectors, unmask


def stage_of(msg: Message) -> str:
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return str(cfg[Key.STAGE]) if cfg is not None and Key.STAGE in cfg else "?"


@dataclass
class SecureResult:
    """What a secure round released. `update`: the weighted mean update (name -> array, in the
    global's order; None when nothing was released, with `why`). `in_sum`: nodes whose masked
    update is in the mean; `weights`: their capped claims (the mean's weights, in claim units);
    `replies`: their stage-2 replies (fedprompt's metrics, in the clear); `lost`: nodes lost per
    stage; `bytes`: per stage, per node, (down, up) wire bytes."""

    update: dict[str, np.ndarray] | None
    why: str = ""
    sampled: list[int] = field(default_factory=list)
    in_sum: list[int] = field(default_factory=list)
    weights: dict[int, float] = field(default_factory=dict)
    replies: list[Message] = field(default_factory=list)
    lost: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    num_shares: int = 0
    threshold: int = 0
    bytes: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    collect_errors: int = 0  # stage-2 error replies (a client whose training failed)
    collect_s: float | None = None  # seconds of stage 2 when every client answered

    @property
    def released(self) -> bool:
        return self.update is not None


class StageGrid:
    """What the workflow's stages call (`send_and_receive`), over fedprompt's `exchange`;
    wire bytes per stage and node, and every reply, kept."""

    def __init__(self, grid, timeout: Callable[[str], float]):
        self.grid, self.timeout = grid, timeout
        self.bytes: dict[str, dict[int, list[int]]] = {}
        self.replies: dict[str, list[Message]] = {}
        self.asked: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.lost: dict[str, int] = {}

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        msgs = list(messages)
        stage = stage_of(msgs[0]) if msgs else "?"
        per = self.bytes.setdefault(stage, {})
        for m in msgs:
            per.setdefault(m.metadata.dst_node_id, [0, 0])[0] += wire_bytes(m)
        t0 = time.perf_counter()
        replies = exchange(self.grid, msgs, self.timeout(stage))
        self.seconds[stage] = time.perf_counter() - t0
        for r in replies:
            per.setdefault(r.metadata.src_node_id, [0, 0])[1] += wire_bytes(r)
        self.replies[stage], self.asked[stage] = replies, len(msgs)  # the last attempt's
        self.lost[stage] = self.lost.get(stage, 0) + len(msgs) - sum(not r.has_error() for r in replies)
        return replies


class _Capture(Strategy):
    """The legacy Strategy the stages call: `configure_fit` names the sampled nodes (the
    workflow uses only their ids); `aggregate_fit` keeps the unmasked mean (every result
    carries the same one) and aggregates nothing."""

    def __init__(self, nodes: list[int]):
        self.nodes, self.mean = nodes, None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(n, None, 0), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def norm_bound(cfg: Config) -> float:
    """The L2 bound each client applies to its update before masking (0: none):
    federation.client_norm_bound, and under client-level DP privacy.client_clip_norm (the
    noise is sized for it), the smaller where both are set."""
    bounds = [b for b in (cfg.federation.client_norm_bound, cfg.privacy.client_clip_norm if client_dp(cfg) else 0.0) if b > 0]
    return min(bounds, default=0.0)


def clipping_range(cfg: Config) -> float:
    """The largest |coordinate| of an update kept exactly (an update of L2 norm <= b has every
    coordinate within b)."""
    return cfg.federation.clipping_range or norm_bound(cfg)


def error_bound(c: float, q: int, ratios: list[float], spread: float) -> float:
    """Per coordinate, |secure mean - plain weighted mean| of the same updates is below this.
    c: clipping range; q: quantization range; ratios: each summed client's quantized weight
    ratio d_i (the largest is 1); spread: max_i x_i - min_i x_i of the updates at a coordinate.
    Stochastic rounding moves each value by < one quantum 2c/q, float32 arithmetic before it
    by < 3.5 q 2^-24 quanta; quantizing the weights to 1/q moves the weighted mean by
    < n spread / (2 q D)."""
    n, d = len(ratios), sum(ratios)
    return n * ((1 + 3.5 * q * 2.0**-24) * 2 * c + spread / 2) / (q * d)


def secure_round(grid, cfg: Config, rnd: int, requests: list[Message], like: dict, patience: Patience, fit_timeout: float, weigh) -> SecureResult:
    """`_secure_round` with Flower's log lines (legacy workflow chatter such as "configure_fit:
    strategy sampled 5 clients (out of 0)") kept out of the server's log; fedprompt says what
    happened in its own lines and the row."""
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.CRITICAL)
    try:
        return _secure_round(grid, cfg, rnd, requests, like, patience, fit_timeout, weigh)
    finally:
        flwr_log.setLevel(level)


def _secure_round(
    grid,
    cfg: Config,
    rnd: int,
    requests: list[Message],
    like: dict[str, np.ndarray],
    patience: Patience,
    fit_timeout: float,
    weigh: Callable[[dict[int, float]], dict[int, float]],
) -> SecureResult:
    """One SecAgg+ round over `requests` (the strategy's train requests, one per sampled node):
    the stages, a restart of setup after a loss before share-keys completed, and the unmasked
    weighted mean update, named and shaped as the global `like`. `weigh(claims) -> weights`
    caps the claims (trust.cap_weights, logged by the caller). `fit_timeout`: seconds stage 2
    (training) waits; the key stages wait as `patience` says for their own kind."""
    f = cfg.federation
    want = {m.metadata.dst_node_id: m.content for m in requests}
    nodes = sorted(want)
    out = SecureResult(None, sampled=nodes)

    def timeout(stage: str) -> float:
        if stage == Stage.COLLECT_MASKED_VECTORS:
            return fit_timeout
        return patience.timeout(KEYS) if patience.fixed or KEYS in patience.seen else KEY_FIRST_WAIT

    sg = StageGrid(grid, timeout)
    out.bytes, out.lost = sg.bytes, sg.lost
    for attempt in range(2):  # at most one restart: each costs the survivors two key exchanges
        out.num_shares, out.threshold = secagg_shares(f.num_shares, f.reconstruction_threshold, len(nodes))
        problem = secagg_problem(out.num_shares, out.threshold, len(nodes), f.quantization_range)
        if problem:
            out.why = f"{len(nodes)} clients left in the round: {problem}"
            return out
        wf = SecAggPlusWorkflow(
            out.num_shares,
            out.threshold,
            max_weight=MAX_WEIGHT,
            clipping_range=clipping_range(cfg),
            quantization_range=f.quantization_range,
            modulus_range=SECAGG_MODULUS,
        )
        capture = _Capture(nodes)
        ctx = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=capture)
        ctx.state.config_records["config"] = ConfigRecord({"current_round": rnd})
        ctx.state.array_records["parameters"] = ArrayRecord()
        st = WorkflowState()
        t0 = time.perf_counter()
        ok = _stage(wf.setup_stage, sg, ctx, st, out)
        if ok:
            out.weights = weigh(_claims(sg.replies.get(Stage.SETUP, []), rnd))
            top = max(out.weights.values())
            # The stage-2 request is fedprompt's usual train request plus the node's weight
            # (a node lost in setup has none: it is never asked to train).
            st.nid_to_fitins = {n: _request(want[n], w / top * MAX_WEIGHT, norm_bound(cfg)) for n, w in out.weights.items()}
            ok = _stage(wf.share_keys_stage, sg, ctx, st, out)
        if ok and st.active_node_ids == st.sampled_node_ids:
            patience.took(KEYS, time.perf_counter() - t0)
        if ok and st.active_node_ids != st.sampled_node_ids:
            lost = sorted(st.sampled_node_ids - st.active_node_ids)
            if attempt == 1:  # survivors of a restart never got the lost node's shares either
                out.why = f"node(s) {', '.join(map(str, lost))} lost before their key shares went out, again after a restart"
                return out
            out.restarts += 1
            nodes = sorted(st.active_node_ids)
            _say(rnd, f"secure aggregation: node(s) {', '.join(map(str, lost))} lost before their key shares went out; setup again with {len(nodes)}")
            continue
        break
    ok = ok and _stage(wf.collect_masked_vectors_stage, sg, ctx, st, out)
    answers = sg.replies.get(Stage.COLLECT_MASKED_VECTORS, [])
    collected = [r for r in answers if not r.has_error()]
    out.replies = sorted(collected, key=lambda r: r.metadata.src_node_id)  # they trained: their privacy is spent
    out.collect_errors = len(answers) - len(collected)
    if len(answers) == sg.asked.get(Stage.COLLECT_MASKED_VECTORS, -1):  # complete: it teaches the patience
        out.collect_s = sg.seconds[Stage.COLLECT_MASKED_VECTORS]
    ok = ok and _stage(wf.unmask_stage, sg, ctx, st, out)
    if not ok or capture.mean is None:
        out.why = out.why or "unmasking returned no mean"
        return out
    out.in_sum = sorted(r.metadata.src_node_id for r in collected)
    out.weights = {n: out.weights[n] for n in out.in_sum}
    mean = [np.asarray(a) for a in capture.mean]
    if [a.shape for a in mean] != [like[k].shape for k in like]:  # a client masked other tensors
        out.why = f"the unmasked mean has shapes {[a.shape for a in mean]}, the global {[like[k].shape for k in like]}"
        return out
    out.update = dict(zip(like, mean, strict=True))
    return out


def _stage(method, sg: StageGrid, ctx: LegacyContext, st: WorkflowState, out: SecureResult) -> bool:
    """One of Flower's stage methods; a reply it cannot read (a client that does not speak the
    protocol) halts the round with the reason instead of stopping the server."""
    stage = method.__name__.removesuffix("_stage")
    try:
        if method(sg, ctx, st):
            return True
    except Exception as e:  # noqa: BLE001 - any malformed reply: this round releases nothing
        out.why = f"secure aggregation stopped at {stage}: a reply it cannot read ({type(e).__name__}: {e})"
        return False
    replies = sg.replies.get(stage, [])
    ok = sum(not r.has_error() for r in replies)
    errors = [error_reason(r) for r in replies if r.has_error()]
    out.why = (
        f"secure aggregation stopped at {stage}: {ok} of {sg.asked.get(stage, 0)} clients answered; threshold {out.threshold} "
        f"needs each client's secret holders to keep {out.threshold} alive" + (f" (a client's error: {errors[0]})" if errors else "")
    )
    return False


def _claims(replies: list[Message], rnd: int) -> dict[int, float]:
    """Each setup reply's claimed example count; a missing or impossible one counts as the
    smallest valid claim of the round (logged): its weight is the client's own doing."""
    claims, bad = {}, []
    for r in replies:
        if r.has_error():
            continue
        node = r.metadata.src_node_id
        try:
            claims[node] = float(check_metrics(dict(r.content[CLAIM]))[0][NUM_EXAMPLES])
        except (KeyError, TypeError, MetricError) as e:
            bad.append(node)
            _say(rnd, f"node {node} sent no valid claim with its secure-aggregation keys ({e}); weighed as the round's smallest")
    floor = min(claims.values(), default=1.0)
    return claims | {n: floor for n in bad}


def _request(content: RecordDict, weight: float, norm_bound: float) -> RecordDict:
    config = ConfigRecord({**dict(content["config"]), WEIGHT: float(weight), NORM_BOUND: float(norm_bound)})
    return RecordDict({"arrays": content["arrays"], "config": config})


def _say(rnd: int, text: str) -> None:
    from fedprompt.server.aggregate import log

    log(f"round {rnd}: {text}")


def describe(res: SecureResult, c: float, q: int) -> dict:
    """The round row's secure-aggregation fields (metrics.jsonl), and the per-client bytes of
    the whole exchange (largest client), comparable with a plain round's."""
    per_node: dict[int, list[int]] = {}
    stages = {}
    for stage in STAGES:
        nb = res.bytes.get(stage, {})
        for node, (d, u) in nb.items():
            tot = per_node.setdefault(node, [0, 0])
            tot[0], tot[1] = tot[0] + d, tot[1] + u
        stages[stage] = {
            "down": max((d for d, _ in nb.values()), default=0),
            "up": max((u for _, u in nb.values()), default=0),
            "down_total": sum(d for d, _ in nb.values()),
            "up_total": sum(u for _, u in nb.values()),
        }
    ups = [u for n, (_, u) in per_node.items() if n in res.in_sum] or [0]
    top = max(res.weights.values(), default=1.0)
    ratios = [round(w / top * q) / q for w in res.weights.values()]
    row = {
        "secure": True,
        "secagg_sampled": len(res.sampled),
        "secagg_in_sum": len(res.in_sum),
        "secagg_lost": {s: res.lost.get(s, 0) for s in STAGES},
        "secagg_restarts": res.restarts,
        "secagg_num_shares": res.num_shares,
        "secagg_threshold": res.threshold,
        "secagg_clipping_range": c,
        "secagg_quantization_range": q,
        # Per coordinate, against plain FedAvg on the same updates (no update exceeds c / d_i).
        "secagg_error_bound": error_bound(c, q, ratios, 2 * c / min(ratios)) if res.released else None,
        "bytes_stages": stages,
        "bytes_up": max(ups),
        "bytes_up_min": min(ups),
        "bytes_up_total": sum(u for _, u in per_node.values()),
        "bytes_down": max((d for d, _ in per_node.values()), default=0),
        "bytes_down_total": sum(d for d, _ in per_node.values()),
    }
    if not res.released:
        row["released_why"] = res.why
    return row
