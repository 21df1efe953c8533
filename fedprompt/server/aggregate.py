"""A round's aggregation on the server, on numpy: screening absurd updates, bounding long ones,
Krum's choice, the strategy's aggregate, and the rollback of a non-finite result."""

from __future__ import annotations

import sys

import numpy as np
from flwr.app import Message

from fedprompt import checkpoint, payload
from fedprompt.config import Config
from fedprompt.lora_aggregation import is_lora, lora_aggregation, rank_of, truncate
from fedprompt.server import robust
from fedprompt.server.strategies import STRATEGIES, client_dp, restore_strategy, strategy_state
from fedprompt.wire import from_record, to_record

LOG_FILE = None  # an open text file: the in-process engine's run log (else stdout, the ServerApp's)


def log(text: str) -> None:
    """One line of the server's log."""
    print(f"fedprompt server: {text}", file=LOG_FILE or sys.stdout, flush=True)


def aggregate(cfg: Config, strategy, rnd: int, state: checkpoint.ServerState, good: list[Message], manifest: payload.Manifest) -> tuple[dict, dict, bool]:
    """(new global tensors, train metrics, released) from the round's good replies. Krum picks
    its replies first. An aggregate, or a server-optimizer state (FedAdam's moments), that is
    not finite is not kept: the global and strategy state of the last round stay."""
    f = cfg.federation
    select = STRATEGIES[f.strategy].select
    if select is not None:
        if len(good) <= 2 * f.num_malicious + 2:
            log(
                f"round {rnd}: {f.strategy} tolerates federation.num_malicious {f.num_malicious} only with more than "
                f"{2 * f.num_malicious + 2} updates, this round has {len(good)}: its choice proves nothing"
            )
        keep = select(f, len(good))
        chosen = robust.krum_select(state.tensors, [from_record(r.content["arrays"]) for r in good], f.num_malicious, keep)
        log(f"round {rnd}: {f.strategy} keeps node(s) {', '.join(str(good[i].metadata.src_node_id) for i in chosen)}")
        good = [good[i] for i in chosen]
    for rep in good:  # Flower's DP clipping pairs a reply's arrays with the global ones by position
        order_like(rep, list(state.tensors))
    combine = lora_aggregation(cfg.peft.method, f.lora_aggregation).combine
    received = [from_record(r.content["arrays"]) for r in good] if combine is not None else []
    rank = rank_of(state.tensors)
    for rep, tensors in zip(good, received, strict=False):
        if rank_of(tensors) != rank:  # a lower-rank client: Flower's mean needs equal shapes, the SVD below replaces it
            rep.content["arrays"] = to_record({k: state.tensors[k] if is_lora(k) else v for k, v in tensors.items()})
    before = strategy_state(strategy)
    arrays, train = strategy.aggregate_train(rnd, good)
    tensors = {k: np.asarray(v, dtype=state.tensors[k].dtype) for k, v in from_record(arrays).items()}
    if combine is not None and good:  # FlexLoRA: the LoRA factors of the mean product, not the mean factors
        tensors.update(combine(received, [_weight(strategy, r) for r in good], rank))
    after = [v for slot in strategy_state(strategy).values() for v in slot.values()]
    if not all(robust.finite(v) for v in [*tensors.values(), *after]):
        # Finite updates can still sum past float32 (screening needs >= 3 replies and a sane
        # majority), and FedAdam's second moment overflows first: keep the last good state.
        log(f"round {rnd}: the aggregate of {len(good)} updates (or the server optimizer's state) holds NaN or Inf; the global state is kept")
        restore_strategy(strategy, before, list(state.tensors))
        return state.tensors, train, False
    payload.validate(tensors, manifest, source=f"aggregate of round {rnd}")
    return tensors, train, True


def _weight(strategy, rep: Message) -> float:
    """The weight the strategy gave this reply in its mean (the capped claim, or 1 under
    uniform weighting): the same key, read the same way as Flower's FedAvg reads it."""
    key = getattr(strategy, "strategy", strategy).weighted_by_key
    return float(next(iter(rep.content.metric_records.values()))[key])


def screen_and_bound(cfg: Config, rnd: int, global_: dict[str, np.ndarray], good: list[Message], problems: list[str]) -> tuple[list[Message], dict]:
    """The valid replies minus absurd updates (federation.reject_norm_factor, each added to
    `problems` with its node and reason), the others' updates bounded to federation.norm_bound
    (logged); and the row's figures: median update norm, replies screened out, bounded."""
    f = cfg.federation
    received = [from_record(r.content["arrays"]) for r in good]
    # A lower-rank client started from the global's top components (lora_aggregation.truncate).
    references = [truncate(global_, rank_of(t)) for t in received]
    norms = [robust.update_norm(ref, t) for ref, t in zip(references, received, strict=True)]
    # Not under client-level DP: every update is already clipped to client_clip_norm there, and
    # a rejection, decided on the clients' data, would only turn the round into one releasing
    # nothing (the noise is sized for exactly m updates; see server/app.py, _round).
    verdicts = robust.screen(norms, 0.0 if client_dp(cfg) else f.reject_norm_factor)
    kept, bounded = [], 0
    for rep, tensors, ref, norm, why in zip(good, received, references, norms, verdicts, strict=True):
        node = rep.metadata.src_node_id
        if why:
            problems.append(f"rejected: node {node}: {why}")
            continue
        if f.norm_bound and norm > f.norm_bound:
            tensors, _ = robust.bound(ref, tensors, f.norm_bound)
            # In the global payload's order: Flower's DP clipping pairs arrays by position.
            rep.content["arrays"] = to_record({k: tensors[k] for k in global_})
            log(f"round {rnd}: node {node}: update norm {norm:.4g} bounded to {f.norm_bound:g}")
            bounded += 1
        kept.append(rep)
    # Under client-level DP a raw statistic of the updates would be published un-noised: none.
    row = {"update_norm_median": float(np.median(norms)) if norms and not client_dp(cfg) else None, "screened_out": len(good) - len(kept), "bounded": bounded}
    return kept, row


def order_like(rep: Message, keys: list[str]) -> None:
    arrays = rep.content["arrays"]
    if list(arrays.keys()) != keys:
        received = from_record(arrays)
        rep.content["arrays"] = to_record({k: received[k] for k in keys})
