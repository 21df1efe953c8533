"""Soft prompt tuning: P trainable embeddings prepended to the input (Lester et al., 2021).

Our own module rather than peft's: peft embeds the virtual tokens once and repeats them over
the batch, so per-example gradients (Opacus) silently collapse to one: Opacus
clips the whole batch as one sample and raises nothing (peft 0.21, Opacus 1.6). Here the
prompt is an nn.Embedding indexed per example. The exported adapter is peft's PROMPT_TUNING
format, so `PeftModel.from_pretrained` loads it on the same backbone.
"""

from __future__ import annotations

import torch
from peft import PromptTuningConfig, TaskType
from torch import nn

from fedprompt.methods.base import Adapted, register

HEAD_NAMES = ("classifier", "score")  # what peft keeps trainable for SEQ_CLS


class SoftPrompt(Adapted):
    method = "prompt"

    def __init__(self, backbone, cfg, *, num_labels=None):
        super().__init__()
        self.model = backbone.model
        self.causal = backbone.causal
        self.tokenizer = backbone.tokenizer
        self.n = self.prepended = cfg.num_virtual_tokens
        self.init_kind = cfg.prompt_init
        self.init_text = cfg.prompt_init_text
        words = self.model.get_input_embeddings()
        hidden = words.weight.shape[1]
        self.prompt = nn.Embedding(self.n, hidden, device=words.weight.device, dtype=torch.float32)
        self._init_prompt(words.weight.detach().float(), cfg)
        self.register_buffer("positions", torch.arange(self.n), persistent=False)
        self.head_name = None
        if not self.causal:
            self.head_name = next((h for h in HEAD_NAMES if hasattr(self.model, h)), None)
            if self.head_name is None:
                from fedprompt.backbone import BackboneError

                raise BackboneError(f"model.name: {type(self.model).__name__} has no classification head named {HEAD_NAMES}")
            if self.head_name == "score":
                # Decoder classifiers pool the last position when given inputs_embeds, which is
                # padding under right padding: the soft prompt would read the wrong token.
                from fedprompt.backbone import BackboneError

                raise BackboneError(
                    f"peft.method: 'prompt' is not supported on {type(self.model).__name__} "
                    "(a decoder classifier); use prefix or lora, or a *ForCausalLM folder"
                )
            for p in getattr(self.model, self.head_name).parameters():
                p.requires_grad_(True)

    def _init_prompt(self, vocab: torch.Tensor, cfg) -> None:
        with torch.no_grad():
            if cfg.prompt_init == "text":
                ids = self.tokenizer(cfg.prompt_init_text, add_special_tokens=False)["input_ids"]
                ids = (ids * (self.n // max(len(ids), 1) + 1))[: self.n]  # repeat to fill, as peft does
                self.prompt.weight.copy_(vocab[torch.tensor(ids)])
            elif cfg.prompt_init == "vocab":
                # Embeddings of real tokens: starts the prompt on the vocabulary's manifold.
                ids = torch.randint(0, vocab.shape[0], (self.n,))
                self.prompt.weight.copy_(vocab[ids])
            else:
                # Random, at the scale of the word embeddings (N(0, 1) would swamp real tokens).
                self.prompt.weight.normal_(0.0, float(vocab.std()))

    @property
    def backbone(self) -> nn.Module:
        return self.model

    def trainable(self) -> dict[str, nn.Parameter]:
        out = {"prompt_embeddings": self.prompt.weight}
        if self.head_name:
            for n, p in getattr(self.model, self.head_name).named_parameters():
                out[f"base_model.{self.head_name}.{n}"] = p
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b = input_ids.shape[0]
        words = self.model.get_input_embeddings()(input_ids)
        # One lookup per example (not one repeated): per-sample gradients stay exact.
        prompts = self.prompt(self.positions.unsqueeze(0).expand(b, -1)).to(words.dtype)
        embeds = torch.cat([prompts, words], dim=1)
        mask = torch.cat([attention_mask.new_ones(b, self.n), attention_mask], dim=1)
        return self._out(self.model(inputs_embeds=embeds, attention_mask=mask, **self._keep(attention_mask)).logits)

    def adapter_config(self, base_model_path: str) -> PromptTuningConfig:
        mcfg = self.model.config
        config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM if self.causal else TaskType.SEQ_CLS,
            num_virtual_tokens=self.n,
            token_dim=self.prompt.weight.shape[1],
            num_transformer_submodules=1,
            num_attention_heads=mcfg.num_attention_heads,
            num_layers=mcfg.num_hidden_layers,
            base_model_name_or_path=base_model_path,
            inference_mode=True,
        )
        if self.head_name:
            config.modules_to_save = [self.head_name]
        return config


@register("prompt")
def build_prompt(backbone, cfg, *, num_labels=None) -> SoftPrompt:
    return SoftPrompt(backbone, cfg, num_labels=num_labels)
