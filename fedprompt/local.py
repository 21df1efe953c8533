"""A federated client's work, as plain code: no Flower here.

A `LocalClient` loads its backbone once and keeps it for its whole life. It can serve several
data partitions (a simulation worker serves many virtual clients with one backbone); each call
only changes the tiny tensors, the optimizer and the batch order. The Flower glue
(client/handler.py) calls `fit` and `evaluate` with the global payload and sends back what they return.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedprompt import payload
from fedprompt.config import Config

# Backbones loaded by this process: the test of "one backbone per worker" counts it.
BACKBONE_LOADS = 0


@dataclass
class FitResult:
    tensors: dict[str, torch.Tensor]  # the updated payload (wire dtype, CPU)
    num_examples: int  # local training examples (the FedAvg weight)
    metrics: dict[str, float] = field(default_factory=dict)  # train_loss, train_s


@dataclass
class Shard:
    """One client's data: its slice of the training split and of the test split."""

    train: object  # fedprompt.tasks.Encoded
    test: object
    members: int = 0  # the first `members` training examples are real; audit canaries follow


class LocalClient:
    """Clients of one config in this process: the frozen backbone with the method, loaded
    once, and the data partitions of `num_partitions` (built on first use, then cached)."""

    def __init__(self, cfg: Config, *, num_partitions: int = 1, setup_fn=None, state_dir: str | Path | None = None):
        from fedprompt.data import load_task_data
        from fedprompt.run import setup

        global BACKBONE_LOADS
        self.cfg = cfg
        self.num_partitions = num_partitions
        # Where each client's privacy ledger lives (DP-SGD): it outlives rounds and restarts.
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(cfg)
        self.state = (setup_fn or setup)(cfg, data=load_task_data(cfg.data))
        BACKBONE_LOADS += 1
        # Importing DeepSpeed takes ~1 s: pay it with the backbone load, not in the first round.
        import fedprompt.engine  # noqa: F401

        self.manifest = payload.manifest_of(self.state.model)
        self._initial = payload.extract(self.state.model)  # the seeded init, before any round
        self._fixed = payload.extract_fixed(self.state.model)  # never trained (FFA-LoRA's A)
        self._initial_at: dict[int, dict[str, torch.Tensor]] = {}  # LoRA: the seeded init at other ranks
        self._shards: dict[int, Shard] = {}

    @property
    def backbone_loads(self) -> int:
        """Backbones this client has loaded (this process's; a multi-rank client adds its ranks')."""
        return BACKBONE_LOADS

    def rank_for(self, partition_id: int) -> int | None:
        """The LoRA rank partition `partition_id` trains at: federation.lora_ranks in turn (a
        simulation's mixed ranks), else peft.lora_r; None for a method other than LoRA."""
        if self.cfg.peft.method != "lora":
            return None
        ranks = self.cfg.federation.lora_ranks
        return ranks[partition_id % len(ranks)] if ranks else self.cfg.peft.lora_r

    def _at_rank(self, tensors: dict, rank: int | None) -> dict:
        """The global payload as this client's adapter of `rank` takes it (the model switched
        to that adapter): its top-`rank` components when the global's rank is larger."""
        from fedprompt.lora_aggregation import rank_of, truncate

        got = rank_of(tensors)
        if rank is None or got is None or got == rank:
            if got is not None:
                self._use_rank(got)
            return tensors
        if got < rank:
            raise payload.PayloadError(
                f"payload from the server: the global adapter has LoRA rank {got}, below this client's {rank}; set peft.lora_r to at most {got}"
            )
        self._use_rank(rank)
        return truncate(tensors, rank)

    def _use_rank(self, rank: int) -> None:
        self.state.model.use_rank(rank, source="payload from the server")

    def shard(self, partition_id: int) -> Shard:
        """Partition `partition_id`: the same partitioner cuts the training and the test split,
        so a client's local test data follows its own label skew."""
        from fedprompt.data import partition

        if partition_id not in self._shards:
            s, n, a = self.state, self.num_partitions, self.cfg.audit
            train = s.data.train if n == 1 else partition(s.data.train, self.cfg.data, n, partition_id)
            test = s.data.test if n == 1 else partition(s.data.test, self.cfg.data, n, partition_id)
            members = len(train)
            if a.canaries and partition_id == a.client:  # secrets for the audit to look for
                from fedprompt.canaries import plant

                train = plant(train, self.cfg, s.data.labels, s.task.generative)
            if n == 1 and len(train) == members:  # all the data, already tokenized by setup
                self._shards[partition_id] = Shard(s.train, s.test, members)
            else:
                self._shards[partition_id] = Shard(s.task.encode(train), s.task.encode(test), members)
        return self._shards[partition_id]

    def initial_payload(self, rank: int | None = None) -> dict[str, torch.Tensor]:
        """The method's seeded initial tensors (the global state of round 0), whatever rounds
        this client has served since; for LoRA at `rank` (None: this client's own)."""
        if rank is None or rank == self.cfg.peft.lora_r or self.cfg.peft.method != "lora":
            return {k: t.clone() for k, t in self._initial.items()}
        if rank not in self._initial_at:
            current = self.state.model.rank
            self._use_rank(rank)
            self._initial_at[rank] = payload.extract(self.state.model)
            self._use_rank(current)
        return {k: t.clone() for k, t in self._initial_at[rank].items()}

    def fixed_payload(self) -> dict[str, torch.Tensor]:
        """The adapter tensors this client never trains (sent once, with the initial payload)."""
        return {k: t.clone() for k, t in self._fixed.items()}

    def adapter_config_json(self, rank: int | None = None) -> str:
        """adapter_config.json of this method on this backbone (LoRA: at `rank`, None: this
        client's own), for the server's export."""
        if rank is not None and self.cfg.peft.method == "lora":
            self._use_rank(rank)
        with tempfile.TemporaryDirectory() as d:
            self.state.model.adapter_config(self.state.backbone.path).save_pretrained(d)
            return (Path(d) / "adapter_config.json").read_text(encoding="utf-8")

    def fit(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        partition_id: int = 0,
        round_num: int,
        source: str = "server",
        proximal_mu: float = 0.0,
        dp_seed: int | None = None,
    ) -> FitResult:
        """Load the global payload, train `cfg.round_steps` steps with a fresh optimizer (the LR
        schedule continues across rounds), return the updated payload. With `proximal_mu` > 0
        the loss gains mu/2 * ||w - w_global||^2 (FedProx). `dp_seed`: DP-SGD's Poisson samples
        from this secret seed (the ranks of a multi-rank client share it; None: OS entropy)."""
        from fedprompt.engine import batches, make_engine, train_steps, world

        s, cfg, steps = self.state, self.cfg, self.cfg.round_steps
        data = self.shard(partition_id).train
        tensors = self._at_rank(tensors, self.rank_for(partition_id))
        # Load before building the engine: ZeRO/bf16 keep master copies in the optimizer.
        payload.load(s.model, tensors, source=source)
        private = cfg.privacy.mode in ("sample", "both")
        live = s.model.trainable()
        anchor = {k: t.to(live[k].device) for k, t in tensors.items()} if proximal_mu > 0 else None

        def proximal() -> torch.Tensor:
            return 0.5 * proximal_mu * sum(((live[k].float() - anchor[k]) ** 2).sum() for k in live)

        # A distinct, reproducible batch order and dropout per (seed, client, round): a round's
        # update depends on the global payload only, so a resumed run repeats it exactly.
        # (Not under DP: its batches and noise come from the OS entropy pool.)
        round_seed = (cfg.train.seed * 1_000_003 + partition_id) * 10_007 + round_num
        # Dropout: each rank of a multi-rank client its own masks (the batch order is the same).
        torch.manual_seed(round_seed + 7_919 * world()[0])
        with self._dp(data, dp_seed) as account, s.task.adjusted(self._label_offset(data)):
            engine = make_engine(s.model, cfg, cfg.federation.rounds * steps, start_step=(round_num - 1) * steps, dp=account.plan)
            stream = account.batches() if private else batches(len(data), cfg.train.batch_size, round_seed)
            t0 = time.perf_counter()
            loss = train_steps(
                engine,
                s.task,
                data,
                cfg,
                steps=steps,
                stream=stream,
                pad_id=s.pad_id,
                device=s.backbone.device,
                extra_loss=proximal if anchor is not None else None,
                private=private,
            )
            metrics = {"train_loss": loss, "train_s": time.perf_counter() - t0, **account.spent(steps)}
        if private:  # the loss on the private examples is not noised: it stays on the client
            del metrics["train_loss"]
        return FitResult(payload.extract(s.model), len(data), metrics)

    def _label_offset(self, data) -> torch.Tensor | None:
        """(C,) tau x log(this partition's label frequencies) for train.logit_adjustment (None:
        off)."""
        tau = self.cfg.train.logit_adjustment
        if not tau:
            return None
        if self.state.task.generative:
            from fedprompt.tasks import TaskError

            raise TaskError(f"train.logit_adjustment: {tau} applies to classification, not to the {self.state.task.name} task; set it to 0")
        return tau * self._log_prior(data)

    def _log_prior(self, data) -> torch.Tensor:
        """(C,) log of the label frequencies in `data`; a class it lacks gets log(1e-12): out of
        its softmax."""
        counts = torch.bincount(torch.tensor(data.target), minlength=len(self.state.data.labels)).double()
        return torch.log((counts / counts.sum()).clamp_min(1e-12)).float()

    def ledger_path(self, data) -> Path:
        """The privacy ledger of a client holding `data` (its training examples)."""
        return self.state_dir / f"ledger-{data_fingerprint(data)}.json"

    @contextlib.contextmanager
    def _dp(self, data, seed: int | None = None):
        """DP-SGD for one round of this partition (a no-op without privacy.mode sample):
        plans sigma and q, refuses a round that would pass the target epsilon, attaches the
        per-example hooks, and records the steps in the client's ledger when the round ends."""
        if self.cfg.privacy.mode not in ("sample", "both"):
            yield _NoDP()
            return
        from fedprompt import privacy

        cfg, p = self.cfg, self.cfg.privacy
        plan = privacy.plan(cfg, n=len(data), planned_steps=cfg.federation.rounds * cfg.round_steps)
        ledger = privacy.Ledger.open(self.ledger_path(data), p.accountant)
        if ledger.would_exceed(plan.sigma, plan.q, cfg.round_steps, target=p.target_epsilon, delta=p.delta):
            raise privacy.PrivacyError(
                f"privacy budget exhausted: this client has spent epsilon {ledger.epsilon(p.delta):.3f} "
                f"of privacy.target_epsilon {p.target_epsilon} ({ledger.steps} DP steps, ledger "
                f"{ledger.path}); it trains no further"
            )
        with privacy.per_example_gradients(self.state.model):
            yield _DP(plan, ledger, len(data), p.delta, seed)

    def evaluate(self, tensors: dict[str, torch.Tensor], *, partition_id: int | None = None, source: str = "server") -> tuple[dict[str, float], int]:
        """Metrics of the global payload on partition `partition_id`'s test split (with
        `personal_accuracy`, see engine.evaluate), or on the whole held-out test split when
        None (centralized evaluation); (metrics, examples)."""
        from fedprompt.engine import evaluate

        s, limit = self.state, self.cfg.train.max_eval_examples
        data = s.test if partition_id is None else self.shard(partition_id).test
        tensors = self._at_rank(tensors, None)  # the global at its own rank: what the export holds
        payload.load(s.model, tensors, source=source)
        n = len(data) if not limit else min(len(data), limit)
        # A client's own test split also gets the prediction under its own label prior (from its
        # training labels). Not under DP-SGD: those labels are private, outside the accountant.
        personal = partition_id is not None and not s.task.generative and self.cfg.privacy.mode not in ("sample", "both")
        prior = self._log_prior(self.shard(partition_id).train) if personal else None
        m = evaluate(s.model, s.task, data, self.cfg, pad_id=s.pad_id, device=s.backbone.device, limit=limit, prior=prior)
        return m, n


def default_state_dir(cfg: Config) -> Path:
    """client.state_dir, or the per-user state folder of a `fedprompt client`."""
    if cfg.client.state_dir:
        return Path(cfg.client.state_dir).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "fedprompt"


def data_fingerprint(data) -> str:
    """A short hash of a client's training examples: the privacy ledger is that data's, so a
    restarted client (or another process serving the same data) continues the same account."""
    h = hashlib.sha256()
    for ids, target in zip(data.ids, data.target, strict=True):
        h.update(repr((ids, target)).encode())
    return h.hexdigest()[:16]


class _NoDP:
    plan = None

    def spent(self, steps: int) -> dict:
        return {}


@dataclass
class _DP:
    plan: object  # privacy.SamplePlan
    ledger: object  # privacy.Ledger
    n: int
    delta: float
    seed: int | None = None

    def batches(self):
        from fedprompt.privacy import poisson_batches

        return poisson_batches(self.n, self.plan.q, self.seed)

    def spent(self, steps: int) -> dict:
        """Record this round's steps; the client's epsilon so far (metrics of the reply)."""
        self.ledger.record(self.plan.sigma, self.plan.q, steps)
        return {"epsilon": self.ledger.epsilon(self.delta), "noise_multiplier": self.plan.sigma, "sample_rate": self.plan.q, "dp_steps": self.ledger.steps}
