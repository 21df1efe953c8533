"""The DeepSpeed engine: trains, is deterministic, never JIT-compiles on CPU, supports ZeRO."""

from __future__ import annotations

import pytest
import torch

from fedprompt import payload
from fedprompt.engine import lr_factor, make_engine, train_steps
from fedprompt.run import setup
from tests.tiny import tiny_config


def _train(cfg, steps=6):
    s = setup(cfg)
    engine = make_engine(s.model, cfg, steps)
    loss = train_steps(engine, s.task, s.train, cfg, steps=steps, seed=0, pad_id=s.pad_id, device=s.backbone.device)
    return s, engine, loss


def test_deterministic_on_cpu():
    cfg = tiny_config("llama", "lora", train__lr=0.01)
    a, _, la = _train(cfg)
    b, _, lb = _train(cfg)
    assert la == lb
    pa, pb = payload.extract(a.model), payload.extract(b.model)
    assert payload.digest(pa) == payload.digest(pb)


def test_no_jit_compile_and_torch_optimizer():
    import deepspeed.ops

    cfg = tiny_config("bert", "prompt")
    s, engine, _ = _train(cfg, steps=1)
    assert deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm") is False
    opt = engine.optimizer
    assert isinstance(getattr(opt, "optimizer", opt), torch.optim.AdamW)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_the_payload(stage):
    cfg = tiny_config("bert", "prompt", deepspeed__zero_stage=stage, train__lr=0.05)
    s = setup(cfg)
    from fedprompt.engine import full_params

    with full_params(s.model):
        before = payload.extract(s.model)
    engine = make_engine(s.model, cfg, 4)
    train_steps(engine, s.task, s.train, cfg, steps=4, seed=0, pad_id=s.pad_id, device=s.backbone.device)
    with full_params(s.model):
        after = payload.extract(s.model)
    assert set(after) == set(before)
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_gradient_accumulation_consumes_micro_batches():
    cfg = tiny_config("bert", "prompt", deepspeed__gradient_accumulation_steps=2)
    s = setup(cfg)
    engine = make_engine(s.model, cfg, 3)
    train_steps(engine, s.task, s.train, cfg, steps=3, seed=0, pad_id=s.pad_id, device=s.backbone.device)
    assert engine.global_steps == 3 and engine.micro_steps == 6


def test_loss_decreases():
    cfg = tiny_config("bert", "prompt", model__name="minilm-l6", train__lr=0.05, train__batch_size=8)
    s = setup(cfg)
    engine = make_engine(s.model, cfg, 30)
    first = train_steps(engine, s.task, s.train, cfg, steps=10, seed=0, pad_id=s.pad_id, device=s.backbone.device)
    train_steps(engine, s.task, s.train, cfg, steps=10, seed=1, pad_id=s.pad_id, device=s.backbone.device, start_step=10)
    last = train_steps(engine, s.task, s.train, cfg, steps=10, seed=2, pad_id=s.pad_id, device=s.backbone.device, start_step=20)
    assert last < first


def test_lr_schedule():
    assert lr_factor(0, warmup=4, total=10, schedule="linear") == 0.25
    assert lr_factor(3, warmup=4, total=10, schedule="linear") == 1.0
    assert lr_factor(4, warmup=4, total=10, schedule="linear") == 1.0
    assert lr_factor(7, warmup=4, total=10, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(10, warmup=4, total=10, schedule="linear") == 0.0
    assert lr_factor(7, warmup=4, total=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(9, warmup=0, total=10, schedule="constant") == 1.0


def test_bf16_precision_runs():
    cfg = tiny_config("bert", "prompt", deepspeed__precision="bf16")
    _, engine, loss = _train(cfg, steps=2)
    assert loss == loss  # finite, not NaN
