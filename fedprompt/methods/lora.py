"""LoRA: low-rank updates B @ A on the backbone's linear layers (QLoRA on a 4-bit backbone)."""

from __future__ import annotations

from peft import LoraConfig

from fedprompt.methods.base import register
from fedprompt.methods.peft_wrapped import PeftAdapted


@register("lora")
def build_lora(backbone, cfg, *, num_labels=None) -> PeftAdapted:
    targets = cfg.lora_target_modules
    # "auto": peft's per-architecture default (q/v projections for Llama, query/value for BERT).
    target_modules = None if targets == ["auto"] else list(targets)
    names = {n.rsplit(".", 1)[-1] for n, _ in backbone.model.named_modules()}
    missing = [t for t in (target_modules or []) if t not in names]
    if missing:
        from fedprompt.backbone import BackboneError

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules() if "Linear" in type(m).__name__})
        raise BackboneError(f"peft.lora_target_modules: {missing} not found in the backbone; its linear layers are: {', '.join(linear)}")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target_modules)
    try:
        return PeftAdapted(backbone, config, "lora")
    except ValueError as e:  # peft: no default targets for this architecture, or unsupported layer type
        from fedprompt.backbone import BackboneError

        raise BackboneError(f"peft.lora_target_modules: {str(e).splitlines()[0]}; list the linear layers to adapt, e.g. [q_proj, v_proj]") from None
