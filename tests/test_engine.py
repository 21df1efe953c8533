"""The DeepSpeed engine: trains, is deterministic, never JIT-compiles on CPU, supports ZeRO."""

from __future__ import annotations

import pytest
import torch

from fedprompt import payload
from fedprompt.engine import batches, lr_factor, make_engine, train_steps
from fedprompt.run import setup
from tests.tiny import tiny_config


def _train(cfg, steps=6):
    s = setup(cfg)
    engine = make_engine(s.model, cfg, steps)
    loss = train_steps(
        engine, s.task, s.train, cfg, steps=steps, stream=batches(len(s.train), cfg.train.batch_size, 0), pad_id=s.pad_id, device=s.backbone.device
    )
    return s, engine, loss


def test_deterministic_on_cpu():
    cfg = tiny_config("llama", "lora", train__lr=0.01)
    a, _, la = _train(cfg)
    b, _, lb = _train(cfg)
    assert la == lb
    pa, pb = payload.extract(a.model), payload.extract(b.model)
    assert payload.digest(pa) == payload.digest(pb)


def test_no_jit_compile_and_torch_optimizer():
    """A fresh process whose DeepSpeed op builders raise on any build or load: the engine must
    still initialise and step (a JIT compile costs a user 60-80 s on CPU)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        from deepspeed.ops.op_builder.builder import OpBuilder
        def refuse(self, *a, **k):
            raise SystemExit(f"JIT build attempted: {self.NAME}")
        OpBuilder.load = OpBuilder.jit_load = OpBuilder.builder = refuse
        import torch
        from tests.tiny import tiny_config
        from fedprompt.engine import batches, make_engine, train_steps
        from fedprompt.run import setup
        cfg = tiny_config("bert", "prompt")
        s = setup(cfg)
        engine = make_engine(s.model, cfg, 1)
        train_steps(engine, s.task, s.train, cfg, steps=1, stream=batches(len(s.train), 4, 0), pad_id=s.pad_id, device=s.backbone.device)
        opt = engine.optimizer
        assert isinstance(getattr(opt, "optimizer", opt), torch.optim.AdamW), type(opt)
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:] + r.stdout[-500:]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_the_payload(stage):
    cfg = tiny_config("bert", "prompt", deepspeed__zero_stage=stage, train__lr=0.05)
    s = setup(cfg)
    from fedprompt.engine import full_params

    with full_params(s.model):
        before = payload.extract(s.model)
    engine = make_engine(s.model, cfg, 4)
    train_steps(engine, s.task, s.train, cfg, steps=4, stream=batches(len(s.train), cfg.train.batch_size, 0), pad_id=s.pad_id, device=s.backbone.device)
    with full_params(s.model):
        after = payload.extract(s.model)
    assert set(after) == set(before)
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_gradient_accumulation_consumes_micro_batches():
    cfg = tiny_config("bert", "prompt", deepspeed__gradient_accumulation_steps=2)
    s = setup(cfg)
    engine = make_engine(s.model, cfg, 3)
    train_steps(engine, s.task, s.train, cfg, steps=3, stream=batches(len(s.train), cfg.train.batch_size, 0), pad_id=s.pad_id, device=s.backbone.device)
    assert engine.global_steps == 3 and engine.micro_steps == 6


def test_loss_decreases():
    cfg = tiny_config("bert", "prompt", model__name="minilm-l6", train__lr=0.05, train__batch_size=8)
    s = setup(cfg)
    engine = make_engine(s.model, cfg, 30)
    stream = batches(len(s.train), cfg.train.batch_size, 0)
    first = train_steps(engine, s.task, s.train, cfg, steps=10, stream=stream, pad_id=s.pad_id, device=s.backbone.device)
    train_steps(engine, s.task, s.train, cfg, steps=10, stream=stream, pad_id=s.pad_id, device=s.backbone.device, start_step=10)
    last = train_steps(engine, s.task, s.train, cfg, steps=10, stream=stream, pad_id=s.pad_id, device=s.backbone.device, start_step=20)
    assert last < first


def test_lr_schedule():
    assert lr_factor(0, warmup=4, total=10, schedule="linear") == 0.25
    assert lr_factor(3, warmup=4, total=10, schedule="linear") == 1.0
    assert lr_factor(4, warmup=4, total=10, schedule="linear") == 1.0
    assert lr_factor(7, warmup=4, total=10, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(10, warmup=4, total=10, schedule="linear") == 0.0
    assert lr_factor(7, warmup=4, total=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(9, warmup=0, total=10, schedule="constant") == 1.0


def test_bf16_training_exports_the_fp32_contract(tmp_path):
    """A bf16 engine casts the payload in place; the adapter and the payload stay float32, and
    the exported adapter loads back through the manifest check."""
    from fedprompt.run import load_adapter

    cfg = tiny_config("bert", "prompt", deepspeed__precision="bf16")
    s, engine, loss = _train(cfg, steps=2)
    assert loss == loss  # not NaN
    assert any(p.dtype == torch.bfloat16 for p in s.model.trainable().values())  # bf16 really was on
    assert all(t.dtype == torch.float32 for t in payload.extract(s.model).values())
    assert {spec.dtype for spec in payload.manifest_of(s.model)} == {"float32"}
    s.model.save_adapter(tmp_path, s.backbone.path)
    fresh = setup(cfg)
    load_adapter(fresh.model, tmp_path)
    for k, v in payload.extract(s.model).items():
        assert torch.equal(payload.extract(fresh.model)[k], v), k


def test_lr_schedule_steps_once_per_optimizer_step_with_accumulation():
    """DeepSpeed steps the scheduler at accumulation boundaries only: the LR seen at optimizer
    step k is base * lr_factor(k), whatever gradient_accumulation_steps is."""
    cfg = tiny_config("bert", "prompt", deepspeed__gradient_accumulation_steps=3, train__warmup_steps=2, train__local_steps=5, train__lr=0.01)
    s = setup(cfg)
    engine = make_engine(s.model, cfg, 5)
    stream = batches(len(s.train), cfg.train.batch_size, 0)
    seen = []
    train_steps(engine, s.task, s.train, cfg, steps=5, stream=stream, pad_id=s.pad_id, device=s.backbone.device, on_step=lambda log: seen.append(log.lr))
    # on_step reports the LR after the step, i.e. the one the next step will use.
    expected = [0.01 * lr_factor(k, warmup=2, total=5, schedule="linear") for k in range(1, 6)]
    assert seen == pytest.approx(expected)


def test_zero3_run_exports_an_adapter_that_loads(tmp_path):
    from fedprompt.run import load_adapter, run_train

    cfg = tiny_config("bert", "lora", deepspeed__zero_stage=3, train__lr=0.05, output__plots=False)
    res = run_train(cfg, tmp_path / "run", quiet=True)
    fresh = setup(cfg)
    load_adapter(fresh.model, tmp_path / "run" / "adapter")  # names, shapes, dtypes all checked
    from fedprompt.engine import evaluate

    m = evaluate(fresh.model, fresh.task, fresh.test, cfg, pad_id=fresh.pad_id, device=fresh.backbone.device, limit=cfg.train.max_eval_examples)
    assert m["accuracy"] == pytest.approx(res["accuracy"])
