"""fedprompt: federated parameter-efficient fine-tuning (soft prompts, prefixes, LoRA) on frozen,
quantized backbones. See README.md."""

import logging as _logging

# Library chatter that users should not see, silenced before any of these libraries is first
# imported (peft, deepspeed and transformers import bitsandbytes, whose CPU backend logs a
# "Failed to load CPU gemm_4bit_forward from kernels-community" warning at import).
for _name in ("bitsandbytes", "transformers", "huggingface_hub", "accelerate", "peft"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
