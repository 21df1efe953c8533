"""federation.lora_aggregation: the closed forms on small matrices through the server's own
aggregation step, the refusals, and both choices through the round loop on a tiny LoRA model."""

from __future__ import annotations

import numpy as np
import pytest

from fedprompt.config import ConfigError, load_config
from fedprompt.lora_aggregation import LORA_AGGREGATIONS, product_factors, reply_manifest, truncate
from fedprompt.payload import PayloadError, manifest_from, validate
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


def test_mixed_ranks_svd_is_the_best_rank_r_of_the_mean_at_the_global_scale():
    """Replies of ranks 2, 4 and 8 under a rank-8 global: each product counts R / r times
    (peft scales it by alpha / r, the global by alpha / R), then the best rank-8 factors."""
    rng = np.random.default_rng(3)
    reps = [{B: rng.normal(size=(12, r)), A: rng.normal(size=(r, 10)), "head": rng.normal(size=(3,))} for r in (2, 4, 8)]
    reps = [{k: v.astype(np.float32) for k, v in t.items()} for t in reps]
    weights = [10, 30, 60]
    cfg = load_config(None, ["peft.method=lora", "federation.lora_aggregation=svd", "federation.num_clients=3"])
    glob = {B: np.zeros((12, 8), np.float32), A: rng.normal(size=(8, 10)).astype(np.float32), "head": np.zeros(3, np.float32)}
    new = _aggregate(cfg, glob, [_reply(i, t, w) for i, (t, w) in enumerate(zip(reps, weights, strict=True))])
    exact = sum(w * (8 / t[A].shape[0]) * t[B].astype(np.float64) @ t[A] for t, w in zip(reps, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(new[B].astype(np.float64) @ new[A], _best_rank(exact, 8), atol=1e-4)
    np.testing.assert_allclose(new["head"], sum(w * t["head"] for t, w in zip(reps, weights, strict=True)) / 100, rtol=1e-5)
    assert new[A].shape == (8, 10) and new[B].shape == (12, 8)


def test_a_lower_rank_client_starts_from_the_globals_best_rank_r_update():
    """truncate: at peft's alpha / r, the rank-r client's update is the global's best rank-r
    approximation at alpha / R (the SVD orders the components)."""
    rng = np.random.default_rng(4)
    bs, as_ = [rng.normal(size=(12, 8)) for _ in range(3)], [rng.normal(size=(8, 10)) for _ in range(3)]
    b, a = product_factors(bs, as_, [1.0, 1.0, 1.0], 8)
    alpha = 16.0
    for r in (2, 5, 8):
        t = truncate({B: b, A: a, "head": np.ones(3)}, r)
        assert t[A].shape == (r, 10) and t[B].shape == (12, r) and np.array_equal(t["head"], np.ones(3))
        np.testing.assert_allclose(alpha / r * t[B].astype(np.float64) @ t[A], alpha / 8 * _best_rank(b.astype(np.float64) @ a, r), atol=1e-4)


def test_replies_are_validated_at_their_own_rank_and_a_wrong_rank_is_named():
    def at(r: int, r2: int | None = None) -> dict:
        r2 = r if r2 is None else r2
        shapes = {B: (12, r), A: (r, 10), "m2.lora_A.weight": (r2, 6), "m2.lora_B.weight": (5, r2)}
        return {k: np.zeros(v, np.float32) for k, v in shapes.items()}

    manifest = manifest_from(at(8))

    for r in (1, 4, 8):  # any rank up to the global's, under svd
        validate(at(r), reply_manifest(at(r), manifest, mixed=True, source="node 7"), source="node 7")
    with pytest.raises(PayloadError, match="node 7: LoRA rank 12 is above this federation's largest rank 8"):
        reply_manifest(at(12), manifest, mixed=True, source="node 7")
    with pytest.raises(PayloadError, match=r"tensor 'm2.lora_A.weight' has shape \(2, 6\), expected \(4, 6\)"):  # one rank per reply
        validate(at(4, 2), reply_manifest(at(4, 2), manifest, mixed=True, source="node 7"), source="node 7")
    with pytest.raises(PayloadError, match="node 7: LoRA rank 4 .*this federation's is 8; clients of other ranks need federation.lora_aggregation 'svd'"):
        reply_manifest(at(4), manifest, mixed=False, source="node 7")


@pytest.mark.parametrize(
    "sets,words",
    [
        (["peft.method=lora", "federation.lora_ranks=[4, 8]"], "only peft.method 'lora' with federation.lora_aggregation 'svd'"),
        (["peft.method=lora", "federation.lora_aggregation=svd", "federation.lora_ranks=[4, 16]"], "set peft.lora_r to 16"),
        (["peft.method=lora", "federation.lora_aggregation=svd", "federation.lora_ranks=[4, 8]", "federation.strategy=krum"], "use fedavg or fedprox"),
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

    cfgs = {agg: federation_config(peft__method="lora", federation__lora_aggregation=agg, federation__rounds=2) for agg in ("ffa", "factors")}
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
    # `fedprompt eval` (run_eval) of the export: with the run's own config (A from the file, not
    # the payload), and with a rank-2 svd client's config (evaluated at the file's rank 4).
    from fedprompt.run import run_eval
    from tests.tiny import federation_config

    assert 0 <= run_eval(ffa.cfg, tmp_path / "ffa" / "adapter")["accuracy"] <= 1
    rank2 = federation_config(peft__method="lora", federation__lora_aggregation="svd", peft__lora_r=2)
    assert 0 <= run_eval(rank2, tmp_path / "ffa" / "adapter")["accuracy"] <= 1
    # Under ffa another rank is refused, with one message wherever the rank came from.
    from fedprompt.errors import UserError

    ffa2 = federation_config(peft__method="lora", federation__lora_aggregation="ffa", peft__lora_r=2)
    with pytest.raises(UserError, match="adapter_model.safetensors': LoRA rank 4; federation.lora_aggregation 'ffa' keeps every client at one rank"):
        run_eval(ffa2, tmp_path / "ffa" / "adapter")
    with pytest.raises(UserError, match="payload from the server: LoRA rank 2; .* set peft.lora_r=2"):
        ffa.initial_payload(2)


def test_clients_of_any_rank_agree_on_the_seeded_adapter_at_the_globals_rank():
    """Round 0: a rank-2 client answers the rank-8 seeded adapter bit for bit as a rank-8 one
    (each rank's A seeded from the run's seed and the rank alone), and goes back to its own."""
    from fedprompt.local import LocalClient
    from fedprompt.payload import digest
    from tests.tiny import federation_config

    small = LocalClient(federation_config(peft__method="lora", peft__lora_r=2))
    big = LocalClient(federation_config(peft__method="lora", peft__lora_r=8))
    assert digest(small.initial_payload(8)) == digest(big.initial_payload()) != digest(small.initial_payload())
    assert '"r": 8' in small.adapter_config_json(8) and small.state.model.rank == 8
    assert small.rank_for(0) == 2 and {s.shape for s in small.manifest if ".lora_A." in s.name} == {(2, 64)}


def test_mixed_ranks_through_the_round_loop_export_the_global_at_the_largest_rank(tmp_path, capsys):
    """A simulation's virtual clients at lora_ranks [2, 4] and a client of its own peft.lora_r
    2 (as a deployment client sets it) in one svd federation: round 0 agreed across ranks, each
    trains and replies at its own rank, the exported rank-4 adapter loads with peft."""
    import json

    from peft import PeftModel

    from fedprompt.backbone import load_backbone
    from fedprompt.local import LocalClient
    from fedprompt.report import read_jsonl
    from fedprompt.server.app import serve
    from tests.fakegrid import FakeGrid, client_responder
    from tests.tiny import federation_config

    sets = {"peft__method": "lora", "federation__lora_aggregation": "svd", "federation__rounds": 2}
    mixed = LocalClient(federation_config(**sets, federation__lora_ranks=[2, 4]), num_partitions=3)
    own = LocalClient(federation_config(**sets, peft__lora_r=2), num_partitions=3)
    sent: list[tuple[int, int]] = []

    def recorded(client, pid):
        answer = client_responder(client, pid)

        def respond(msg):
            rep = answer(msg)
            if msg.metadata.message_type == "train" and not rep.has_error():
                sent.append((pid, next(v.shape[0] for k, v in rep.content["arrays"].items() if ".lora_A." in k)))
            return rep

        return respond

    out = tmp_path / "mixed"
    out.mkdir()
    (out / "config.yaml").write_text(mixed.cfg.to_yaml())
    serve(FakeGrid({101: recorded(mixed, 0), 102: recorded(mixed, 1), 103: recorded(own, 2)}), mixed.cfg, out, centralized=False)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["digest"] != rows[1]["digest"]
    assert all(np.isfinite(r["accuracy"]) for r in rows) and rows[2]["train_loss"] < rows[1]["train_loss"] * 1.5  # no blow-up from the re-factoring
    assert all(r.get("screened_out", 0) == 0 and not any(r.get("rejected", {}).values()) for r in rows[1:])
    assert "answered a different initial payload" not in capsys.readouterr().out  # round 0 agreed across ranks
    assert sorted(set(sent)) == [(0, 2), (1, 4), (2, 2)]  # partition 0: ranks[0], 1: ranks[1], the rank-2 client
    # Round 1 sends everyone the rank-4 global; from round 2 a rank-2 client gets it at its rank.
    assert rows[1]["bytes_down_min"] == rows[1]["bytes_down"] and rows[2]["bytes_down_min"] < 0.8 * rows[2]["bytes_down"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    bb = load_backbone(mixed.cfg.model, num_labels=len(mixed.state.data.labels), task=mixed.state.data.task)
    pm = PeftModel.from_pretrained(bb.model, str(out / "adapter"))
    assert {tuple(p.shape) for k, p in pm.named_parameters() if ".lora_A." in k} == {(4, 64)}


@pytest.mark.parametrize("command", ["client", "server"])
def test_deployment_refuses_lora_ranks_and_names_peft_lora_r(command, capsys):
    from fedprompt.cli import main

    sets = ["peft.method=lora", "peft.lora_r=8", "federation.lora_aggregation=svd", "federation.lora_ranks=[4, 8]"]
    assert main([command, "--insecure", *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert f"`fedprompt {command}` refuses it: in a deployment each client sets its own peft.lora_r" in err and err.count("\n") == 1
