"""Talking to the clients through a Flower Grid: push messages, pull their replies with a
deadline, wait for clients to connect. The round loop's modules (app, rounds, initial,
evaluation) share these."""

from __future__ import annotations

import contextvars
import time

import flwr.superlink.grid.http_grid as _http_grid
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedprompt.protocol import MESSAGE_TYPE, Kind, MetricError, check_metrics
from fedprompt.server.aggregate import log
from fedprompt.wire import error_reason


class FederationError(RuntimeError):
    """The federation cannot go on (no usable update in a round, no client ever connected)."""


# The deadline (time.monotonic()) of the exchange under way in this thread, or None.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("fedprompt_pull_deadline", default=None)
_flower_pull_objects = _http_grid.pull_objects


def _pull_objects_by_deadline(*args, **kwargs):
    """Flower 1.42's HttpGrid.pull_messages pulls a reply's objects with retries for up to
    PULL_MAX_TIME (7200 s): a reply whose sender stopped mid-upload (a client revoked, killed
    or cut off) blocks that one call until the SuperLink drops the push session
    (OBJECT_PUSH_SESSION_TTL_SECONDS, 180 s), whatever the round's deadline. Bounded by the
    exchange's deadline instead, the pull gives up in time and Flower turns that reply into an
    error reply ("objects are unavailable"), which the round counts as that client's failure."""
    end = _DEADLINE.get()
    if end is not None:
        kwargs["max_time"] = max(end - time.monotonic(), 1.0)
    return _flower_pull_objects(*args, **kwargs)


_http_grid.pull_objects = _pull_objects_by_deadline


def exchange(grid: Grid, messages: list[Message], timeout: float | None, poll: float = 0.1) -> list[Message]:
    """Push `messages`, then pull replies until all are in or `timeout` seconds passed (a
    reply still uploading at the deadline comes back as an error reply, not a stall).
    Flower's HTTP Grid.send_and_receive sleeps 3 s between pulls, which adds up to 3 s to
    every exchange of a deployment round; this polls every `poll` seconds instead."""
    ids = list(grid.push_messages(messages))
    to = {i: m.metadata.dst_node_id for i, m in zip(ids, messages, strict=True)}
    pending = set(ids)
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    token = _DEADLINE.set(end)
    try:
        while pending and (end is None or time.monotonic() < end):
            got = list(grid.pull_messages(pending))
            for m in got:
                if m.has_error() and m.metadata.reply_to_message_id in to:
                    # An error Flower made up on the server side (a reply whose upload never
                    # completed) names the server's own node as its sender: name the client.
                    # Metadata has no setter for it; its fields live in __dict__ (Flower 1.42).
                    m.metadata.__dict__["_src_node_id"] = to[m.metadata.reply_to_message_id]
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                time.sleep(poll)
    finally:
        _DEADLINE.reset(token)
    return replies


def wait_for_nodes(grid: Grid, n: int) -> list[int]:
    """The connected nodes' ids, once at least `n` are connected."""
    said = False
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if not said:
            log(f"waiting for {n} client(s) to connect ({len(nodes)} connected)")
            said = True
        time.sleep(0.5)
    return nodes


def message(node: int, kind: Kind, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=node, message_type=MESSAGE_TYPE[kind])


def ask(grid: Grid, node: int, kind: Kind, content: RecordDict, timeout: float | None) -> Message:
    """One message to one node, its reply or a FederationError saying why there is none."""
    replies = exchange(grid, [message(node, kind, content)], timeout)
    if not replies:
        raise FederationError(f"node {node} did not answer the {kind} request within {timeout} s")
    if replies[0].has_error():
        raise FederationError(f"node {node} failed the {kind} request: {error_reason(replies[0])}")
    return replies[0]


_UNKNOWN_SAID: set[tuple[int, str]] = set()  # (node, key): an unknown metric is logged once per node


def known_metrics(rep: Message, rnd: int) -> dict:
    """The reply's metrics that protocol.METRICS knows, checked (MetricError names the first
    bad one); unknown keys are dropped, logged once per node and key."""
    node = rep.metadata.src_node_id
    if "metrics" not in rep.content:
        raise MetricError("the reply has no metrics")
    metrics, unknown = check_metrics(dict(rep.content["metrics"]))
    new = [k for k in unknown if (node, k) not in _UNKNOWN_SAID]
    if new:
        _UNKNOWN_SAID.update((node, k) for k in new)
        log(f"round {rnd}: node {node} sent metric(s) no fedprompt client sends, dropped: {', '.join(new[:5])}{' ...' if len(new) > 5 else ''}")
    return metrics
