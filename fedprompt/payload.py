"""The wire contract: exactly which tensors leave a client, checked on both ends.

A manifest lists the payload's tensor names, shapes and dtypes for a config. Every payload is
validated against it before anything is loaded; a mismatch is a `PayloadError` naming the
source and the tensor. Loading copies into the live parameters by name, so nothing is ever
partially or silently skipped (peft's `set_peft_model_state_dict` is strict=False).
"""

from __future__ import annotations

import hashlib
import reprlib
from dataclasses import dataclass

import torch

from fedprompt.methods.base import Adapted, wire_tensor


class PayloadError(ValueError):
    """A payload that does not match the manifest (names the source and the tensor)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


Manifest = tuple[TensorSpec, ...]


def _wire_dtype(p: torch.Tensor) -> str:
    # Floating tensors travel as float32 whatever the training precision (bf16 engines cast
    # parameters in place), so every client and the server agree on one contract.
    return "float32" if p.is_floating_point() else str(p.dtype).removeprefix("torch.")


def manifest_of(model: Adapted) -> Manifest:
    """The payload contract of a built model, sorted by name. Under ZeRO-3 read it inside
    `engine.full_params` (partitioned parameters have no shape of their own)."""
    specs = [TensorSpec(name, tuple(p.shape), _wire_dtype(p)) for name, p in model.trainable().items()]
    return tuple(sorted(specs, key=lambda s: s.name))


def manifest_from(tensors: dict[str, torch.Tensor]) -> Manifest:
    """The contract a payload itself defines (the server, which has no model, takes the
    initial global payload's as the one every later reply must match)."""
    specs = [TensorSpec(k, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()]
    return tuple(sorted(specs, key=lambda s: s.name))


def raw_bytes(manifest: Manifest) -> int:
    """Bytes of the tensors' data alone (the floor for anything sent on the wire)."""
    return sum(s.nbytes for s in manifest)


def extract(model: Adapted) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the payload tensors in the wire dtype (safe to send or keep)."""
    return {name: wire_tensor(p) for name, p in model.trainable().items()}


def validate(tensors: dict[str, torch.Tensor], manifest: Manifest, *, source: str) -> None:
    """Raise PayloadError unless `tensors` has exactly the manifest's names, shapes, dtypes,
    and only finite values."""
    if not isinstance(tensors, dict):
        raise PayloadError(f"payload from {source}: expected a mapping of tensor names to tensors, got {type(tensors).__name__}")
    expected = {s.name: s for s in manifest}
    # key=repr: a hostile payload's keys need not be strings, nor comparable with each other.
    unknown = sorted(set(tensors) - set(expected), key=repr)
    missing = sorted(set(expected) - set(tensors))
    if unknown:
        raise PayloadError(f"payload from {source}: unexpected tensor {reprlib.repr(unknown[0])} (not in the manifest of "
                           f"{len(expected)} tensors)")  # reprlib: a hostile key may be megabytes long
    if missing:
        raise PayloadError(f"payload from {source}: missing tensor {missing[0]!r}")
    for name, spec in expected.items():
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise PayloadError(f"payload from {source}: tensor {name!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != spec.shape:
            raise PayloadError(f"payload from {source}: tensor {name!r} has shape {tuple(t.shape)}, expected {spec.shape}")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != spec.dtype:
            raise PayloadError(f"payload from {source}: tensor {name!r} has dtype {dtype}, expected {spec.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PayloadError(f"payload from {source}: tensor {name!r} holds NaN or Inf values")


def load(model: Adapted, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Validate against the model's own manifest, then copy every tensor in (all or nothing),
    cast to each parameter's own dtype. Load before building a DeepSpeed engine: ZeRO and bf16
    keep fp32 master copies in the optimizer that a later step would write back."""
    validate(tensors, manifest_of(model), source=source)
    live = model.trainable()
    with torch.no_grad():
        for name, t in tensors.items():
            live[name].copy_(t.to(device=live[name].device, dtype=live[name].dtype))


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short content hash (names, dtypes, shapes and bytes) to compare global states."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
