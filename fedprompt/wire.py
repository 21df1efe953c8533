"""The payload as Flower records, and what a message really costs on the wire."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def to_record(tensors: dict) -> ArrayRecord:
    """name -> numpy array (or CPU torch tensor) into an ArrayRecord, names kept."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.numpy() if hasattr(v, "numpy") else v)) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def error_reason(message: Message, limit: int = 300) -> str:
    """A reply's error reason as one printable line of at most `limit` characters: a
    participant's text is untrusted (terminal control sequences, newlines, megabytes)."""
    from fedprompt.processes import one_line

    return one_line(message.error.reason, limit)


def wire_bytes(message: Message) -> int:
    """Bytes Flower transfers for `message`: the serialized (deflated) objects of its tree,
    each distinct object once, as they are pushed to and pulled from the SuperLink."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
