"""LoRA: low-rank updates B @ A on the backbone's linear layers (QLoRA on a 4-bit backbone).

One backbone serves LoRA adapters of several ranks (a simulation worker's virtual clients of
`federation.lora_ranks`; a client of rank r evaluating the global at rank R): peft adapters on
the one PeftModel, one per rank, the active one trained. Each rank's initial A is seeded from
(the run's seed, the rank) alone, so honest clients of any own rank answer the same seeded
adapter at the global's rank in round 0.
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from fedprompt.errors import UserError
from fedprompt.methods.base import register, strip_adapter_name
from fedprompt.methods.peft_wrapped import PeftAdapted


class FixedRankError(UserError, ValueError):
    """A LoRA rank other than the federation's one, under FFA-LoRA."""


class LoraAdapted(PeftAdapted):
    """PeftAdapted with `use_rank`: the adapter of another rank on the same backbone."""

    def __init__(self, backbone, peft_config: LoraConfig):
        # Drawn from the run's seeded RNG (setup seeds it before the backbone): the same on
        # every client of the federation, whatever each has done since.
        self._seed = int(torch.randint(0, 2**62, ()).item())
        super().__init__(backbone, peft_config, "lora")
        self.rank = self.default_rank = peft_config.r
        self._adapters = {self.rank: "default"}
        self._seed_adapter("default", self.rank)

    def _seed_adapter(self, adapter: str, rank: int) -> None:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self._seed + rank)
            for m in self.peft_model.modules():
                if isinstance(m, LoraLayer) and adapter in m.lora_A:
                    m.reset_lora_parameters(adapter, True)  # A: kaiming uniform, B: zeros (peft's default)

    def use_rank(self, rank: int, *, source: str = "LoRA") -> None:
        """Train and evaluate the adapter of rank `rank` from now on (made, seeded, on first use).
        `source` names where the rank came from (a server's payload, an adapter file)."""
        if rank == self.rank:
            return
        if self._fixed:  # FFA-LoRA's A is fixed at one rank: no other rank can be made
            raise FixedRankError(
                f"{source}: LoRA rank {rank}; federation.lora_aggregation 'ffa' keeps every client at one rank, and this "
                f"config's peft.lora_r is {self.default_rank}: set peft.lora_r={rank} (the federation's)"
            )
        if rank not in self._adapters:
            config = copy.deepcopy(self.peft_model.peft_config["default"])
            config.r = rank
            self._adapters[rank] = f"rank{rank}"
            self.peft_model.add_adapter(self._adapters[rank], config)
            added = self.peft_model.peft_config[self._adapters[rank]]
            if added.modules_to_save:  # peft appends the task's head again to the copied list
                added.modules_to_save = list(dict.fromkeys(added.modules_to_save))
            self._seed_adapter(self._adapters[rank], rank)
        name = self._adapters[rank]
        self.peft_model.set_adapter(name)  # the active adapter alone requires grad
        self._names = {strip_adapter_name(n, name): p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        self.rank = rank

    def adapter_config(self, base_model_path: str):
        config = copy.deepcopy(self.peft_model.peft_config[self._adapters[self.rank]])
        config.base_model_name_or_path = base_model_path
        return config


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
        return LoraAdapted(backbone, config)
    except ValueError as e:  # peft: no default targets for this architecture, or unsupported layer type
        from fedprompt.backbone import BackboneError

        raise BackboneError(f"peft.lora_target_modules: {str(e).splitlines()[0]}; list the linear layers to adapt, e.g. [q_proj, v_proj]") from None
