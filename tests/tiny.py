"""Tiny backbones built from configs (random weights, real tokenizers) for fast unit tests.

They are saved as ordinary Hugging Face folders so that tests go through the same
`load_backbone` path as real models, quantization included.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedprompt.backbone import cache_dir, resolve
from fedprompt.config import load_config


@functools.lru_cache(maxsize=None)
def tiny_folder(kind: str) -> str:
    """A saved tiny 'llama' (SmolLM2 tokenizer) or 'bert' (MiniLM tokenizer) model folder."""
    import transformers

    # A stable folder in the cache (not a new temp dir per run): the token cache is keyed by
    # the tokenizer's path, so stable paths keep it from growing with every test session.
    out = cache_dir() / "tiny" / f"{kind}-v1"
    if (out / "config.json").is_file():
        return str(out)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(dir=out.parent.mkdir(parents=True, exist_ok=True) or out.parent, prefix=".build-"))
    if kind == "llama":
        src = resolve("smollm2-135m")
        tok = transformers.AutoTokenizer.from_pretrained(src)
        cfg = transformers.LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=512,
        )
        model = transformers.LlamaForCausalLM(cfg)
        model.config.architectures = ["LlamaForCausalLM"]
    else:
        src = resolve("minilm-l6")
        tok = transformers.AutoTokenizer.from_pretrained(src)
        cfg = transformers.BertConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
        )
        model = transformers.BertModel(cfg)
        model.config.architectures = ["BertModel"]
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: a concurrent session either sees all of it or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process got there first
    return str(out)


# Small batches, a few steps, built-in data subsampled: the overrides of every tiny run.
TINY = [
    "model.max_length=32",
    "peft.num_virtual_tokens=4",
    "peft.lora_r=4",
    "train.batch_size=4",
    "train.eval_batch_size=16",
    "train.local_steps=3",
    "train.warmup_steps=1",
    "data.max_examples=100",
    "train.max_eval_examples=16",
]


def tiny_config(kind: str, method: str = "prompt", quantization: str = "none", **sets):
    """A Config on the tiny backbone: small batches, a few steps, built-in BBC data subsampled."""
    overrides = [f"model.name={tiny_folder(kind)}", f"model.quantization={quantization}", f"peft.method={method}", *TINY]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in sets.items()]
    return load_config(None, overrides)


def federation_config(**sets):
    """tiny_config for the round loop: 3 IID clients, all sampled, lr 0.05; `sets` override
    (keys as section__field)."""
    base = dict(federation__num_clients=3, federation__rounds=3, federation__min_clients=2, data__partition="iid", train__lr=0.05, federation__fraction_fit=1.0)
    return tiny_config("bert", "prompt", **(base | sets))
