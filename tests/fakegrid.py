"""The in-process grid (fedprompt.server.localgrid) under the names the tests use, and a
tampering helper."""

from __future__ import annotations

from flwr.app import Message, RecordDict

from fedprompt.server.localgrid import LocalContext as FakeContext  # noqa: F401
from fedprompt.server.localgrid import LocalGrid as FakeGrid  # noqa: F401
from fedprompt.server.localgrid import client_responder  # noqa: F401
from fedprompt.server.localgrid import set_task_identity as _identity  # noqa: F401


def replace_arrays(msg: Message, reply: Message, tensors: dict) -> Message:
    """The reply to `msg` with other tensors (a tampering node)."""
    from fedprompt.wire import to_record

    content = RecordDict({k: v for k, v in reply.content.items()})
    content["arrays"] = to_record(tensors)
    return Message(content=content, reply_to=msg)
