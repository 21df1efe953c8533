"""Server checkpoints: exact round trip, atomic replace, corruption detected and skipped."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedprompt import checkpoint
from fedprompt.checkpoint import CheckpointError, ServerState


def _state(r: int, seed: int = 0) -> ServerState:
    g = np.random.default_rng(seed)
    return ServerState(
        round=r,
        tensors={"prompt_embeddings": g.standard_normal((4, 8)).astype(np.float32), "head.bias": g.standard_normal(3).astype(np.float32)},
        strategy={"m_t": {"head.bias": g.standard_normal(3)}},
        rows=[{"round": i, "accuracy": 0.1 * i} for i in range(r + 1)],
        adapter_config='{"peft_type": "PROMPT_TUNING"}',
        config_yaml="model:\n  name: x\n",
    )


def test_round_trip_is_exact(tmp_path):
    s = _state(2)
    checkpoint.save(tmp_path, s)
    got, notes = checkpoint.load_latest(tmp_path)
    assert notes == [] and got.round == 2 and got.rows == s.rows
    assert got.adapter_config == s.adapter_config and got.config_yaml == s.config_yaml
    for k, v in s.tensors.items():
        assert got.tensors[k].dtype == v.dtype and np.array_equal(got.tensors[k], v)
    assert np.array_equal(got.strategy["m_t"]["head.bias"], s.strategy["m_t"]["head.bias"])


def test_previous_checkpoint_kept_and_used_when_the_newest_is_corrupt(tmp_path):
    checkpoint.save(tmp_path, _state(1, seed=1))
    checkpoint.save(tmp_path, _state(2, seed=2))
    assert (tmp_path / checkpoint.PREVIOUS).is_file() and not list(tmp_path.glob("*.tmp"))
    data = bytearray((tmp_path / checkpoint.FILE).read_bytes())
    data[-3] ^= 0xFF  # flip bits in the tensor bytes: the header still parses
    (tmp_path / checkpoint.FILE).write_bytes(bytes(data))
    got, notes = checkpoint.load_latest(tmp_path)
    assert got.round == 1 and len(notes) == 1 and "checksum mismatch" in notes[0]


def test_truncated_checkpoint_is_reported(tmp_path):
    checkpoint.save(tmp_path, _state(1))
    f = tmp_path / checkpoint.FILE
    f.write_bytes(f.read_bytes()[:40])
    got, notes = checkpoint.load_latest(tmp_path)
    assert got is None and "unreadable" in notes[0]
    with pytest.raises(CheckpointError):
        checkpoint._read(f)


def test_export_adapter_holds_exactly_the_payload(tmp_path):
    from safetensors.numpy import load_file

    s = _state(3)
    checkpoint.export_adapter(tmp_path / "adapter", s.tensors, s.adapter_config)
    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(got) == set(s.tensors) and all(np.array_equal(got[k], s.tensors[k]) for k in got)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()) == {"peft_type": "PROMPT_TUNING"}
