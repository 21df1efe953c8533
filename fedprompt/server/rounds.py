"""One federated training round on the server: sample and message clients (the strategy),
check every reply (payload manifest, metrics), screen and bound updates, weigh them by capped
claims, aggregate (the strategy), evaluate, and build the round's metrics row."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedprompt import checkpoint, payload
from fedprompt.config import Config
from fedprompt.lora_aggregation import lora_aggregation, rank_of, reply_manifest, truncate
from fedprompt.protocol import NUM_EXAMPLES, UNIFORM_WEIGHT, WORKER_PID, Kind, MetricError
from fedprompt.server.aggregate import aggregate, log, screen_and_bound
from fedprompt.server.evaluation import evaluate
from fedprompt.server.messages import FederationError, exchange, known_metrics
from fedprompt.server.strategies import WEIGHT_KEY, begin_round, client_dp, sampled_clients, weighted_mean
from fedprompt.server.trust import Claims, Patience, cap_weights
from fedprompt.wire import error_reason, from_record, to_record, wire_bytes

# Why a sampled client's update was not aggregated: an error reply, a payload off the manifest,
# metrics no honest client sends, no reply in time, screened out by its norm.
REJECTIONS = ("error", "payload", "metrics", "no_reply", "screened")


@dataclass
class Watch:
    """What the round loop remembers about participants across rounds (this process's memory)."""

    patience: Patience
    claims: Claims = field(default_factory=Claims)
    capped: set[tuple[int, float]] = field(default_factory=set)  # (node, claim) capped and logged
    ranks: dict[int, int] = field(default_factory=dict)  # mixed LoRA ranks: node -> the rank of its last valid reply


def check_reply(rep: Message, manifest: payload.Manifest, rnd: int, *, mixed: bool = False) -> dict:
    """The reply's known metrics once its payload matches the manifest exactly (under `mixed`
    LoRA ranks, the manifest at the reply's own rank) and its metrics are what an honest client
    sends; else PayloadError / MetricError."""
    node = rep.metadata.src_node_id
    if "arrays" not in rep.content or "metrics" not in rep.content:
        raise payload.PayloadError(f"payload from node {node}: the reply has no tensors or no metrics")
    tensors = from_record(rep.content["arrays"])
    payload.validate(tensors, reply_manifest(tensors, manifest, mixed=mixed, source=f"node {node}"), source=f"node {node}")
    metrics = known_metrics(rep, rnd)
    rep.content["metrics"] = MetricRecord(metrics)  # only known keys reach the strategy's means
    return metrics


def _weigh(cfg: Config, rnd: int, good: list[Message], watch: Watch) -> dict[str, float]:
    """Set each kept reply's FedAvg weight (its example count, capped; or 1 under `uniform`)
    in its metrics; the weights used, by node."""
    f = cfg.federation
    claims = {r.metadata.src_node_id: float(r.content["metrics"][NUM_EXAMPLES]) for r in good}
    for line in watch.claims.note(rnd, claims):
        log(f"round {rnd}: {line}")
    if f.weighting == "uniform" or client_dp(cfg):  # the strategy weighs by protocol.UNIFORM_WEIGHT
        return {str(n): 1.0 for n in claims}
    weights = _cap(cfg, rnd, claims, watch)
    for r in good:
        r.content["metrics"][NUM_EXAMPLES] = weights[r.metadata.src_node_id]
    return {str(n): w for n, w in weights.items()}


def _claimed(cfg: Config, rnd: int, claims: dict[int, float], watch: Watch) -> dict[int, float]:
    """A secure round's weights from the claims of its setup replies (before anything is masked)."""
    for line in watch.claims.note(rnd, claims):
        log(f"round {rnd}: {line}")
    uniform = cfg.federation.weighting == "uniform" or client_dp(cfg)  # client-level DP: a uniform mean (share <= clip/m)
    return dict.fromkeys(claims, 1.0) if uniform else _cap(cfg, rnd, claims, watch)


def _cap(cfg: Config, rnd: int, claims: dict[int, float], watch: Watch) -> dict[int, float]:
    """Each node's claim capped (trust.cap_weights), each capped claim logged once per node."""
    f = cfg.federation
    weights, capped = cap_weights(claims, f.max_weight_factor)
    for node in capped:
        if (node, claims[node]) in watch.capped:
            continue  # said once per node and claim: an honest large client is capped every round
        watch.capped.add((node, claims[node]))
        log(
            f"round {rnd}: node {node} claims {claims[node]:g} training examples; weighed as {weights[node]:g}, "
            f"federation.max_weight_factor {f.max_weight_factor:g} x the round's median claim (said once per node and claim)"
        )
    return weights


def train_round(
    grid: Grid, cfg: Config, strategy, state: checkpoint.ServerState, rnd: int, manifest: payload.Manifest, *, centralized: bool, watch: Watch
) -> tuple[dict, dict]:
    """One round: (new global tensors, metrics row)."""
    t0 = time.perf_counter()
    pr = cfg.privacy
    begin_round(strategy)
    msgs = list(strategy.configure_train(rnd, to_record(state.tensors), ConfigRecord({}), grid))
    mixed = lora_aggregation(cfg.peft.method, cfg.federation.lora_aggregation).mixed
    if mixed:
        _at_known_ranks(msgs, state.tensors, watch.ranks)
    sizes: dict[int, int] = {}  # one serialization per distinct content (the strategy shares one)
    for m in msgs:
        if id(m.content) not in sizes:
            sizes[id(m.content)] = wire_bytes(m)
    downs = [sizes[id(m.content)] for m in msgs] or [0]
    timeout = watch.patience.timeout(Kind.FIT)
    if cfg.federation.secure_aggregation:  # the server only ever holds the mean: server/secagg.py
        tensors, fields, busy = _secure_train(grid, cfg, strategy, state, rnd, manifest, msgs, watch, timeout)
        return tensors, _row(grid, cfg, strategy, rnd, tensors, fields, t0=t0, busy=busy, watch=watch, centralized=centralized)
    # Replies arrive in any order; aggregating in node order makes a round's result a function
    # of who took part, not of who answered first (so a resumed run repeats it bit for bit).
    replies = sorted(exchange(grid, msgs, timeout), key=lambda m: m.metadata.src_node_id)
    if len(replies) == len(msgs):
        watch.patience.took(Kind.FIT, time.perf_counter() - t0)
    good, ups, workers, problems = [], [], {}, []
    rejected = dict.fromkeys(REJECTIONS, 0)  # replies not aggregated, by reason (Prometheus labels)
    for rep in replies:
        node = rep.metadata.src_node_id
        watch.ranks.pop(node, None)  # learnt again from this reply, if it is valid
        if rep.has_error():
            problems.append(f"node {node} failed: {error_reason(rep)}")
            rejected["error"] += 1
            continue
        try:
            metrics = check_reply(rep, manifest, rnd, mixed=mixed)
        except (payload.PayloadError, MetricError) as e:
            problems.append(f"rejected: node {node}: {e}" if isinstance(e, MetricError) else f"rejected: {e}")
            rejected["metrics" if isinstance(e, MetricError) else "payload"] += 1
            continue
        if mixed:
            watch.ranks[node] = rank_of(from_record(rep.content["arrays"]))
        good.append(rep)
        ups.append(wire_bytes(rep))
        if WORKER_PID in metrics:
            workers[str(metrics[WORKER_PID])] = int(metrics.get("backbone_loads", 0))
    answered = {m.metadata.src_node_id for m in replies}
    busy = frozenset(m.metadata.dst_node_id for m in msgs) - answered
    rejected["no_reply"] = len(busy)
    if busy:
        problems.append(f"{len(busy)} of {len(msgs)} sampled clients did not reply within {timeout:.0f} s (node(s) {', '.join(map(str, sorted(busy)))})")
    # Every client that trained spent its privacy, kept or not: its epsilon counts.
    privacy_row = _privacy_row(cfg, state.rows[-1], good)
    good, robust_row = screen_and_bound(cfg, rnd, state.tensors, good, problems)
    rejected["screened"] = robust_row["screened_out"]
    for p in problems:
        log(f"round {rnd}: {p}")
    if not good:
        why = problems[0] if problems else "no client was sampled"
        raise FederationError(f"round {rnd}: no usable update from {len(msgs)} sampled clients ({why})")
    weights = _weigh(cfg, rnd, good, watch)
    if client_dp(cfg) and not len(good) == len(msgs) == sampled_clients(cfg):
        # The noise is sized for m = sampled_clients updates; a mean over any other number
        # would leak more than accounted. The round releases nothing: the global state stays.
        log(f"round {rnd}: client-level DP needs exactly {sampled_clients(cfg)} sampled updates, got {len(good)} of {len(msgs)} sampled; nothing aggregated")
        tensors, train, released = state.tensors, weighted_mean([r.content for r in good], WEIGHT_KEY), False
    else:
        tensors, train, released = aggregate(cfg, strategy, rnd, state, good, manifest)
        if client_dp(cfg):  # a noised aggregate was computed: kept or not, it counts as a release
            privacy_row.update(_client_epsilon(cfg, privacy_row["dp_releases"] + 1), dp_releases=privacy_row["dp_releases"] + 1)
    if client_dp(cfg):
        privacy_row["clip_norm"] = float(strategy.clipping_norm)
        if pr.mode == "client":
            privacy_row["epsilon"] = privacy_row["client_epsilon"]
    fields = {
        "train_loss": float(train["train_loss"]) if train and "train_loss" in train else None,
        "clients": len(good),
        "connected": len(list(grid.get_node_ids())),
        "failures": len(msgs) - len(good),
        "rejected": rejected,
        "examples": int(train[WEIGHT_KEY]),  # our aggregator sums the weights used
        "weights": weights,
        "bytes_up": max(ups),
        "bytes_up_min": min(ups),  # below bytes_up where clients' payloads differ (mixed LoRA ranks)
        "bytes_up_total": sum(ups),
        "bytes_down": max(downs),
        "bytes_down_min": min(downs),  # below bytes_down where clients of a lower LoRA rank get the global at theirs
        "bytes_down_total": sum(downs),
        "client_train_s": float(train["train_s"]) if train and "train_s" in train else None,
        "backbone_loads": workers,
        "released": released,
        **robust_row,
        **privacy_row,
    }
    return tensors, _row(grid, cfg, strategy, rnd, tensors, fields, t0=t0, busy=busy, watch=watch, centralized=centralized)


def _at_known_ranks(msgs: list[Message], global_: dict, ranks: dict[int, int]) -> None:
    """Send a client whose LoRA rank is known from its last reply the global at that rank (its
    top components, lora_aggregation.truncate: exactly what it would cut itself), not the whole
    global: a rank-4 client of a rank-16 federation downloads a quarter of the LoRA bytes."""
    full = rank_of(global_)
    for m in msgs:
        r = ranks.get(m.metadata.dst_node_id)
        if full is not None and r is not None and r < full:
            # A content of its own: Flower's strategies give every message the same RecordDict.
            m.content = RecordDict({**dict(m.content.items()), "arrays": to_record(truncate(global_, r))})


def _row(grid: Grid, cfg: Config, strategy, rnd: int, tensors: dict, fields: dict, *, t0: float, busy, watch: Watch, centralized: bool) -> dict:
    """The round's metrics row: the new global evaluated (not by the `busy` nodes, which did not
    answer), then `fields` and the timings (seconds)."""
    t_train = time.perf_counter() - t0
    row = {"round": rnd, "step": rnd * cfg.round_steps}
    t1 = time.perf_counter()
    row.update(evaluate(grid, cfg, strategy, rnd, tensors, centralized=centralized, patience=watch.patience, busy=busy))
    t_eval = time.perf_counter() - t1
    row.update(fields)
    row.update(train_s=round(t_train, 3), eval_s=round(t_eval, 3), round_s=round(time.perf_counter() - t0, 3))
    return row


def _secure_train(grid: Grid, cfg: Config, strategy, state: checkpoint.ServerState, rnd: int, manifest, msgs: list[Message], watch: Watch, timeout: float):
    """A secure round's training (server/secagg.py): (new global, row fields, nodes that did not
    train). The unmasked weighted mean update, added to the global, becomes one reply for the
    strategy, so FedAvg keeps it and FedAvgM/FedAdam/FedYogi step from it. Nothing to check per
    update here: the server never holds one (the clients' metrics are still checked)."""
    from fedprompt.server import secagg

    res = secagg.secure_round(grid, cfg, rnd, msgs, state.tensors, watch.patience, timeout, lambda claims: _claimed(cfg, rnd, claims, watch))
    if res.collect_s is not None:
        watch.patience.took(Kind.FIT, res.collect_s)
    records, workers, checked = [], {}, []
    for rep in res.replies:
        try:
            metrics = known_metrics(rep, rnd)
        except MetricError as e:
            log(f"round {rnd}: node {rep.metadata.src_node_id}: metrics ignored: {e}")
            continue
        checked.append(rep)
        rep.content["metrics"] = MetricRecord(metrics)
        if WORKER_PID in metrics:
            workers[str(metrics[WORKER_PID])] = int(metrics.get("backbone_loads", 0))
        weight = res.weights.get(rep.metadata.src_node_id, 1.0)
        records.append(RecordDict({"metrics": MetricRecord({**metrics, NUM_EXAMPLES: weight})}))
    train = weighted_mean(records, WEIGHT_KEY) if records else MetricRecord({})
    privacy_row = _privacy_row(cfg, state.rows[-1], checked)
    release, why = res.released, res.why
    if release and client_dp(cfg) and len(res.in_sum) != sampled_clients(cfg):
        # The noise is sized for a mean of sampled_clients updates: a mean of fewer would leak more.
        release, why = False, f"client-level DP needs exactly {sampled_clients(cfg)} updates in the sum, {len(res.in_sum)} survived"
    if release:
        update = res.update
        if client_dp(cfg):  # the noise of Flower's DP wrapper, on the only thing the server holds
            update = secure_noise(strategy, update)
            releases = privacy_row["dp_releases"] + 1
            privacy_row.update(_client_epsilon(cfg, releases), dp_releases=releases)
        mean = {**train, NUM_EXAMPLES: max(int(sum(res.weights.values())), 1), UNIFORM_WEIGHT: 1}
        new = {k: v + update[k].astype(v.dtype) for k, v in state.tensors.items()}
        reply = Message(RecordDict({"arrays": to_record(new), "metrics": MetricRecord(mean)}), dst_node_id=0, message_type="train")
        # Under client-level DP the wrapped strategy steps from the noised mean (the wrapper's own
        # aggregate would noise it again, sized for a mean of sampled_clients replies).
        tensors, _, released = aggregate(cfg, getattr(strategy, "strategy", strategy), rnd, state, [reply], manifest)
    else:
        log(f"round {rnd}: secure aggregation released nothing ({why}); the global state stays")
        tensors, released = state.tensors, False
    if client_dp(cfg):
        privacy_row["clip_norm"] = secagg.norm_bound(cfg)
        if cfg.privacy.mode == "client":
            privacy_row["epsilon"] = privacy_row["client_epsilon"]
    trained = {r.metadata.src_node_id for r in res.replies}
    c = secagg.clipping_range(cfg)
    fields = {
        "train_loss": float(train["train_loss"]) if "train_loss" in train else None,
        "clients": len(res.in_sum),
        "connected": len(list(grid.get_node_ids())),
        "failures": len(msgs) - len(res.in_sum),
        "rejected": dict.fromkeys(REJECTIONS, 0) | {"error": res.collect_errors, "no_reply": len(msgs) - len(trained) - res.collect_errors},
        "examples": int(sum(res.weights.values())) if released else 0,
        "weights": {str(n): w for n, w in res.weights.items()},
        **secagg.describe(res, c, cfg.federation.quantization_range),
        "client_train_s": float(train["train_s"]) if "train_s" in train else None,
        "backbone_loads": workers,
        "released": released,
        "update_norm_median": None,  # not computable: the server never holds an update
        "screened_out": 0,
        "bounded": 0,
        **privacy_row,
    }
    return tensors, fields, frozenset(m.metadata.dst_node_id for m in msgs) - trained


def _privacy_row(cfg: Config, prev: dict, replies: list[Message]) -> dict:
    """Privacy figures of a round, before this round's client-level release: the largest
    sample-level epsilon any client has reported so far (each client's only grows) and the
    client-level releases so far."""
    out: dict = {}
    if cfg.privacy.mode in ("sample", "both"):
        eps = [float(r.content["metrics"]["epsilon"]) for r in replies if "epsilon" in r.content["metrics"]]
        out["epsilon"] = max([prev.get("epsilon") or 0.0, *eps])
    if client_dp(cfg):
        releases = int(prev.get("dp_releases", 0))
        out.update(_client_epsilon(cfg, releases), dp_releases=releases)
    return out


def secure_noise(strategy, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The unmasked mean update of a secure round plus the Gaussian noise Flower's client-side
    fixed-clipping DP wrapper (`strategy`) adds to a mean of its sampled clients' clipped
    updates: std noise_multiplier x clip / sampled clients per coordinate (Flower's
    compute_stdv), drawn from a generator seeded by the OS (Flower's own draw uses numpy's global
    generator, which a seeded library in the same process would make predictable)."""
    from flwr.supercore.differential_privacy import compute_stdv

    std = compute_stdv(strategy.noise_multiplier, strategy.clipping_norm, strategy.num_sampled_clients)
    rng = np.random.default_rng()  # OS entropy
    return {k: (np.asarray(v, dtype=np.float64) + rng.normal(0.0, std, np.shape(v))).astype(np.float32) for k, v in update.items()}


def _client_epsilon(cfg: Config, releases: int) -> dict:
    """Client-level epsilon after `releases` noised aggregates (Gaussian mechanism, no
    sampling amplification claimed: Flower samples a fixed-size subset)."""
    from fedprompt.privacy import gaussian_epsilon

    p = cfg.privacy
    return {"client_epsilon": gaussian_epsilon(p.client_noise_multiplier, releases, p.delta)}
