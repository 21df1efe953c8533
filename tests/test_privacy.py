"""DP-SGD under the DeepSpeed engine, checked against brute force and Opacus's own math."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedprompt import privacy
from fedprompt.engine import make_engine, train_steps
from fedprompt.run import setup
from fedprompt.tasks import collate
from tests.tiny import tiny_config

CASES = [(kind, method, quant) for kind, quant in (("bert", "none"), ("llama", "none"), ("llama", "4bit")) for method in ("prompt", "prefix", "lora")]


def _no_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _dp_setup(kind, method, quant, **sets):
    cfg = tiny_config(kind, method, quant, privacy__mode="sample", peft__lora_dropout=0.0, **sets)
    s = setup(cfg)
    s.model.train()
    _no_dropout(s.model)
    if method == "lora":  # peft starts B at zero: A's gradient would vanish and prove nothing
        with torch.no_grad():
            for n, p in s.model.trainable().items():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    return cfg, s


@pytest.mark.parametrize("kind,method,quant", CASES)
def test_per_example_gradients_equal_brute_force_under_deepspeed(kind, method, quant):
    cfg, s = _dp_setup(kind, method, quant)
    batch = collate(s.train, list(range(5)), s.pad_id, s.backbone.device)
    params = s.model.trainable()
    s.model.train()

    # Brute force: one forward and backward per example, on that example's row of the batch.
    brute = []
    for i in range(5):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        loss = s.task.example_mean_loss(s.model(row["input_ids"], row["attention_mask"]), row)
        brute.append(dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True)))

    plan = privacy.SamplePlan(sigma=1.0, q=0.1, expected_batch=5)
    with privacy.per_example_gradients(s.model):
        engine = make_engine(s.model, cfg, 10, dp=plan)
        loss = s.task.example_mean_loss(engine(batch["input_ids"], batch["attention_mask"]), batch)
        engine.backward(loss)
        for name, p in params.items():
            assert p.grad_sample.shape == (5, *p.shape), name
            for i in range(5):
                want, got = brute[i][name], p.grad_sample[i]
                scale = float(want.abs().max())
                assert scale > 0, f"{name}: example {i} has a zero gradient; the check would be vacuous"
                assert float((got - want).abs().max()) <= 1e-5 * scale, f"{name}[{i}]"
    assert not any(hasattr(p, "grad_sample") for p in params.values())  # hooks gone after the context


def test_clipping_bounds_every_example_and_noise_has_std_sigma_c():
    cfg, s = _dp_setup("bert", "prompt", "none", privacy__max_grad_norm=0.01)
    params = list(s.model.trainable().values())
    batch = collate(s.train, list(range(8)), s.pad_id, s.backbone.device)
    sigma, c, b = 2.0, 0.01, 8
    plan = privacy.SamplePlan(sigma=sigma, q=0.1, expected_batch=b)
    with privacy.per_example_gradients(s.model):
        engine = make_engine(s.model, cfg, 10, dp=plan)
        opt = engine.optimizer
        loss = s.task.example_mean_loss(engine(batch["input_ids"], batch["attention_mask"]), batch)
        engine.backward(loss)
        norms = privacy.clipped_norms(s.model)
        assert float(norms.min()) > c  # every example is clipped: the bound is exercised
        opt.clip_and_accumulate()
        summed = [p.summed_grad.clone() for p in params]
        # Each example contributes a scaled copy of its gradient with norm <= C.
        factors = (c / (norms + 1e-6)).clamp(max=1.0)
        per_ex = torch.stack([torch.cat([(p.grad_sample[i] * factors[i]).flatten() for p in params]) for i in range(b)])
        assert float(per_ex.norm(dim=1).max()) <= c * (1 + 1e-5)
        assert torch.allclose(torch.cat([x.flatten() for x in summed]), per_ex.sum(0), rtol=1e-5, atol=1e-9)
        opt.add_noise()
        noise = torch.cat([(p.grad - sg).flatten() for p, sg in zip(params, summed, strict=True)])
    n = noise.numel()
    std = float(noise.std())
    # The sample std of n normals has relative standard error ~ 1/sqrt(2n): 6 sigma of it.
    assert abs(std / (sigma * c) - 1) < 6 / math.sqrt(2 * n), (std, sigma * c, n)
    assert abs(float(noise.mean())) < 6 * sigma * c / math.sqrt(n)


def test_a_dp_step_changes_the_payload_by_the_noised_mean(monkeypatch):
    """End to end through engine.step: an empty Poisson batch moves the payload by noise alone."""
    cfg, s = _dp_setup("bert", "prompt", "none", train__lr=0.1)
    plan = privacy.SamplePlan(sigma=1.0, q=0.1, expected_batch=4)
    before = {k: v.detach().clone() for k, v in s.model.trainable().items()}
    with privacy.per_example_gradients(s.model):
        engine = make_engine(s.model, cfg, 4, dp=plan)
        train_steps(engine, s.task, s.train, cfg, steps=2, stream=iter([[], [0, 3, 5]]), pad_id=s.pad_id, device=s.backbone.device, private=True)
        # Nothing of a step's per-example state is left to leak into the next step.
        assert all(getattr(p, "grad_sample", None) is None and getattr(p, "summed_grad", None) is None for p in s.model.trainable().values())
    after = s.model.trainable()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_epsilon_equals_opacus_accountant_stepped_independently(tmp_path):
    sigma, q, delta = 1.1, 0.05, 1e-5
    ledger = privacy.Ledger.open(tmp_path / "ledger.json")
    reference = RDPAccountant()
    eps = []
    for _ in range(3):  # three rounds of 7 steps
        ledger.record(sigma, q, 7)
        for _ in range(7):
            reference.step(noise_multiplier=sigma, sample_rate=q)
        eps.append(ledger.epsilon(delta))
        assert eps[-1] == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    assert eps[0] < eps[1] < eps[2]
    # A restarted client opens the same file and continues from there.
    again = privacy.Ledger.open(tmp_path / "ledger.json")
    assert again.steps == 21 and again.epsilon(delta) == pytest.approx(eps[-1], rel=1e-12)
    again.record(sigma, q, 7)
    assert again.epsilon(delta) > eps[-1]


def test_stack_sanity_point():
    """RDP sanity point: q 0.125, sigma 1.0, 4 steps -> epsilon 3.17 at delta 1e-5 (RDP)."""
    assert privacy.epsilon([(1.0, 0.125, 4)], 1e-5) == pytest.approx(3.17, abs=0.01)


def test_target_epsilon_is_solved_and_unreachable_ones_refused():
    cfg = tiny_config("bert", "prompt", privacy__mode="sample", privacy__target_epsilon=3.0)
    plan = privacy.plan(cfg, n=400, planned_steps=100)
    assert plan.q == 4 / 400
    eps = privacy.epsilon([(plan.sigma, plan.q, 100)], cfg.privacy.delta)
    assert 2.9 < eps <= 3.0
    tight = tiny_config("bert", "prompt", privacy__mode="sample", privacy__target_epsilon=0.01)
    with pytest.raises(privacy.PrivacyError, match="target_epsilon"):
        privacy.plan(tight, n=40, planned_steps=1000)
    with pytest.raises(privacy.PrivacyError, match="too few"):
        privacy.plan(cfg, n=6, planned_steps=10)


def test_unreadable_ledger_is_refused_not_reset(tmp_path):
    f = tmp_path / "ledger.json"
    f.write_text("{not json")
    with pytest.raises(privacy.PrivacyError, match="under-report"):
        privacy.Ledger.open(f)


def test_a_trainable_raw_parameter_is_refused():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.soft = torch.nn.Parameter(torch.zeros(3, 4))
            self.head = torch.nn.Linear(4, 2)

    with pytest.raises(privacy.PrivacyError, match="soft"):
        privacy.check_model(Wrapper())


def test_prv_accountant_matches_opacus_and_is_tighter_than_rdp(tmp_path):
    from opacus.accountants import PRVAccountant

    sigma, q, delta = 1.0, 0.1, 1e-5
    ledger = privacy.Ledger.open(tmp_path / "prv.json", "prv")
    ledger.record(sigma, q, 50)
    reference = PRVAccountant()
    for _ in range(50):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    assert privacy.Ledger.open(tmp_path / "prv.json").accountant == "prv"  # the kind is kept on disk
    assert ledger.epsilon(delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-3)
    assert ledger.epsilon(delta) < privacy.epsilon([(sigma, q, 50)], delta, "rdp")
