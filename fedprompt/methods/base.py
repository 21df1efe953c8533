"""The interface every method implements, and the registry of methods by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


class Adapted(nn.Module):
    """A frozen backbone plus the trainable tiny tensors.

    forward(input_ids (B, T), attention_mask (B, T)) -> logits: (B, C) for an encoder with a
    classification head, (B, P + T, V) for a causal LM where P >= 0 positions were prepended
    (soft prompt) before the real tokens, or (B, V) at the last real token when `last_only`.
    """

    method: str = ""
    causal: bool = False
    prepended: int = 0  # positions placed before the real tokens in the logits (soft prompt)
    # Causal LM only: compute the vocabulary projection at each example's last real token
    # alone, returning (B, V). A verbalizer needs nothing else, and the LM head over every
    # position is ~20% of a small LM's step. Set by `run.setup` when the task allows it.
    last_only: bool = False

    def _keep(self, attention_mask: torch.Tensor) -> dict:
        """forward kwargs that restrict the LM head to the last real position (B, 1)."""
        if not self.last_only:
            return {}
        return {"logits_to_keep": (attention_mask.sum(1) - 1 + self.prepended).unsqueeze(1)}

    def _out(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 0] if self.last_only else logits

    def trainable(self) -> dict[str, nn.Parameter]:
        """Payload name (the key in adapter_model.safetensors) -> the live parameter."""
        raise NotImplementedError

    def fixed(self) -> dict[str, nn.Parameter]:
        """Adapter tensors kept frozen at their seeded init (FFA-LoRA's A): part of the adapter
        file, never of the payload. Empty unless `freeze` moved some there."""
        return {}

    def freeze(self, rule: Callable[[str], bool]) -> None:
        """Stop training the payload tensors whose name satisfies `rule` (they move to `fixed`)."""
        raise NotImplementedError(f"{self.method}: no adapter tensor can be frozen")

    def adapter_config(self, base_model_path: str):
        """The peft config object describing this adapter (written as adapter_config.json)."""
        raise NotImplementedError

    def save_adapter(self, folder: str | Path, base_model_path: str) -> None:
        """Write a standard PEFT adapter folder: adapter_config.json + adapter_model.safetensors
        holding exactly the payload (and fixed) tensors, in float32 whatever the training precision (so a
        bf16 run exports the same contract as an fp32 one)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.adapter_config(base_model_path).save_pretrained(str(folder))
        tensors = {k: wire_tensor(v) for k, v in {**self.trainable(), **self.fixed()}.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    @property
    def backbone(self) -> nn.Module:
        """The frozen pretrained model inside."""
        raise NotImplementedError


def strip_adapter_name(name: str, adapter: str = "default") -> str:
    """peft parameter name -> the key peft writes in adapter_model.safetensors."""
    if name == f"prompt_encoder.{adapter}.embedding.weight":
        return "prompt_embeddings"
    return name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


def wire_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy; floating tensors in float32 (the wire dtype)."""
    t = t.detach().to("cpu", copy=True)
    return (t.float() if t.is_floating_point() else t).contiguous()


REGISTRY: dict[str, Callable[..., Adapted]] = {}


def register(name: str) -> Callable:
    """Register a method builder under `peft.method` = `name` (a second one of a name is a bug)."""

    def deco(fn: Callable[..., Adapted]) -> Callable[..., Adapted]:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is already registered ({REGISTRY[name].__module__})")
        REGISTRY[name] = fn
        return fn

    return deco
