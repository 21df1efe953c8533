"""An in-process Grid: the server's round loop (server/app.py, serve) talks to Python responders
instead of Flower processes.

Each node is a responder: a LocalClient behind the same request/reply code as the real
ClientApp (`client_responder`), or anything else that answers a Message (a test's hostile
node). Benchmarks run the round loop this way to measure learning without Flower's processes;
tests run it in a second with tiny models.
"""

from __future__ import annotations

import random
import uuid
from typing import Callable

from flwr.app import Error, Message
from flwr.supercore.task_identity import TaskIdentity

from fedprompt.client.app import clipping_mod, reply_message, request_of
from fedprompt.client.handler import handle

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
    request/reply code as the real ClientApp."""
    context = LocalContext({"partition-id": partition_id})

    def serve(msg: Message, ctx: LocalContext) -> Message:
        return reply_message(msg, handle(client, request_of(msg, ctx)))

    def respond(msg: Message) -> Message:
        mod = clipping_mod(msg) if msg.metadata.message_type == "train" else None
        try:
            return mod(msg, context, serve) if mod else serve(msg, context)
        except Exception as e:  # what Flower does with an exception in a ClientApp
            return Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    return respond


class LocalGrid:
    """Flower's Grid interface (node ids, push, pull), answered at once by `responders`."""

    def __init__(self, responders: dict[int, Responder]):
        # A run of its own: a client's guard refuses rounds that go back within one run.
        set_task_identity(random.getrandbits(62))
        self.responders = responders
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.responders)

    def push_messages(self, messages) -> list[str]:
        """Answer each message at once (as a Flower node would, later); keep the replies."""
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # what Flower's grids do
            self.sent.append(m)
            reply = self.responders[m.metadata.dst_node_id](m)
            if reply is not None:
                self._replies[m.metadata.message_id] = reply
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
