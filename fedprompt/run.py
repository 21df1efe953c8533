"""The jobs the CLI runs: centralized training, evaluation of an adapter, config validation.

Each `run_*` takes a validated Config and does the work; the CLI only parses arguments.
Everything that can fail on user input (data, model name, label words) is checked before the
output directory is created, so a failed start never leaves a directory that looks like a result.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fedprompt import payload
from fedprompt.config import Config
from fedprompt.report import Table, append_jsonl, peak_memory_mb, plot_curves, summary, where
from fedprompt.rundir import RunError, check_output, prepare_output  # noqa: F401  (RunError: re-exported)


@dataclass
class Setup:
    """Everything one client holds: its data, the frozen backbone with the method, the task."""

    cfg: Config
    data: object  # fedprompt.data.TaskData
    backbone: object  # fedprompt.backbone.Backbone
    model: object  # fedprompt.methods.Adapted
    task: object  # fedprompt.tasks.Task
    train: object  # fedprompt.tasks.Encoded
    test: object

    @property
    def pad_id(self) -> int:
        return int(self.backbone.tokenizer.pad_token_id)  # load_backbone guarantees one


def setup(cfg: Config, *, data=None) -> Setup:
    """Load data, backbone and method (seeded by train.seed), and tokenize both splits."""
    from fedprompt import methods
    from fedprompt.backbone import load_backbone
    from fedprompt.data import load_task_data
    from fedprompt.lora_aggregation import lora_aggregation
    from fedprompt.tasks import make_task, task_kind

    data = data if data is not None else load_task_data(cfg.data)
    torch.manual_seed(cfg.train.seed)
    backbone = load_backbone(cfg.model, num_labels=len(data.labels) or None, task=data.task)
    # DeepSpeed picks its accelerator once, at import: make it match the backbone's device.
    os.environ["DS_ACCELERATOR"] = "cuda" if backbone.device.type == "cuda" else "cpu"
    positions = getattr(backbone.model.config, "max_position_embeddings", None)
    extra = cfg.peft.num_virtual_tokens if cfg.peft.method in ("prompt", "prefix") else 0
    if positions and cfg.model.max_length + extra > positions:
        raise RunError(
            f"model.max_length: {cfg.model.max_length} + {extra} virtual tokens exceeds the backbone's "
            f"{positions} positions; lower model.max_length to at most {positions - extra}"
        )
    model = methods.build(backbone, cfg.peft, num_labels=len(data.labels))
    frozen = lora_aggregation(cfg.peft.method, cfg.federation.lora_aggregation).fixed
    if frozen is not None:  # FFA-LoRA: A stays at the seeded init every client shares
        model.freeze(frozen)
    kind = task_kind(data.task, backbone.causal)
    task = make_task(kind, backbone.tokenizer, cfg, data.labels)
    if kind == "verbalizer" and "logits_to_keep" in inspect.signature(backbone.model.forward).parameters:
        model.last_only = True
    return Setup(cfg, data, backbone, model, task, task.encode(data.train), task.encode(data.test))


def run_train(cfg: Config, output: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """Centralized baseline: one client holding all the data, same engine. Returns the last
    metrics row plus summary figures."""
    from fedprompt.engine import make_engine

    out = Path(output)
    t_start = time.perf_counter()
    check_output(out, overwrite)  # before the expensive part; prepare_output acts on it
    s = setup(cfg)
    manifest = payload.manifest_of(s.model)  # before the engine: ZeRO-3 would partition the tensors
    steps = cfg.train.local_steps
    private = cfg.privacy.mode in ("sample", "both")
    dp, hooks = None, contextlib.ExitStack()
    if private:  # DP-SGD on the pooled data: the upper bound of what federated DP can reach
        from fedprompt import privacy

        dp = privacy.plan(cfg, n=len(s.train), planned_steps=steps)
        hooks.enter_context(privacy.per_example_gradients(s.model))
    engine = make_engine(s.model, cfg, steps, dp=dp)
    prepare_output(out, overwrite)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    from fedprompt.tracking import Trackers

    trackers = Trackers(cfg, out, out.resolve().name)
    try:
        return _train(cfg, out, s, engine, trackers, manifest=manifest, dp=dp, hooks=hooks, quiet=quiet, t_start=t_start)
    except BaseException:
        trackers.finish(ok=False)
        raise


def _train(cfg: Config, out: Path, s: Setup, engine, trackers, *, manifest, dp, hooks, quiet: bool, t_start: float) -> dict:
    """run_train's evaluation-and-training loop, once the engine and the run directory exist."""
    from fedprompt.engine import batches, evaluate, full_params, train_steps

    steps, every = cfg.train.local_steps, cfg.train.eval_every or cfg.train.local_steps
    device, limit = s.backbone.device, cfg.train.max_eval_examples
    private = dp is not None
    if private:
        from fedprompt import privacy

    table = Table([("round", 5), ("step", 6), ("train_loss", 10), ("test_loss", 9), ("accuracy", 8), ("macro_f1", 8), ("wall_s", 8)])
    rows: list[dict] = []

    def record(k: int, step: int, train_loss: float | None) -> dict:
        m = evaluate(s.model, s.task, s.test, cfg, pad_id=s.pad_id, device=device, limit=limit)
        row = {
            "round": k,
            "step": step,
            "accuracy": m["accuracy"],
            "loss": m["loss"],
            **{x: m[x] for x in m if x not in ("accuracy", "loss")},
            "train_loss": train_loss,
            "bytes_up": 0,
            "bytes_down": 0,
            "wall_s": round(time.perf_counter() - t_start, 3),
        }
        if private:
            row["epsilon"] = privacy.epsilon([(dp.sigma, dp.q, step)], cfg.privacy.delta, cfg.privacy.accountant) if step else 0.0
        append_jsonl(out / "metrics.jsonl", row)
        trackers.row(row, "step")
        rows.append(row)
        if not quiet:
            table.row([k, step, train_loss, m["loss"], m["accuracy"], m.get("macro_f1", m.get("exact_match")), f"{row['wall_s']:.1f}"])
        return row

    if not quiet:
        print(
            f"fedprompt train: {cfg.model.name} ({cfg.model.quantization}) + {cfg.peft.method} on {s.data.name}: "
            f"{len(s.train)} train / {len(s.test)} test examples, {steps} steps, payload {payload.raw_bytes(manifest):,} bytes"
        )
        table.header()
    record(0, 0, None)
    bar = tqdm(total=steps, desc="train", unit="step", disable=quiet, leave=False, dynamic_ncols=True)
    done, k = 0, 0
    # A batch-order stream separate from the init seed (so the two are not correlated).
    stream = privacy.poisson_batches(len(s.train), dp.q) if private else batches(len(s.train), cfg.train.batch_size, cfg.train.seed * 100003)
    train_time = 0.0
    while done < steps:
        chunk = min(every, steps - done)
        t0 = time.perf_counter()
        loss = train_steps(
            engine,
            s.task,
            s.train,
            cfg,
            steps=chunk,
            stream=stream,
            pad_id=s.pad_id,
            device=device,
            start_step=done,
            private=private,
            on_step=lambda log: (bar.update(1), bar.set_postfix(loss=f"{log.loss:.3f}", lr=f"{log.lr:.2g}")),
        )
        train_time += time.perf_counter() - t0
        done += chunk
        k += 1
        record(k, done, loss)
    bar.close()
    hooks.close()

    from fedprompt.export import make_portable

    with full_params(s.model):
        s.model.save_adapter(out / "adapter", s.backbone.path)
    make_portable(out / "adapter", cfg, s.data.labels, {**rows[-1], "kind": "train"})
    if cfg.output.plots:
        plot_curves(rows, out / "curves.png", x="step", title=f"{s.data.name}: {cfg.model.name} + {cfg.peft.method}")
    last = rows[-1]
    result = {
        **last,
        "start_accuracy": rows[0]["accuracy"],
        "steps": steps,
        "train_s": round(train_time, 2),
        "total_s": round(time.perf_counter() - t_start, 2),
        "peak_mem_mb": round(peak_memory_mb(), 1),
        "trainable_params": sum(int(torch.Size(sp.shape).numel()) for sp in manifest),
        "payload_bytes": payload.raw_bytes(manifest),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    trackers.finish(ok=True)
    if not quiet:
        summary(
            "Summary",
            [
                ("test accuracy", f"{last['accuracy']:.4f} (start {rows[0]['accuracy']:.4f})"),
                ("steps", steps),
                ("wall time", f"{result['total_s']:.1f} s (training {result['train_s']:.1f} s)"),
                ("peak memory", f"{result['peak_mem_mb']:.0f} MiB"),
                ("trainable params", f"{result['trainable_params']:,}"),
                ("payload bytes", f"{result['payload_bytes']:,}"),
                *([("epsilon", f"{last['epsilon']:.3f} at delta {cfg.privacy.delta:g} (DP-SGD, sigma {dp.sigma:.3f}, q {dp.q:.4f})")] if private else []),
                *where(out),
            ],
        )
    return result


def adapter_file(folder: str | Path) -> Path:
    """The weights file of an exported adapter folder, or a RunError saying what to pass."""
    f = Path(folder) / "adapter_model.safetensors"
    if not f.is_file():
        raise RunError(f"--adapter {str(folder)!r}: no adapter_model.safetensors there; pass the adapter/ folder of a run")
    return f


def load_adapter(model, folder: str | Path) -> None:
    """Load an exported adapter folder into `model`, checked against its manifest."""
    from safetensors.torch import load_file

    f = adapter_file(folder)
    try:
        tensors = load_file(str(f))
    except Exception as e:  # safetensors raises its own error type on a corrupt header
        raise RunError(f"{str(f)!r} is not a readable safetensors file ({e}); re-export the adapter") from None
    from fedprompt.lora_aggregation import rank_of

    rank = rank_of(tensors)
    if rank is not None and getattr(model, "rank", rank) != rank:  # a mixed-rank federation's export: the global's rank
        model.use_rank(rank, source=repr(str(f)))
    fixed = model.fixed()  # FFA-LoRA's A: in the adapter file, never part of the payload
    payload.load_into(fixed, {k: tensors.pop(k) for k in fixed if k in tensors}, source=str(f))
    payload.load(model, tensors, source=str(f))


def run_eval(cfg: Config, adapter: str | Path) -> dict:
    """Evaluate an exported adapter on the config's test split."""
    from fedprompt.engine import evaluate

    adapter_file(adapter)  # fail before loading data and backbone
    s = setup(cfg)
    load_adapter(s.model, adapter)
    m = evaluate(s.model, s.task, s.test, cfg, pad_id=s.pad_id, device=s.backbone.device, limit=cfg.train.max_eval_examples)
    summary(f"Evaluation of {adapter} on {s.data.name} ({len(s.test)} test examples)", list(m.items()))
    return m
