"""Prefix tuning, P-tuning v2 style: trainable keys and values prepended in every layer.

peft's implementation is used with `prefix_projection=False`: with the projection, the saved
tensor is the projected prefix, which does not fit the encoder on load (peft 0.21), so a
payload would not round-trip.
"""

from __future__ import annotations

from peft import PrefixTuningConfig

from fedprompt.methods.base import register
from fedprompt.methods.peft_wrapped import PeftAdapted


@register("prefix")
def build_prefix(backbone, cfg, *, num_labels=None) -> PeftAdapted:
    config = PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, prefix_projection=False)
    return PeftAdapted(backbone, config, "prefix")
