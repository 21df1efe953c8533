"""PEFT methods: one module per method, registered by name (a registry, not an if-chain).

Each method turns a frozen `Backbone` into an `Adapted` model whose only trainable tensors
are the payload: the exact tensors of a standard PEFT adapter file.
"""

from __future__ import annotations

from fedprompt.methods.base import REGISTRY, Adapted, register


def build(backbone, peft_cfg, *, num_labels: int | None = None) -> Adapted:
    """Wrap `backbone` with the method `peft_cfg.method`; initialisation uses the current torch seed."""
    return REGISTRY[peft_cfg.method](backbone, peft_cfg, num_labels=num_labels)


# Importing registers them.
from fedprompt.methods import lora, prefix, prompt  # noqa: E402,F401

__all__ = ["Adapted", "REGISTRY", "build", "register"]
