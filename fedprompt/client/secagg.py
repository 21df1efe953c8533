"""The client's side of a secure round: Flower's `secaggplus_mod` (all the cryptography) between
three small mods of fedprompt's that only rename records and check lists.

Outermost first: `claim_mod` (the setup reply also carries the client's claimed example count,
known before training, so the server can cap weights before anything is masked),
`unmask_guard_mod` (refuses an unmask request that would hand out both secrets of one node),
Flower's `secaggplus_mod`, then `fit_bridge_mod` (fedprompt's train reply -> the legacy
`fitres.*` records the mod masks: the update local - global, weighted by the weight the server
assigned), then fedprompt's own train. Only the messages of a secure round take this chain
(they carry Flower's "secaggplus_configs" record); query and evaluate never do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.utils import make_ffn
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedprompt.protocol import NUM_EXAMPLES
from fedprompt.protocol import SECAGG_CLAIM as CLAIM
from fedprompt.protocol import SECAGG_NORM_BOUND as NORM_BOUND
from fedprompt.protocol import SECAGG_WEIGHT as WEIGHT
from fedprompt.wire import from_record

App = Callable[[Message, Context], Message]


def stage_of(msg: Message) -> str | None:
    """The SecAgg+ stage a message belongs to; None for any other message."""
    if not msg.has_content():
        return None
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if cfg is None or Key.STAGE not in cfg else str(cfg[Key.STAGE])


def is_secure(msg: Message) -> bool:
    return msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def make_claim_mod(claim: Callable[[Message, Context], float]):
    """The mod adding `claim(msg, context)` (the partition's size) to the setup reply."""

    def claim_mod(msg: Message, ctxt: Context, call_next: App) -> Message:
        setup = stage_of(msg) == Stage.SETUP
        reply = call_next(msg, ctxt)
        if setup and not reply.has_error():
            reply.content[CLAIM] = MetricRecord({NUM_EXAMPLES: float(claim(msg, ctxt))})
        return reply

    return claim_mod


def unmask_guard_mod(msg: Message, ctxt: Context, call_next: App) -> Message:
    """Refuse an unmask request naming a node both active and dead: answering it would give the
    server that node's mask seed and its pairwise-mask key, i.e. its individual update (Flower's
    mod answers whatever lists it is given)."""
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    if cfg is not None and cfg.get(Key.STAGE) == Stage.UNMASK:
        both = set(cfg.get(Key.ACTIVE_NODE_ID_LIST, [])) & set(cfg.get(Key.DEAD_NODE_ID_LIST, []))
        if both:
            raise ValueError(f"unmask request names node(s) {sorted(both)} both active and dead (it would reveal their updates): refused")
    return call_next(msg, ctxt)


def fit_bridge_mod(msg: Message, ctxt: Context, call_next: App) -> Message:
    """fedprompt's train reply ("arrays" + "metrics") -> the legacy records secaggplus_mod masks:
    `fitres.parameters` = the update (local - global) in the global's tensor order (the server
    maps the mean back by that order), `fitres.num_examples` = the weight the server assigned.
    The update, not the parameters, so federation.clipping_range bounds the update's scale.
    fedprompt's metrics stay in the reply (in the clear)."""
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    cfg = msg.content["config"]
    glob, local = from_record(msg.content["arrays"]), from_record(reply.content["arrays"])
    update = [np.asarray(local[k], dtype=np.float32) - np.asarray(glob[k], dtype=np.float32) for k in glob]
    bound = float(cfg.get(NORM_BOUND, 0.0))
    norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update)))
    if bound and norm > bound:  # the compatible defence: the server cannot bound what it cannot see
        update = [u * np.float32(bound / norm) for u in update]
    content = RecordDict(
        {
            "fitres.parameters": ArrayRecord({str(i): Array(u) for i, u in enumerate(update)}),
            "fitres.num_examples": MetricRecord({"num_examples": float(cfg[WEIGHT])}),
            "fitres.metrics": ConfigRecord({}),
            "fitres.status": ConfigRecord({"code": 0, "message": ""}),
            "metrics": reply.content["metrics"],
        }
    )
    return Message(content, reply_to=msg)


def secure_app(claim: Callable[[Message, Context], float], train: App) -> App:
    """`train` (fedprompt's train: a request in, "arrays" + "metrics" out) behind the secure chain."""
    return make_ffn(train, [make_claim_mod(claim), unmask_guard_mod, secaggplus_mod, fit_bridge_mod])
