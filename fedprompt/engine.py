"""Local training and evaluation under a DeepSpeed engine. Reads top to bottom.

The only importer of deepspeed. The same code runs on CPU and GPU; on CPU nothing is
JIT-compiled: the optimizer is a plain torch AdamW (DeepSpeed's own Adam compiles ~70 s) and
the shared-memory communication op (~60 s to build) is skipped: with it off, DeepSpeed's
all-reduce falls back to torch.distributed over gloo (deepspeed/comm/torch.py, build_shm_op).

Data parallel (a multi-rank client, fedprompt/ranks.py): every rank draws the same seeded
global batch and trains on its slice batch[rank::world]; the engine averages the ranks'
gradients, so with equal slices the step is the one-rank step of the whole batch.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fedprompt.config import Config
from fedprompt.methods.base import Adapted
from fedprompt.tasks import Encoded, Generation, Task, collate, macro_f1

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
deepspeed.utils.logger.setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(*, rank: int = 0, world_size: int = 1, port: int = 0, timeout_s: float | None = None) -> None:
    """This process's group (gloo on CPU, NCCL on GPU), set up once: rank `rank` of
    `world_size`, meeting on loopback `port` (a multi-rank client, fedprompt/ranks.py;
    collectives fail after `timeout_s`, None: DeepSpeed's 30 min), or one rank alone on a free
    port. Under a distributed launcher (MASTER_PORT set) its environment is used as is. Nothing
    goes into os.environ, so nothing leaks into child processes."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu:
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:  # no ~60 s JIT build: gloo carries the (tiny) all-reduces
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    backend = "gloo" if on_cpu else "nccl"
    os.environ.setdefault("LOCAL_RANK", "0")  # the engine asserts it; alone it launches nothing
    extra = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    if "MASTER_PORT" in os.environ:
        deepspeed.init_distributed(dist_backend=backend, verbose=False, **extra)
    else:
        deepspeed.init_distributed(
            dist_backend=backend,
            verbose=False,
            auto_mpi_discovery=False,
            init_method=f"tcp://127.0.0.1:{port or _free_port()}",
            rank=rank,
            world_size=world_size,
            **extra,
        )


def close_distributed() -> None:
    """Tear down this process's group (a multi-rank client whose rank died), so that
    init_distributed can build a new one. DeepSpeed caches the world group: forget it too."""
    from deepspeed.utils import groups

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None


def world() -> tuple[int, int]:
    """(this process's rank, number of ranks) of its training group; (0, 1) alone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based): linear warmup, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    frac = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return max(1.0 - frac, 0.0)


def ds_config(cfg: Config, *, private: bool = False) -> dict:
    d = cfg.deepspeed
    # DeepSpeed checks train_batch = micro x accumulation x ranks: each rank's micro-batch is
    # its slice of the global batch (config/checks.py refuses a batch the ranks do not divide).
    return {
        "train_micro_batch_size_per_gpu": max(cfg.train.batch_size // world()[1], 1),
        "gradient_accumulation_steps": d.gradient_accumulation_steps,
        # Under DP-SGD each example's gradient is clipped by Opacus; a clip of the batch sum
        # would act on the non-private gradient that Opacus then replaces: skip the work.
        "gradient_clipping": 0.0 if private else d.gradient_clipping,
        "zero_optimization": {"stage": d.zero_stage},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: nothing to JIT-compile
        "bf16": {"enabled": d.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def make_engine(model: Adapted, cfg: Config, total_steps: int, *, start_step: int = 0, dp=None):
    """A DeepSpeed engine around `model`, training only its payload tensors. The LR schedule
    spans `total_steps` and begins at `start_step` (a federated round continues the schedule
    of the whole run, so warmup happens once, not every round). With `dp` (a
    privacy.SamplePlan; the model inside privacy.per_example_gradients) the optimizer DeepSpeed
    steps is Opacus's DPOptimizer around the AdamW."""
    init_distributed()
    params = list(model.trainable().values())
    t = cfg.train
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if dp is not None:
        from fedprompt.privacy import dp_optimizer

        opt = dp_optimizer(opt, cfg, dp)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s + start_step, warmup=cfg.train.warmup_steps, total=total_steps, schedule=cfg.train.schedule)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, model_parameters=params, config=ds_config(cfg, private=dp is not None)
    )
    if dp is not None:
        # Opacus replaces the gradient with the clipped, noised one, and on several ranks its
        # DistributedDPOptimizer all-reduces that itself: DeepSpeed's all-reduce of the raw
        # gradient in backward would be wasted, and a rank whose slice of the Poisson sample is
        # empty does no backward, so the ranks' collectives would not match.
        engine.enable_backward_allreduce = False
    return engine


@contextlib.contextmanager
def full_params(model: Adapted, modify: bool = False) -> Iterator[None]:
    """Under ZeRO-3 the payload parameters are partitioned: gather them to read or write."""
    params = [p for p in model.trainable().values() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless seeded reshuffles of range(n), cut into batches (the last short one dropped
    unless it is the only one). The generator is private, so the stream does not depend on
    (or disturb) torch's global RNG used for initialisation and dropout."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=g).tolist()
        stop = max(n - batch_size + 1, 1)
        for i in range(0, stop, batch_size):
            yield order[i : i + batch_size]


@dataclass
class StepLog:
    step: int
    loss: float
    lr: float


def train_steps(
    engine,
    task: Task,
    data: Encoded,
    cfg: Config,
    *,
    steps: int,
    stream: Iterator[list[int]],
    pad_id: int,
    device: torch.device,
    start_step: int = 0,
    on_step: Callable[[StepLog], None] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    private: bool = False,
) -> float:
    """Run `steps` optimizer steps (each of gradient_accumulation_steps micro-batches) on
    index batches drawn from `stream` (see `batches`; one stream per run, so evaluating in
    between never changes the batch order). Returns the mean training loss.

    `private`: DP-SGD (engine from make_engine(dp=...)): batches come from a Poisson stream
    and may be empty (the step then adds noise only), and the loss is a mean of per-example
    losses, so that each example's gradient depends on that example alone."""
    engine.train()
    rank, ranks = world()
    gas = cfg.deepspeed.gradient_accumulation_steps
    loss_fn = task.example_mean_loss if private else task.loss
    total = 0.0
    for step in range(start_step, start_step + steps):
        step_loss = 0.0
        for _ in range(gas):
            index = next(stream)[rank::ranks]  # every rank drew the same global batch
            if not index:  # only a Poisson sample can be empty
                from fedprompt.privacy import empty_step

                empty_step(engine.module)
                engine.step()
                engine.optimizer.zero_grad(set_to_none=True)
                continue
            batch = collate(data, index, pad_id, device)
            logits = engine(batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(logits, batch)
            if extra_loss is not None:
                loss = loss + extra_loss()
            engine.backward(loss)
            engine.step()
            if private:
                # DeepSpeed's own zero_grad (fp32, ZeRO 0) clears p.grad only; per-example
                # gradients left behind would be added into the next step's.
                engine.optimizer.zero_grad(set_to_none=True)
            step_loss += float(loss.detach()) / gas
        total += step_loss
        if on_step is not None:
            on_step(StepLog(step + 1, step_loss, engine.get_lr()[0]))
    if ranks > 1:  # the global batch's loss: the mean of the ranks' equal slices
        t = torch.tensor([total], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        total = float(t) / ranks
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, task: Task, data: Encoded, cfg: Config, *, pad_id: int, device: torch.device, limit: int = 0, prior: torch.Tensor | None = None
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 (classification) or loss and exact match (generation).
    `model` is anything mapping (input_ids, attention_mask) to logits. With `prior` (C,), a
    client's log label frequencies, classification adds `personal_accuracy`: the argmax of
    logits + prior, the same model's prediction under the client's own label distribution."""
    was_training = model.training
    model.eval()
    n = len(data) if not limit else min(limit, len(data))
    bs = cfg.train.eval_batch_size
    loss_sum, preds, golds, personal = 0.0, [], [], []
    for i in range(0, n, bs):
        index = list(range(i, min(i + bs, n)))
        batch = collate(data, index, pad_id, device)
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss_sum += float(task.loss(logits, batch)) * len(index)
        if not task.generative:
            preds.append(task.predict(logits, batch).cpu())
            golds.append(batch["labels"].cpu())
            if prior is not None:
                personal.append((task.class_logits(logits, batch) + prior.to(logits.device)).argmax(-1).cpu())
    out = {"loss": loss_sum / max(n, 1)}
    if task.generative:
        em = exact_match(model, task, data, n, device)
        out.update(accuracy=em, exact_match=em)
    else:
        p, g = torch.cat(preds), torch.cat(golds)
        out.update(accuracy=int((p == g).sum()) / max(len(g), 1), macro_f1=macro_f1(p, g, len(task.labels)))
        if personal:
            out["personal_accuracy"] = int((torch.cat(personal) == g).sum()) / max(len(g), 1)
    model.train(was_training)
    return out


@torch.no_grad()
def exact_match(model, task: Generation, data: Encoded, n: int, device: torch.device) -> float:
    """Greedy decoding without a KV cache (so it works the same for every method), one example
    at a time: the fraction whose response equals the reference after stripping whitespace.
    Decoding stops as soon as the text can no longer equal the reference (it is not a prefix
    of it), which gives the same answer as decoding to the end at a fraction of the cost."""
    hits = 0
    for i in range(n):
        ids = data.ids[i][: data.prompt_len[i]]
        ref = data.responses[i].strip()
        out: list[int] = []
        text = ""  # decode(out), stripped
        for _ in range(task.max_new_tokens):
            x = torch.tensor([ids + out], device=device)
            nxt = int(model(x, torch.ones_like(x))[0, -1].argmax())
            if nxt == task.eos:
                break
            out.append(nxt)
            text = task.tok.decode(out, skip_special_tokens=True).strip()
            # Appending tokens only appends text, except mid-character (a partial UTF-8 byte
            # decodes to U+FFFD): never stop on that.
            if "\ufffd" not in text and not ref.startswith(text):
                break
        hits += text == ref
    return hits / max(n, 1)
