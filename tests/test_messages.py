"""The server's exchange with clients (fedprompt/server/messages.py): a reply whose sender
stopped mid-upload costs at most the round's deadline, and is that client's failure."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

from fedprompt.server import messages
from fedprompt.server.localgrid import set_task_identity


def _never_uploaded(object_id: str) -> bytes:
    raise ObjectUnavailableError(object_id)


def test_a_reply_that_never_finishes_uploading_is_given_up_at_the_exchange_deadline():
    """Flower's own bound is 7200 s (here 8 tries: 1+2+4+8+10+10+10 s of backoff, ~45 s)."""
    token = messages._DEADLINE.set(time.monotonic() + 1.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(ObjectPullError):
            messages._http_grid.pull_objects(["obj"], _never_uploaded, max_tries_per_object=8)
        assert time.monotonic() - t0 < 8
    finally:
        messages._DEADLINE.reset(token)
    assert messages._DEADLINE.get() is None  # outside an exchange Flower's own bound holds


class _GridWhoseReplyNeverArrived:
    """Answers like Flower's HttpGrid does when a reply's objects never arrive: an error
    message that names the server's own node as its sender."""

    def __init__(self):
        self.ids: list[str] = []

    def push_messages(self, msgs):
        self.ids = [f"m{i}" for i in range(len(msgs))]
        return self.ids

    def pull_messages(self, ids):
        meta = Metadata(
            run_id=1,
            message_id="",
            src_node_id=1,  # the SuperLink's node
            dst_node_id=1,
            reply_to_message_id=self.ids[0],
            group_id="",
            created_at=time.time(),
            ttl=0,
            message_type="system",
        )
        return [make_message(metadata=meta, error=Error(code=0, reason="Reply message objects are unavailable."))]


def test_an_upload_error_made_up_by_flower_names_the_client_that_did_not_finish():
    set_task_identity(7)  # Flower's messages need a run's identity
    grid = _GridWhoseReplyNeverArrived()
    sent = Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=42, message_type="train")
    (reply,) = messages.exchange(grid, [sent], timeout=5)
    assert reply.has_error() and reply.metadata.src_node_id == 42
