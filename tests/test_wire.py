"""What crosses the wire: only the payload, at <= 1.10 x its raw bytes, for every shipped config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedprompt.client.app import reply_message
from fedprompt.protocol import Reply
from fedprompt.wire import from_record, to_record, wire_bytes
from tests.fakegrid import _identity

GOLDEN = json.loads((Path(__file__).parent / "golden" / "manifests.json").read_text())


@pytest.mark.parametrize("config", sorted(GOLDEN))
def test_a_client_reply_costs_at_most_1_10_x_the_raw_payload(config):
    _identity()
    g = np.random.default_rng(0)
    tensors = {name: g.standard_normal(shape).astype(dtype) for name, shape, dtype in GOLDEN[config]}
    raw = sum(t.nbytes for t in tensors.values())
    down = Message(RecordDict({"arrays": to_record(tensors), "config": ConfigRecord({"server-round": 7})}), dst_node_id=5, message_type="train")
    # The metrics a real fit reply carries (see LocalClient.fit).
    metrics = {"num-examples": 123, "train_loss": 0.5, "train_s": 12.5, "pid": 4194303, "backbone_loads": 1}
    up = reply_message(down, Reply(tensors=tensors, metrics=metrics))
    assert wire_bytes(up) <= 1.10 * raw, (config, wire_bytes(up), raw)
    assert wire_bytes(down) <= 1.10 * raw
    back = from_record(up.content["arrays"])
    assert set(back) == set(tensors) and all(np.array_equal(back[k], tensors[k]) for k in tensors)
