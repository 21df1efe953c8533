"""Methods implemented by Hugging Face peft itself (prefix, LoRA): a thin adapter."""

from __future__ import annotations

import torch
from peft import TaskType, get_peft_model

from fedprompt.methods.base import Adapted, strip_adapter_name


class PeftAdapted(Adapted):
    def __init__(self, backbone, peft_config, method: str):
        super().__init__()
        self.method = method
        self.causal = backbone.causal
        peft_config.task_type = TaskType.CAUSAL_LM if backbone.causal else TaskType.SEQ_CLS
        self.peft_model = get_peft_model(backbone.model, peft_config)
        self._names = {strip_adapter_name(n): p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        self._fixed: dict[str, torch.nn.Parameter] = {}

    @property
    def backbone(self) -> torch.nn.Module:
        return self.peft_model.get_base_model()

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return dict(self._names)

    def fixed(self) -> dict[str, torch.nn.Parameter]:
        return dict(self._fixed)

    def freeze(self, rule) -> None:
        for name in [n for n in self._names if rule(n)]:
            self._fixed[name] = self._names.pop(name).requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.peft_model(input_ids=input_ids, attention_mask=attention_mask, **self._keep(attention_mask))
        return self._out(out.logits)

    def adapter_config(self, base_model_path: str):
        config = self.peft_model.peft_config["default"]
        config.base_model_name_or_path = base_model_path
        return config
