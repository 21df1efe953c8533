"""An in-process stand-in for Flower's Grid: messages go to Python responders, not processes.

It lets the ServerApp's round loop run in a test in a second, with real LocalClients (tiny
models) behind each node, or with hostile ones.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprompt.federation.client_app import _reply, _request
from fedprompt.federation.handler import handle

Responder = Callable[[Message], "Message | None"]


def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class FakeContext:
    def __init__(self, node_config: dict):
        self.node_config = node_config
        self.run_config: dict = {}


def client_responder(client, partition_id: int) -> Responder:
    """A node served by `client` (a LocalClient) as partition `partition_id`, through the same
    request/reply code as the real ClientApp."""
    kinds = {"query": "init", "train": "fit", "evaluate": "evaluate"}

    def respond(msg: Message) -> Message:
        req = _request(kinds[msg.metadata.message_type], msg, FakeContext({"partition-id": partition_id}))
        try:
            return _reply(msg, handle(client, req))
        except Exception as e:  # what Flower does with an exception in a ClientApp
            return Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    return respond


class FakeGrid:
    def __init__(self, responders: dict[int, Responder]):
        _identity()
        self.responders = responders
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.responders)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        out = []
        for m in messages:
            self.sent.append(m)
            reply = self.responders[m.metadata.dst_node_id](m)
            if reply is not None:
                out.append(reply)
        return out


def replace_arrays(reply: Message, tensors: dict) -> Message:
    """The same reply with other tensors (a tampering node)."""
    from fedprompt.federation.wire import to_record

    content = RecordDict({k: v for k, v in reply.content.items()})
    content["arrays"] = to_record(tensors)
    return Message(content=content, reply_to=_original(reply))


def _original(reply: Message) -> Message:
    m = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type=reply.metadata.message_type)
    return m
