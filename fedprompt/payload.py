"""The wire contract: exactly which tensors leave a client, checked on both ends.

A manifest lists the payload's tensor names, shapes and dtypes for a config. Every payload is
validated against it before anything is loaded; a mismatch is a `PayloadError` naming the
source and the tensor. Loading copies into the live parameters by name, so nothing is ever
partially or silently skipped (peft's `set_peft_model_state_dict` is strict=False).

The checks and the digest take numpy arrays (the server's tensors: it never imports torch) or
torch tensors (a client's), with the same results; torch is imported only by the functions
that touch a model.
"""

from __future__ import annotations

import hashlib
import reprlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedprompt.errors import UserError

if TYPE_CHECKING:
    from fedprompt.methods.base import Adapted


class PayloadError(UserError, ValueError):
    """A payload that does not match the manifest (names the source and the tensor)."""


# Bytes per element of the dtypes numpy does not know (a bf16 engine's parameters).
_ITEMSIZE = {"bfloat16": 2}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # dtype name as torch and numpy both write it, e.g. "float32"

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * (_ITEMSIZE.get(self.dtype) or np.dtype(self.dtype).itemsize)


Manifest = tuple[TensorSpec, ...]


def _is_torch(t: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor exists only where torch was imported
    return torch is not None and isinstance(t, torch.Tensor)


def _dtype(t: Any) -> str:
    """ "float32", "int64", "bool", ...: the same name for a torch tensor and a numpy array."""
    return str(t.dtype).removeprefix("torch.") if _is_torch(t) else t.dtype.name


def _wire_dtype(p) -> str:
    # Floating tensors travel as float32 whatever the training precision (bf16 engines cast
    # parameters in place), so every client and the server agree on one contract.
    return "float32" if p.is_floating_point() else str(p.dtype).removeprefix("torch.")


def manifest_of(model: Adapted) -> Manifest:
    """The payload contract of a built model, sorted by name. Under ZeRO-3 read it inside
    `engine.full_params` (partitioned parameters have no shape of their own)."""
    return manifest_of_params(model.trainable())


def manifest_of_params(params: dict) -> Manifest:
    """The contract of named parameters (name -> torch tensor), sorted by name."""
    specs = [TensorSpec(name, tuple(p.shape), _wire_dtype(p)) for name, p in params.items()]
    return tuple(sorted(specs, key=lambda s: s.name))


def manifest_from(tensors: dict) -> Manifest:
    """The contract a payload itself defines (the server, which has no model, takes the
    initial global payload's as the one every later reply must match)."""
    specs = [TensorSpec(k, tuple(t.shape), _dtype(t)) for k, t in tensors.items()]
    return tuple(sorted(specs, key=lambda s: s.name))


def raw_bytes(manifest: Manifest) -> int:
    """Bytes of the tensors' data alone (the floor for anything sent on the wire)."""
    return sum(s.nbytes for s in manifest)


def extract(model: Adapted) -> dict:
    """Detached CPU copies of the payload tensors in the wire dtype (safe to send or keep)."""
    from fedprompt.methods.base import wire_tensor

    return {name: wire_tensor(p) for name, p in model.trainable().items()}


def extract_fixed(model: Adapted) -> dict:
    """Like `extract`, for the adapter tensors that are never trained (`Adapted.fixed`)."""
    from fedprompt.methods.base import wire_tensor

    return {name: wire_tensor(p) for name, p in model.fixed().items()}


def _finite(t: Any) -> bool:
    if _is_torch(t):
        import torch

        return not t.is_floating_point() or bool(torch.isfinite(t).all())
    return t.dtype.kind not in "fc" or bool(np.isfinite(t).all())


def validate(tensors: dict, manifest: Manifest, *, source: str) -> None:
    """Raise PayloadError unless `tensors` (name -> numpy array or torch tensor) has exactly
    the manifest's names, shapes, dtypes, and only finite values."""
    if not isinstance(tensors, dict):
        raise PayloadError(f"payload from {source}: expected a mapping of tensor names to tensors, got {type(tensors).__name__}")
    expected = {s.name: s for s in manifest}
    # key=repr: a hostile payload's keys need not be strings, nor comparable with each other.
    unknown = sorted(set(tensors) - set(expected), key=repr)
    missing = sorted(set(expected) - set(tensors))
    if unknown:
        raise PayloadError(
            f"payload from {source}: unexpected tensor {reprlib.repr(unknown[0])} (not in the manifest of {len(expected)} tensors)"
        )  # reprlib: a hostile key may be megabytes long
    if missing:
        raise PayloadError(f"payload from {source}: missing tensor {missing[0]!r}")
    for name, spec in expected.items():
        t = tensors[name]
        if not (isinstance(t, np.ndarray) or _is_torch(t)):
            raise PayloadError(f"payload from {source}: tensor {name!r} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != spec.shape:
            raise PayloadError(f"payload from {source}: tensor {name!r} has shape {tuple(t.shape)}, expected {spec.shape}")
        dtype = _dtype(t)
        if dtype != spec.dtype:
            raise PayloadError(f"payload from {source}: tensor {name!r} has dtype {dtype}, expected {spec.dtype}")
        if not _finite(t):
            raise PayloadError(f"payload from {source}: tensor {name!r} holds NaN or Inf values")


def load(model: Adapted, tensors: dict, *, source: str) -> None:
    """Validate against the model's own manifest, then copy every tensor in (all or nothing),
    cast to each parameter's own dtype. Load before building a DeepSpeed engine: ZeRO and bf16
    keep fp32 master copies in the optimizer that a later step would write back."""
    load_into(model.trainable(), tensors, source=source)


def load_into(live: dict, tensors: dict, *, source: str) -> None:
    """`load` into any named parameters (name -> torch parameter): validated against their
    manifest, then copied in, all or nothing."""
    import torch

    validate(tensors, manifest_of_params(live), source=source)
    with torch.no_grad():
        for name, t in tensors.items():
            t = t if _is_torch(t) else torch.from_numpy(np.array(t))
            live[name].copy_(t.to(device=live[name].device, dtype=live[name].dtype))


def _bytes(t: Any) -> bytes:
    if _is_torch(t):
        import torch

        t = t.detach().cpu().contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # reshape: a 0-d tensor has no byte view
    return np.ascontiguousarray(t).tobytes()


def digest(tensors: dict) -> str:
    """A short content hash (names, dtypes, shapes and bytes) to compare global states; the
    same for a numpy array and a torch tensor of the same content."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        # "torch.<dtype>": the format every digest recorded so far was written in.
        h.update(f"{name}|torch.{_dtype(t)}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t))
    return h.hexdigest()[:16]
