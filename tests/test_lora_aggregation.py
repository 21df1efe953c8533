"""federation.lora_aggregation: the closed forms on small matrices through the server's own
aggregation step, the refusals, and both choices through the round loop on a tiny LoRA model."""

from __future__ import annotations

import numpy as np
import pytest

from fedprompt.config import ConfigError, load_config
from fedprompt.lora_aggregation import LORA_AGGREGATIONS, product_factors
from tests.test_robust import _aggregate, _reply

A, B = "m.lora_A.weight", "m.lora_B.weight"


def _lora_replies(rng, n: int, r: int, d_out: int, d_in: int, shared_a: bool):
    a0 = rng.normal(size=(r, d_in)).astype(np.float32)
    out = []
    for _ in range(n):
        t = {B: rng.normal(size=(d_out, r)).astype(np.float32), "head": rng.normal(size=(3,)).astype(np.float32)}
        if not shared_a:
            t[A] = rng.normal(size=(r, d_in)).astype(np.float32)
        out.append(t)
    return a0, out


def _best_rank(m: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_svd_gives_the_best_rank_r_factors_of_the_weighted_mean_product():
    rng = np.random.default_rng(0)
    _, reps = _lora_replies(rng, 3, 4, 12, 10, shared_a=False)
    weights = [10, 30, 60]
    cfg = load_config(None, ["peft.method=lora", "federation.lora_aggregation=svd", "federation.num_clients=3"])
    glob = {k: np.zeros_like(v) for k, v in reps[0].items()}
    new = _aggregate(cfg, glob, [_reply(i, t, w) for i, (t, w) in enumerate(zip(reps, weights, strict=True))])
    exact = sum(w * t[B].astype(np.float64) @ t[A] for t, w in zip(reps, weights, strict=True)) / sum(weights)
    got = new[B].astype(np.float64) @ new[A]
    np.testing.assert_allclose(got, _best_rank(exact, 4), atol=1e-5)
    assert np.linalg.norm(got - exact) > 0.1  # rank 4 of a rank-12 sum: the truncation is real
    # Not what the mean of the factors gives, and the head is the strategy's weighted mean.
    mean_f = sum(w * t[B] for t, w in zip(reps, weights, strict=True)) / 100 @ (sum(w * t[A] for t, w in zip(reps, weights, strict=True)) / 100)
    assert np.linalg.norm(mean_f - _best_rank(exact, 4)) > 1.0
    np.testing.assert_allclose(new["head"], sum(w * t["head"] for t, w in zip(reps, weights, strict=True)) / 100, rtol=1e-5)
    assert new[A].dtype == np.float32 and new[A].shape == (4, 10) and new[B].shape == (12, 4)


def test_svd_of_one_client_or_of_a_low_rank_sum_is_exact():
    rng = np.random.default_rng(1)
    b, a = rng.normal(size=(9, 3)), rng.normal(size=(3, 7))
    b2, a2 = product_factors([b], [a], [5.0], 3)
    np.testing.assert_allclose(b2 @ a2, b @ a, atol=1e-5)
    # A rank-6 request of a sum of rank at most 2 x 1: exact, the extra components are zeros.
    b1, a1 = rng.normal(size=(9, 1)), rng.normal(size=(1, 7))
    b3, a3 = product_factors([b1, 2 * b1], [a1, a1], [1.0, 1.0], 6)
    np.testing.assert_allclose(b3 @ a3, 1.5 * b1 @ a1, atol=1e-5)
    assert b3.shape == (9, 6) and np.allclose(b3[:, 1:], 0, atol=1e-6)


def test_ffa_mean_of_b_is_the_exact_mean_product_and_factors_is_not():
    rng = np.random.default_rng(2)
    a0, reps = _lora_replies(rng, 4, 4, 12, 10, shared_a=True)
    weights = [5, 5, 10, 20]
    cfg = load_config(None, ["peft.method=lora", "federation.lora_aggregation=ffa", "federation.num_clients=4"])
    glob = {k: np.zeros_like(v) for k, v in reps[0].items()}
    new = _aggregate(cfg, glob, [_reply(i, t, w) for i, (t, w) in enumerate(zip(reps, weights, strict=True))])
    exact = sum(w * t[B].astype(np.float64) @ a0 for t, w in zip(reps, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(new[B].astype(np.float64) @ a0, exact, atol=1e-5)
    # factors with the clients' own A: the mean of the factors misses the mean product.
    _, with_a = _lora_replies(rng, 4, 4, 12, 10, shared_a=False)
    plain = load_config(None, ["peft.method=lora", "federation.num_clients=4"])
    glob = {k: np.zeros_like(v) for k, v in with_a[0].items()}
    f = _aggregate(plain, glob, [_reply(i, t, w) for i, (t, w) in enumerate(zip(with_a, weights, strict=True))])
    exact = sum(w * t[B].astype(np.float64) @ t[A] for t, w in zip(with_a, weights, strict=True)) / sum(weights)
    assert np.linalg.norm(f[B] @ f[A] - exact) > 0.5 * np.linalg.norm(exact)


@pytest.mark.parametrize(
    "sets,words",
    [
        (["peft.method=prompt", "federation.lora_aggregation=ffa"], "applies to peft.method 'lora'"),
        (["peft.method=lora", "federation.lora_aggregation=svd", "federation.strategy=fedadam"], "use fedavg, fedprox, krum or multikrum"),
        (["peft.method=lora", "federation.lora_aggregation=svd", "federation.strategy=fedmedian"], "'svd' with federation.strategy 'fedmedian'"),
        (["peft.method=lora", "federation.lora_aggregation=svd", "privacy.mode=client"], "use lora_aggregation 'ffa' or 'factors'"),
        (["peft.method=lora", "federation.lora_aggregation=mean"], "federation.lora_aggregation"),
        (["peft.method=lora", "federation.lora_aggregation=ffa", "federation.initial_adapter=x"], "never receive the adapter's"),
    ],
)
def test_settings_that_cannot_work_are_refused_with_the_way_out(sets, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, sets)


def test_the_config_choices_are_the_registry():
    from typing import get_args, get_type_hints

    from fedprompt.config.schema import FederationConfig

    assert set(get_args(get_type_hints(FederationConfig)["lora_aggregation"])) == set(LORA_AGGREGATIONS)


# ---- through the round loop: real LocalClients on a tiny LoRA model, an in-process grid ----


@pytest.fixture(scope="module")
def lora_clients():
    from fedprompt.local import LocalClient
    from tests.tiny import federation_config

    cfgs = {agg: federation_config(peft__method="lora", federation__lora_aggregation=agg, federation__rounds=2) for agg in LORA_AGGREGATIONS}
    return {agg: LocalClient(cfg, num_partitions=3) for agg, cfg in cfgs.items()}


def _serve(client, out):
    from fedprompt.report import read_jsonl
    from fedprompt.server.app import serve
    from tests.fakegrid import FakeGrid, client_responder

    out.mkdir()
    (out / "config.yaml").write_text(client.cfg.to_yaml())
    serve(FakeGrid({101 + i: client_responder(client, i) for i in range(3)}), client.cfg, out, centralized=False)
    return read_jsonl(out / "metrics.jsonl")


def test_ffa_trains_and_sends_b_only_and_exports_a_complete_adapter(tmp_path, lora_clients):
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file

    from fedprompt.backbone import load_backbone

    ffa, factors = lora_clients["ffa"], lora_clients["factors"]
    fixed = {k: v.numpy() for k, v in ffa.fixed_payload().items()}
    assert fixed and all(".lora_A." in k for k in fixed) and not any(".lora_A." in s.name for s in ffa.manifest)
    assert {s.name for s in factors.manifest} == {s.name for s in ffa.manifest} | set(fixed)
    rows = {agg: _serve(lora_clients[agg], tmp_path / agg) for agg in ("ffa", "factors")}
    lora_bytes = sum(v.nbytes for v in fixed.values())  # A's bytes: what ffa no longer sends
    assert rows["ffa"][1]["bytes_up"] <= rows["factors"][1]["bytes_up"] - 0.9 * lora_bytes
    # A never moved on the client; the exported adapter holds it, and peft loads it complete.
    assert all(np.array_equal(v.detach().numpy(), fixed[k]) for k, v in ffa.state.model.fixed().items())
    saved = load_file(str(tmp_path / "ffa" / "adapter" / "adapter_model.safetensors"))
    assert all(np.array_equal(saved[k], v) for k, v in fixed.items()) and set(saved) == set(fixed) | {s.name for s in ffa.manifest}
    bb = load_backbone(ffa.cfg.model, num_labels=len(ffa.state.data.labels), task=ffa.state.data.task)
    pm = PeftModel.from_pretrained(bb.model, str(tmp_path / "ffa" / "adapter"))
    live = {k: p for k, p in pm.named_parameters() if ".lora_A." in k}
    assert len(live) == len(fixed) and all(torch.equal(p.detach(), torch.from_numpy(fixed[k.replace(".default.", ".")])) for k, p in live.items())


def test_svd_round_loop_keeps_the_lora_shapes_and_learns(tmp_path, lora_clients):
    rows = _serve(lora_clients["svd"], tmp_path / "svd")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["digest"] != rows[1]["digest"]
    assert all(np.isfinite(r["accuracy"]) for r in rows)
    assert rows[2]["train_loss"] < rows[1]["train_loss"] * 1.5  # no blow-up from the re-factoring
