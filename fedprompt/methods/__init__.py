"""PEFT methods: one module per method, registered by name (a registry, not an if-chain).

Each method turns a frozen `Backbone` into an `Adapted` model whose only trainable tensors
are the payload: the exact tensors of a standard PEFT adapter file.
"""

from __future__ import annotations

from collections.abc import Callable

from fedprompt.methods.base import Adapted

REGISTRY: dict[str, Callable[..., Adapted]] = {}


def register(name: str) -> Callable:
    def deco(fn: Callable[..., Adapted]) -> Callable[..., Adapted]:
        REGISTRY[name] = fn
        return fn

    return deco


def build(backbone, peft_cfg, *, num_labels: int | None = None) -> Adapted:
    """Wrap `backbone` with the method `peft_cfg.method`; initialisation uses the current torch seed."""
    return REGISTRY[peft_cfg.method](backbone, peft_cfg, num_labels=num_labels)


# Importing registers them.
from fedprompt.methods import lora, prefix, prompt  # noqa: E402,F401

__all__ = ["Adapted", "REGISTRY", "build", "register"]
