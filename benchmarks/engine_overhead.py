"""DeepSpeed engine step vs a plain torch loop: same model, same batches, one run.

    python benchmarks/engine_overhead.py [--long] [--out DIR] [--config FILE --set k=v ...] [--steps N] [--repeats R]

Blocks of N steps alternate between the two loops R times (so drift on a shared machine hits
both alike); the report is the ratio of median per-step times. Design target: <= 1.05.
Quick: MiniLM fp32 prompt tuning; --long adds SmolLM2 4-bit LoRA; --config measures one config.
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

from benchmarks.common import write_result  # noqa: E402
from fedprompt.config import load_config  # noqa: E402
from fedprompt.engine import batches, lr_factor, make_engine  # noqa: E402
from fedprompt.run import setup  # noqa: E402
from fedprompt.tasks import collate  # noqa: E402


def measure(config: str, overrides: list[str], steps: int, repeats: int) -> dict:
    """Median ms per step of the DeepSpeed engine and of a plain torch loop, same batches."""
    cfg = load_config(config, overrides)
    total = steps * (repeats + 1)

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
        for _ in range(steps):
            b = collate(ds.train, next(stream_ds), ds.pad_id, dev)
            loss = ds.task.loss(engine(b["input_ids"], b["attention_mask"]), b)
            engine.backward(loss)
            engine.step()
        return (time.perf_counter() - t) / steps

    def plain_block() -> float:
        plain.model.train()
        t = time.perf_counter()
        for _ in range(steps):
            b = collate(plain.train, next(stream_plain), plain.pad_id, dev)
            loss = plain.task.loss(plain.model(b["input_ids"], b["attention_mask"]), b)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t) / steps

    ds_block(), plain_block()  # warm-up (allocator, kernels)
    ds_times, plain_times = [], []
    for _ in range(repeats):
        ds_times.append(ds_block())
        plain_times.append(plain_block())
    d, p = statistics.median(ds_times), statistics.median(plain_times)
    return {
        "model": f"{cfg.model.name}, {cfg.model.quantization}",
        "method": cfg.peft.method,
        "batch": f"{cfg.train.batch_size} x {cfg.model.max_length} tokens",
        "plain_ms": p * 1000,
        "ds_ms": d * 1000,
        "ratio": d / p,
        "steps": steps,
        "repeats": repeats,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "engine"))
    ap.add_argument("--config", default="")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    plan = (
        [(args.config, args.overrides, args.steps or 10, args.repeats or 5)]
        if args.config
        else [(str(ROOT / "configs" / "bbc-minilm-prompt.yaml"), [], args.steps or 5, args.repeats or 3)]
    )
    if args.long and not args.config:
        plan.append((str(ROOT / "configs" / "bbc-smollm2-lora.yaml"), [], 3, 3))
    res = [measure(*p) for p in plan]
    lines = [
        "DeepSpeed engine (ZeRO 0, fp32, torch AdamW) step vs a plain torch loop (forward, backward, clip, AdamW, "
        "LR schedule) on the same model and the same batches, in one process; blocks of steps alternate "
        "between the two, medians compared.",
        "",
        "| model | method | batch | plain torch loop (ms/step) | DeepSpeed engine (ms/step) | ratio (target <= 1.05) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res:
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']} | {r['plain_ms']:.1f} | {r['ds_ms']:.1f} | {r['ratio']:.3f} |")
    worst = max(r["ratio"] for r in res)
    lines += ["", f"Largest ratio {worst:.3f}: target <= 1.05 {'met' if worst <= 1.05 else 'MISSED'}."]
    write_result(
        Path(args.out),
        title="Engine: DeepSpeed step vs a plain torch loop",
        markdown="\n".join(lines),
        summary={"ratio": round(worst, 3), **{f"{r['model'].split(',')[0]}_ratio": round(r["ratio"], 3) for r in res}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
