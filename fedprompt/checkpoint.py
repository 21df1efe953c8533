"""Server state on disk: one checkpoint file per run directory, and the adapter export.

A checkpoint is one safetensors file: the global payload tensors (`global/<name>`), the
strategy's own state (`strategy/<slot>/<name>`, e.g. FedAdam's moments) and, in its metadata,
the completed round, the metrics rows so far and the adapter config. One file, written to a
temporary name, fsynced and renamed, so a crash leaves either the old or the new checkpoint,
never a mix; a sha256 of the tensor bytes detects a corrupted file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedprompt.errors import UserError

FILE = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used (corrupt, from another config)."""


@dataclass
class ServerState:
    round: int  # rounds completed
    tensors: dict[str, np.ndarray]  # the global payload (float32)
    strategy: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # slot -> tensors
    rows: list[dict] = field(default_factory=list)  # metrics rows of rounds 0..round
    adapter_config: str = ""  # adapter_config.json text, agreed with round 0's payload
    config_yaml: str = ""  # the run's resolved config
    labels: list[str] = field(default_factory=list)  # class index -> label name (classification)
    # Adapter tensors never exchanged (FFA-LoRA's A), agreed with round 0's payload: the export needs them.
    fixed: dict[str, np.ndarray] = field(default_factory=dict)


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save(folder: Path, state: ServerState) -> Path:
    """Write `state` atomically to folder/checkpoint.safetensors (the old one kept as .prev)."""
    from safetensors.numpy import save_file

    arrays = {f"global/{k}": np.ascontiguousarray(v) for k, v in state.tensors.items()}
    arrays.update({f"fixed/{k}": np.ascontiguousarray(v) for k, v in state.fixed.items()})
    for slot, tensors in state.strategy.items():
        arrays.update({f"strategy/{slot}/{k}": np.ascontiguousarray(v) for k, v in tensors.items()})
    meta = {
        "round": str(state.round),
        "rows": json.dumps(state.rows),
        "adapter_config": state.adapter_config,
        "config": state.config_yaml,
        "labels": json.dumps(state.labels),
        "sha256": _checksum(arrays),
        "format": "fedprompt-checkpoint-1",
    }
    final, tmp = folder / FILE, folder / (FILE + ".tmp")
    save_file(arrays, str(tmp), metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        os.replace(final, folder / PREVIOUS)
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames themselves must survive a power cut
    finally:
        os.close(dir_fd)
    return final


def _read(path: Path) -> ServerState:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if meta.get("format") != "fedprompt-checkpoint-1":
        raise CheckpointError(f"{path}: not a fedprompt checkpoint")
    if _checksum(arrays) != meta.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupted)")
    state = ServerState(
        round=int(meta["round"]),
        tensors={},
        rows=json.loads(meta["rows"]),
        adapter_config=meta.get("adapter_config", ""),
        config_yaml=meta.get("config", ""),
        labels=json.loads(meta.get("labels", "[]")),
    )
    for k, v in arrays.items():
        kind, _, rest = k.partition("/")
        if kind == "global":
            state.tensors[rest] = v
        elif kind == "fixed":
            state.fixed[rest] = v
        else:
            slot, _, name = rest.partition("/")
            state.strategy.setdefault(slot, {})[name] = v
    return state


def load_latest(folder: Path) -> tuple[ServerState | None, list[str]]:
    """The newest usable checkpoint in `folder` (or None) and a note per file that was not
    usable, so the caller can say why it fell back."""
    notes: list[str] = []
    for name in (FILE, PREVIOUS):
        p = folder / name
        if not p.is_file():
            continue
        try:
            return _read(p), notes
        except CheckpointError as e:
            notes.append(str(e))
    return None, notes


def export_adapter(folder: Path, tensors: dict[str, np.ndarray], adapter_config: str) -> None:
    """A standard PEFT adapter folder from the global payload: adapter_config.json (as the
    client's peft wrote it) + adapter_model.safetensors holding exactly the payload tensors."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(adapter_config, encoding="utf-8")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
