"""DeepSpeed engine step vs a plain torch loop: same model, same batches, one run.

    python benchmarks/engine_overhead.py [--config FILE] [--steps N] [--repeats R] [--set k=v ...]

Blocks of N steps alternate between the two loops R times (so drift on a shared machine hits
both alike); the report is the ratio of median per-step times. Design target: <= 1.05.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedprompt.config import load_config  # noqa: E402
from fedprompt.engine import batches, lr_factor, make_engine  # noqa: E402
from fedprompt.run import setup  # noqa: E402
from fedprompt.tasks import collate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "bbc-minilm-prompt.yaml"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    total = args.steps * args.repeats

    ds = setup(cfg)
    engine = make_engine(ds.model, cfg, total)
    plain = setup(cfg)
    params = list(plain.model.trainable().values())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup=cfg.train.warmup_steps, total=total, schedule=cfg.train.schedule))
    clip = cfg.deepspeed.gradient_clipping
    dev = ds.backbone.device
    # Identical batch streams for both loops.
    stream_ds = batches(len(ds.train), cfg.train.batch_size, 0)
    stream_plain = batches(len(plain.train), cfg.train.batch_size, 0)

    def ds_block() -> float:
        engine.train()
        t = time.perf_counter()
        for _ in range(args.steps):
            b = collate(ds.train, next(stream_ds), ds.pad_id, dev)
            loss = ds.task.loss(engine(b["input_ids"], b["attention_mask"]), b)
            engine.backward(loss)
            engine.step()
        return (time.perf_counter() - t) / args.steps

    def plain_block() -> float:
        plain.model.train()
        t = time.perf_counter()
        for _ in range(args.steps):
            b = collate(plain.train, next(stream_plain), plain.pad_id, dev)
            loss = plain.task.loss(plain.model(b["input_ids"], b["attention_mask"]), b)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / args.steps

    ds_block(), plain_block()  # warm-up (allocator, kernels)
    ds_times, plain_times = [], []
    for _ in range(args.repeats):
        ds_times.append(ds_block())
        plain_times.append(plain_block())
    d, p = statistics.median(ds_times), statistics.median(plain_times)
    print(f"config: {args.config} ({cfg.model.name}, {cfg.model.quantization}, {cfg.peft.method}, batch {cfg.train.batch_size}, "
          f"ZeRO {cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision})")
    print(f"plain torch loop : {p * 1000:8.1f} ms/step (median of {args.repeats} blocks of {args.steps})")
    print(f"DeepSpeed engine : {d * 1000:8.1f} ms/step")
    print(f"ratio engine/plain: {d / p:.3f}  (design target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
