"""One federated client's work, as plain code: no Flower here.

A `LocalClient` loads its backbone once and keeps it for its whole life; each round only the
tiny tensors, the optimizer and the batch order change. The Flower glue (federation/) calls
`fit` and `evaluate` with the global payload and sends back what they return.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fedprompt import payload
from fedprompt.config import Config


@dataclass
class FitResult:
    tensors: dict[str, torch.Tensor]  # the updated payload (wire dtype, CPU)
    num_examples: int  # local training examples (the FedAvg weight)
    metrics: dict[str, float] = field(default_factory=dict)  # train_loss, steps, train_s


class LocalClient:
    """Client `partition_id` of `num_partitions`: its slice of the training data, the shared
    test split of the config (or its own files), and the frozen backbone with the method."""

    def __init__(self, cfg: Config, *, partition_id: int = 0, num_partitions: int = 1, setup_fn=None):
        from fedprompt.data import load_task_data, partition
        from fedprompt.run import setup

        data = load_task_data(cfg.data)
        if num_partitions > 1:
            data.train = partition(data.train, cfg.data, num_partitions, partition_id)
        self.cfg = cfg
        self.partition_id = partition_id
        self.state = (setup_fn or setup)(cfg, data=data)
        self.manifest = payload.manifest_of(self.state.model)

    @property
    def num_examples(self) -> int:
        return len(self.state.train)

    def fit(self, tensors: dict[str, torch.Tensor], *, round_num: int, source: str = "server",
            proximal_mu: float = 0.0) -> FitResult:
        """Load the global payload, train `train.local_steps` steps with a fresh optimizer,
        return the updated payload. With `proximal_mu` > 0 the loss gains
        mu/2 * ||w - w_global||^2 (FedProx)."""
        from fedprompt.engine import batches, make_engine, train_steps

        s, cfg = self.state, self.cfg
        # Load before building the engine: ZeRO/bf16 keep master copies in the optimizer.
        payload.load(s.model, tensors, source=source)
        engine = make_engine(s.model, cfg, cfg.train.local_steps)
        live = s.model.trainable()
        anchor = {k: t.to(live[k].device) for k, t in tensors.items()} if proximal_mu > 0 else None

        def proximal() -> torch.Tensor:
            return 0.5 * proximal_mu * sum(((live[k].float() - anchor[k]) ** 2).sum() for k in live)

        # A distinct, reproducible batch order and dropout per (seed, client, round): a round's
        # update depends on the global payload only, so a resumed run repeats it exactly.
        round_seed = (cfg.train.seed * 1_000_003 + self.partition_id) * 10_007 + round_num
        stream = batches(len(s.train), cfg.train.batch_size, round_seed)
        torch.manual_seed(round_seed)
        t0 = time.perf_counter()
        loss = train_steps(engine, s.task, s.train, cfg, steps=cfg.train.local_steps, stream=stream, pad_id=s.pad_id,
                           device=s.backbone.device, extra_loss=proximal if anchor is not None else None)
        metrics = {"train_loss": loss, "steps": cfg.train.local_steps, "train_s": time.perf_counter() - t0}
        return FitResult(payload.extract(s.model), self.num_examples, metrics)

    def evaluate(self, tensors: dict[str, torch.Tensor], *, source: str = "server") -> tuple[dict[str, float], int]:
        """Accuracy/loss of the global payload on this client's test split; (metrics, examples)."""
        from fedprompt.engine import evaluate

        s = self.state
        payload.load(s.model, tensors, source=source)
        n = len(s.test) if not self.cfg.train.max_eval_examples else min(len(s.test), self.cfg.train.max_eval_examples)
        m = evaluate(s.model, s.task, s.test, self.cfg, pad_id=s.pad_id, device=s.backbone.device,
                     limit=self.cfg.train.max_eval_examples)
        return m, n
