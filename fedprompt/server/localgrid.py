"""An in-process Grid: the server's round loop (server/app.py, serve) talks to Python responders
instead of Flower processes.

Each node is a responder: a LocalClient behind the same request/reply code as the real
ClientApp (`client_responder`), the same with lies told (`lying_responder`, for the tests and
benchmarks of the defences against untrusted participants), or anything else that answers a
Message (a test's hostile node). Benchmarks run the round loop this way to measure learning without Flower's processes;
tests run it in a second with tiny models.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprompt.client import secagg
from fedprompt.client.app import clipping_mod, reply_message, request_of
from fedprompt.client.handler import handle
from fedprompt.protocol import NUM_EXAMPLES, Kind, Request

Responder = Callable[[Message], "Message | None"]


def set_task_identity(run_id: int = 1) -> None:
    """The run/task/node identity a running ClientApp has (Flower's Message needs one)."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0


class LocalContext:
    """The part of Flower's Context that the ClientApp code reads."""

    def __init__(self, node_config: dict):
        self.node_config = node_config
        self.run_config: dict = {}


def client_responder(client, partition_id: int) -> Responder:
    """A node served by `client` (a LocalClient) as partition `partition_id`, through the same
    request/reply code as the real ClientApp (a secure round's messages through the same mods,
    each crossing a protobuf round trip as on the wire)."""
    context = LocalContext({"partition-id": partition_id})
    # Flower's SecAgg+ mod keeps its keys and shares in the node's Context between the four
    # messages of a secure round, as a SuperNode does: one real Context per node.
    node = Context(run_id=0, node_id=0, node_config={"partition-id": partition_id}, state=RecordDict(), run_config={})

    def serve(msg: Message, ctx) -> Message:
        return reply_message(msg, handle(client, request_of(msg, ctx)))

    def claim(msg: Message, ctx) -> float:
        return float(handle(client, Request(kind=Kind.CLAIM, partition_id=partition_id)).metrics[NUM_EXAMPLES])

    secure = secagg.secure_app(claim, serve)

    def respond(msg: Message) -> Message:
        mod = clipping_mod(msg) if msg.metadata.message_type == "train" else None
        try:
            if secagg.is_secure(msg):
                return through_wire(secure(through_wire(msg), node))
            return mod(msg, context, serve) if mod else serve(msg, context)
        except Exception as e:  # what Flower does with an exception in a ClientApp
            return Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    return respond


def through_wire(msg: Message) -> Message:
    """The message as the other end gets it: through protobuf bytes (no shared objects)."""
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    proto = ProtoMessage()
    proto.ParseFromString(message_to_proto(msg).SerializeToString())
    return message_from_proto(proto)


class LocalGrid:
    """Flower's Grid interface (node ids, push, pull), answered at once by `responders`."""

    def __init__(self, responders: dict[int, Responder], *, keep_sent: bool = True):
        # A run of its own: a client's guard refuses rounds that go back within one run.
        set_task_identity(random.getrandbits(62))
        self.responders = responders
        self.keep_sent = keep_sent  # tests read what was sent; a long run must not keep it all
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.responders)

    def push_messages(self, messages) -> list[str]:
        """Answer each message at once (as a Flower node would, later); keep the replies."""
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # what Flower's grids do
            if self.keep_sent:
                self.sent.append(m)
            reply = self.responders[m.metadata.dst_node_id](m)
            if reply is not None:
                self._replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


@dataclass(frozen=True)
class Lies:
    """What a lying node changes in an honest node's replies: the in-process attacker of the
    defences' tests and benchmarks (over the real wire the tests patch a real client instead).
    init_shift: added to its initial payload; init_extra_row: its initial payload's first
    tensor gains a row (another wire contract); count_factor: multiplies its claimed example
    count; flip: its update's sign flipped at honest length; fit_metrics / eval_metrics:
    metrics added to (or replaced in) its training / evaluation replies; hang_from: from this
    training round on it never answers (0: never)."""

    init_shift: float = 0.0
    init_extra_row: bool = False
    count_factor: int = 1
    flip: bool = False
    fit_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    hang_from: int = 0


def lying_responder(client, partition_id: int, lies: Lies) -> Responder:
    """A node served by `client` as partition `partition_id` that tells `lies`."""
    import numpy as np
    from flwr.app import MetricRecord, RecordDict

    from fedprompt.protocol import NUM_EXAMPLES
    from fedprompt.wire import from_record, to_record

    honest = client_responder(client, partition_id)
    hung = [False]

    def retold(msg: Message, reply: Message, metrics: dict, tensors: dict | None) -> Message:
        content = RecordDict({k: v for k, v in reply.content.items()})
        content["metrics"] = MetricRecord({**dict(reply.content["metrics"]), **metrics})
        if tensors is not None:
            content["arrays"] = to_record(tensors)
        return Message(content=content, reply_to=msg)

    def respond(msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        if kind == "train" and lies.hang_from and int(msg.content["config"]["server-round"]) >= lies.hang_from:
            hung[0] = True
        if hung[0]:
            return None  # busy for ever: nothing it is sent is answered
        reply = honest(msg)
        if reply.has_error():
            return reply
        if kind == "query" and (lies.init_shift or lies.init_extra_row):
            t = {k: v + np.float32(lies.init_shift) for k, v in from_record(reply.content["arrays"]).items()}
            if lies.init_extra_row:
                first = sorted(t)[0]
                t[first] = np.concatenate([t[first], t[first][:1]])
            return retold(msg, reply, {}, t)
        if kind == "train":
            metrics = dict(lies.fit_metrics)
            if lies.count_factor != 1:
                metrics[NUM_EXAMPLES] = int(reply.content["metrics"][NUM_EXAMPLES]) * lies.count_factor
            tensors = None
            if lies.flip:
                g, local = from_record(msg.content["arrays"]), from_record(reply.content["arrays"])
                tensors = {k: g[k] - (local[k] - g[k]) for k in g}
            return retold(msg, reply, metrics, tensors)
        if kind == "evaluate" and lies.eval_metrics:
            return retold(msg, reply, dict(lies.eval_metrics), None)
        return reply

    return respond
