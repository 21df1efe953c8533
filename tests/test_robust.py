"""Broken and hostile updates: payload validation (property-based), screening and norm bounding
(fedprompt/server/robust.py), robust strategies against poisoned updates on synthetic
vectors, and the round loop with hostile clients on a tiny model (in-process grid)."""

from __future__ import annotations

import math
import reprlib

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedprompt import payload
from fedprompt.config import ConfigError, load_config
from fedprompt.server import robust
from fedprompt.server import strategies as fs
from fedprompt.wire import from_record, to_record

# ---- payload.validate: exact matches pass, anything else is a PayloadError naming the tensor ----

WIRE_DTYPES = ["float32", "int64"]
OTHER_DTYPES = ["float64", "float16", "bfloat16", "int32", "int64", "float32", "bool", "uint8"]
names = st.text(min_size=1, max_size=6)
shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
manifests = st.lists(st.tuples(names, shapes, st.sampled_from(WIRE_DTYPES)), min_size=1, max_size=4, unique_by=lambda s: s[0]).map(
    lambda specs: tuple(payload.TensorSpec(*s) for s in specs)
)


def _exact(spec: payload.TensorSpec, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(spec.shape, generator=g) * 3).to(getattr(torch, spec.dtype))


@st.composite
def payloads(draw):
    """(manifest, payload, the names the payload gets wrong): an exact payload, then random damage."""
    manifest = draw(manifests)
    tensors: dict = {s.name: _exact(s, i) for i, s in enumerate(manifest)}
    bad: set = set()
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["missing", "extra", "shape", "dtype", "nonfinite", "not a tensor"]))
        if kind == "extra":  # any hashable a deserializer could produce as a key
            key = draw(st.one_of(names, st.integers(), st.none(), st.booleans()))
            if key not in tensors and key not in {s.name for s in manifest}:
                tensors[key] = torch.zeros(draw(shapes))
                bad.add(key)
            continue
        name = draw(st.sampled_from([s.name for s in manifest]))
        spec = next(s for s in manifest if s.name == name)
        if name in bad:  # damage each tensor once
            continue
        t = tensors[name]
        if kind == "missing":
            del tensors[name]
            bad.add(name)
        elif kind == "shape":
            shape = draw(shapes)
            if shape != spec.shape:
                tensors[name] = torch.zeros(shape, dtype=t.dtype)
                bad.add(name)
        elif kind == "dtype":
            dtype = draw(st.sampled_from(OTHER_DTYPES))
            if dtype != spec.dtype:
                tensors[name] = t.to(getattr(torch, dtype))
                bad.add(name)
        elif kind == "nonfinite" and t.is_floating_point() and t.numel():
            t = t.clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            tensors[name] = t
            bad.add(name)
        elif kind == "not a tensor":
            tensors[name] = draw(st.sampled_from([t.tolist(), None, "x", 1.0]))
            bad.add(name)
    return manifest, tensors, bad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=payloads(), source=st.sampled_from(["node 7", "server (round 3)", "aggregate of round 2"]))
def test_validate_accepts_exactly_the_manifest_and_names_what_is_wrong(case, source):
    manifest, tensors, bad = case
    try:
        payload.validate(tensors, manifest, source=source)
    except payload.PayloadError as e:
        msg = str(e)
        assert bad, f"an exact payload was refused: {msg}"
        assert msg.startswith(f"payload from {source}: ") and "\n" not in msg
        assert any(repr(k) in msg or reprlib.repr(k) in msg for k in bad), (msg, bad)  # long hostile keys are shortened
        return
    assert not bad, f"accepted a payload with wrong {sorted(map(repr, bad))}"


@settings(max_examples=100, deadline=None)
@given(case=payloads())
def test_numpy_and_torch_payloads_are_judged_and_hashed_alike(case):
    """The server checks and hashes numpy arrays (it never imports torch), a client torch
    tensors: the same verdict and the same digest for the same content."""
    manifest, tensors, _ = case
    as_numpy = {k: (v.numpy() if isinstance(v, torch.Tensor) and v.dtype != torch.bfloat16 else v) for k, v in tensors.items()}
    verdicts = []
    for t in (tensors, as_numpy):
        try:
            payload.validate(t, manifest, source="node 1")
            verdicts.append("ok")
        except payload.PayloadError as e:
            verdicts.append(str(e))
    assert verdicts[0] == verdicts[1]
    if verdicts[0] == "ok":
        assert payload.digest(tensors) == payload.digest(as_numpy)
        assert payload.manifest_from(tensors) == payload.manifest_from(as_numpy) == tuple(sorted(manifest, key=lambda s: s.name))


@given(thing=st.one_of(st.none(), st.lists(st.integers()), st.text(), st.integers()))
def test_validate_refuses_what_is_not_a_mapping(thing):
    with pytest.raises(payload.PayloadError, match=r"payload from node 1: expected a mapping"):
        payload.validate(thing, (payload.TensorSpec("a", (1,), "float32"),), source="node 1")


# ---- robust.py: norms, bounding, screening ----

arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=6), elements=st.floats(-1e4, 1e4, width=32))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), limit=st.floats(1e-6, 1e3))
def test_bounding_makes_the_update_norm_at_most_the_bound(data, limit):
    g = data.draw(arrays)
    r = data.draw(hnp.arrays(np.float32, g.shape, elements=st.floats(-1e4, 1e4, width=32)))
    glob, reply = {"a": g, "b": g[:1].copy()}, {"a": r, "b": g[:1] + np.float32(1)}
    out, before = robust.bound(glob, reply, limit)
    assert before == pytest.approx(robust.update_norm(glob, reply))
    assert robust.update_norm(glob, out) <= limit
    assert all(out[k].dtype == reply[k].dtype and out[k].shape == reply[k].shape for k in reply)
    if before <= limit:
        assert out is reply  # short updates pass untouched


def test_bounding_keeps_the_direction_and_reaches_the_bound():
    rng = np.random.default_rng(0)
    glob = {"p": rng.normal(size=(4, 8)).astype(np.float32)}
    delta = rng.normal(size=(4, 8)).astype(np.float32)
    reply = {"p": glob["p"] + 50 * delta}
    out, before = robust.bound(glob, reply, 2.0)
    new = out["p"].astype(np.float64) - glob["p"]
    assert before == pytest.approx(50 * np.linalg.norm(delta), rel=1e-5)
    assert robust.update_norm(glob, out) == pytest.approx(2.0, rel=1e-5)
    cos = float(np.dot(new.ravel(), delta.ravel()) / (np.linalg.norm(new) * np.linalg.norm(delta)))
    assert cos > 0.99999


def test_screening_rejects_an_absurd_update_and_keeps_honest_ones():
    honest = [1.0, 1.3, 0.8, 1.1, 0.9, 1.2, 1.05]
    verdicts = robust.screen([*honest, 1000.0], 10.0)
    assert verdicts[:-1] == [None] * 7
    assert "update norm 1000 exceeds 10 x the round's median update norm" in verdicts[-1]
    assert robust.screen([1.0, 1000.0], 10.0) == [None, None]  # two replies: no majority to trust
    assert robust.screen([0.0, 0.0, 5.0], 10.0) == [None] * 3  # no scale to compare with
    assert robust.screen([1.0, 1.0, 1000.0], 0.0) == [None] * 3  # off


@settings(max_examples=200, deadline=None)
@given(norms=st.lists(st.floats(0, 1e6), min_size=3, max_size=12), factor=st.floats(1.01, 100))
def test_screening_never_rejects_half_or_more(norms, factor):
    rejected = [n for n, v in zip(norms, robust.screen(norms, factor)) if v]
    assert len(rejected) < (len(norms) + 1) / 2
    assert all(n > float(np.median(norms)) for n in rejected)


def test_the_scale_attack_is_global_plus_scale_times_the_update():
    glob = {"p": np.array([1.0, 2.0], np.float32), "i": np.array([3], np.int64)}
    local = {"p": np.array([1.5, 1.0], np.float32), "i": np.array([3], np.int64)}
    out = robust.scale_update(glob, local, -10.0)
    np.testing.assert_allclose(out["p"], [-4.0, 12.0])
    assert out["p"].dtype == np.float32 and out["i"] is local["i"]


# ---- robust strategies against 2 of 8 updates scaled by -10, on synthetic vectors ----


def _reply(node: int, tensors: dict, examples: int = 10) -> Message:
    from tests.fakegrid import _identity

    _identity()
    msg = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
    content = RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord({"num-examples": examples, "uniform-weight": 1})})
    return Message(content=content, reply_to=msg)


def _poisoned_round(seed: int = 0):
    """Global payload, 8 replies (nodes 0..7; 6 and 7 send global - 10 x their honest update),
    and the honest direction."""
    rng = np.random.default_rng(seed)
    glob = {"prompt": rng.normal(size=(4, 16)).astype(np.float32), "head": rng.normal(size=(8,)).astype(np.float32)}
    true = {k: rng.normal(size=v.shape) * 0.1 for k, v in glob.items()}
    replies = []
    for node in range(8):
        honest = {k: (glob[k] + true[k] + rng.normal(size=v.shape) * 0.05).astype(np.float32) for k, v in glob.items()}
        replies.append(_reply(node, robust.scale_update(glob, honest, -10.0) if node >= 6 else honest))
    return glob, replies, true


def _cosine(glob: dict, new: dict, true: dict) -> float:
    a = np.concatenate([(new[k].astype(np.float64) - glob[k]).ravel() for k in glob])
    b = np.concatenate([true[k].ravel() for k in glob])
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _aggregate(cfg, glob, replies, strategy=None) -> dict:
    """The round loop's aggregation step (Krum's choice, the strategy, the finiteness check)."""
    from fedprompt.checkpoint import ServerState
    from fedprompt.server.aggregate import aggregate

    state = ServerState(round=0, tensors=glob)
    manifest = payload.manifest_from({k: torch.from_numpy(v) for k, v in glob.items()})
    tensors, _, _ = aggregate(cfg, strategy or fs.make_strategy(cfg), 1, state, replies, manifest)
    return tensors


@pytest.mark.parametrize(
    "sets",
    [
        ["federation.strategy=fedmedian"],
        ["federation.strategy=trimmedmean", "federation.trim_fraction=0.25", "federation.num_malicious=2"],
        ["federation.strategy=krum", "federation.num_malicious=2"],
        ["federation.strategy=multikrum", "federation.num_malicious=2"],
    ],
    ids=lambda s: s[0].split("=")[1],
)
def test_robust_strategies_resist_two_of_eight_scaled_updates(sets):
    cfg = load_config(None, ["federation.num_clients=8", "federation.fraction_fit=1.0", *sets])
    glob, replies, true = _poisoned_round()
    assert _cosine(glob, _aggregate(cfg, glob, replies), true) > 0.8  # Krum: one honest update, noise and all
    plain = load_config(None, ["federation.num_clients=8", "federation.fraction_fit=1.0"])
    glob, replies, true = _poisoned_round()  # FedMedian and FedTrimmedAvg pop the replies' arrays
    assert _cosine(glob, _aggregate(plain, glob, replies), true) < -0.5  # FedAvg goes the wrong way


def test_norm_bounding_keeps_fedavg_on_course(capsys):
    from fedprompt.server.aggregate import screen_and_bound as _screen_and_bound

    glob, replies, true = _poisoned_round()
    honest = sorted(robust.update_norm(glob, from_record(r.content["arrays"])) for r in replies[:6])
    cfg = load_config(None, ["federation.num_clients=8", f"federation.norm_bound={honest[3]}", "federation.reject_norm_factor=0"])
    problems: list[str] = []
    kept, row = _screen_and_bound(cfg, 4, glob, replies, problems)
    assert len(kept) == 8 and not problems and row["bounded"] >= 2 and row["screened_out"] == 0
    out = capsys.readouterr().out
    assert "round 4: node 6: update norm" in out and f"bounded to {honest[3]:g}" in out
    for r in kept:
        assert robust.update_norm(glob, from_record(r.content["arrays"])) <= honest[3]
        assert list(r.content["arrays"].keys()) == list(glob)  # Flower's DP clipping pairs by position
    assert _cosine(glob, _aggregate(cfg, glob, kept), true) > 0.5


def test_screening_in_the_round_rejects_absurd_updates_with_node_and_reason():
    from fedprompt.server.aggregate import screen_and_bound as _screen_and_bound

    glob, replies, _ = _poisoned_round()
    honest = from_record(replies[0].content["arrays"])
    replies[6] = _reply(6, honest)
    replies[7] = _reply(7, robust.scale_update(glob, honest, 1000.0))
    cfg = load_config(None, ["federation.num_clients=8"])  # the default factor, 10
    problems: list[str] = []
    kept, row = _screen_and_bound(cfg, 1, glob, replies, problems)
    assert [r.metadata.src_node_id for r in kept] == list(range(7))
    assert len(problems) == 1 and problems[0].startswith("rejected: node 7: update norm ")
    assert row["screened_out"] == 1 and row["update_norm_median"] > 0
    # Under client-level DP nothing is screened: rejecting would change the m the noise is sized for.
    dp = load_config(None, ["federation.num_clients=8", "privacy.mode=client", "privacy.delta=1e-5"])
    assert len(_screen_and_bound(dp, 1, glob, replies, [])[0]) == 8


# ---- config refusals ----


def _refused(sets: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert len(e.value.problems) == 1
    return e.value.problems[0]


def test_config_refuses_unsound_robust_settings():
    line = _refused(["federation.strategy=krum", "federation.num_malicious=2", "federation.num_clients=8", "federation.fraction_fit=0.5"])
    assert line.startswith("federation.strategy: 'krum' with federation.num_malicious 2 needs more than 6 clients per round, 4 are sampled")
    load_config(None, ["federation.strategy=krum", "federation.num_malicious=2", "federation.num_clients=8", "federation.fraction_fit=1"])
    assert "needs more than 2 clients" in _refused(["federation.strategy=multikrum", "federation.num_clients=2"])
    assert _refused(["federation.strategy=trimmedmean", "federation.num_malicious=2"]).startswith(
        "federation.trim_fraction: 0.2 cuts 1 of 8 sampled updates from each end, fewer than federation.num_malicious (2)"
    )
    assert _refused(["privacy.mode=client", "federation.norm_bound=0.5"]).startswith(
        "federation.norm_bound: 0.5 with privacy.mode 'client': the DP wrapper already clips"
    )
    assert _refused(["privacy.mode=client", "federation.strategy=krum"]).startswith("federation.strategy: 'krum' with privacy.mode")
    assert _refused(["federation.norm_bound=-1"]).startswith("federation.norm_bound: -1.0 must be >= 0")
    assert _refused(["federation.reject_norm_factor=0.5"]).startswith("federation.reject_norm_factor: 0.5 is out of range")
    assert _refused(["attack.clients=9"]).startswith("attack.clients: 9 is out of range; allowed 0..7")
    assert _refused(["attack.kind=noise"]).startswith("attack.kind: 'noise' is not allowed")


@pytest.mark.parametrize("command", ["client", "server"])
def test_deployment_refuses_an_attack(command, capsys):
    from fedprompt.cli import main

    assert main([command, "--insecure", "--set", "attack.clients=1"]) == 2
    err = capsys.readouterr().err
    assert f"attack.clients: 1 poisons updates, a simulation-only research setting; `fedprompt {command}` refuses it" in err


def test_krum_scores_tiny_updates_of_a_large_payload_exactly():
    """Updates of ~1e-3 on a 20 x 384 prompt of unit scale: Flower's Krum (float32, on the raw
    parameters) sees mostly rounding; ours works on the updates in float64 and finds the two
    replies that went their own way, however small."""
    rng = np.random.default_rng(1)
    glob = {"prompt": rng.normal(size=(20, 384)).astype(np.float32)}
    step = rng.normal(size=(20, 384)) * 1e-3
    replies = [{"prompt": (glob["prompt"] + step + rng.normal(size=(20, 384)) * 1e-4).astype(np.float32)} for _ in range(6)]
    replies += [{"prompt": (glob["prompt"] - step).astype(np.float32)} for _ in range(2)]  # sign-flipped, honest length
    assert robust.krum_select(glob, replies, 2, 6) == [0, 1, 2, 3, 4, 5]
    assert robust.krum_select(glob, replies, 2, 1)[0] < 6


def test_a_non_finite_server_optimizer_state_keeps_the_last_good_state(capsys):
    """Two finite but huge updates: FedAdam's second moment overflows to Inf while its step
    stays finite. Neither the global tensors nor the moments may take that round."""
    cfg = load_config(None, ["federation.num_clients=2", "federation.strategy=fedadam", "federation.reject_norm_factor=0"])
    glob = {"p": np.zeros(4, np.float32)}
    strategy = fs.make_strategy(cfg)
    strategy.current_arrays = dict(glob)  # what configure_train would have set
    ok = _aggregate(cfg, glob, [_reply(1, {"p": np.full(4, 0.1, np.float32)}), _reply(2, {"p": np.full(4, 0.2, np.float32)})], strategy)
    moments = fs.strategy_state(strategy)
    assert not np.allclose(ok["p"], 0) and moments
    huge = [_reply(1, {"p": np.full(4, 1e20, np.float32)}), _reply(2, {"p": np.full(4, 1e20, np.float32)})]
    strategy.current_arrays = dict(ok)
    kept = _aggregate(cfg, ok, huge, strategy)
    assert kept is ok
    after = fs.strategy_state(strategy)
    assert all(np.array_equal(after[s][k], moments[s][k]) for s in moments for k in moments[s])
    assert "holds NaN or Inf; the global state is kept" in capsys.readouterr().out


# ---- the round loop with hostile clients (tiny model, in-process grid) ----


@pytest.fixture(scope="module")
def client():
    from fedprompt.local import LocalClient

    return LocalClient(_cfg(), num_partitions=3)


def _cfg(**sets):
    from tests.tiny import federation_config

    return federation_config(**({"federation__rounds": 2, "federation__fraction_evaluate": 0.0} | sets))


def _serve(cfg, out, responders):
    from fedprompt.report import read_jsonl
    from fedprompt.server.app import serve
    from tests.fakegrid import FakeGrid

    out.mkdir()
    (out / "config.yaml").write_text(cfg.to_yaml())
    serve(FakeGrid(responders), cfg, out, centralized=True)
    return read_jsonl(out / "metrics.jsonl")


def _hostile(client, partition: int, scale: float):
    """A node replying global + scale x (the honest update of `partition`)."""
    from tests.fakegrid import client_responder, replace_arrays

    honest = client_responder(client, partition)

    def respond(msg):
        reply = honest(msg)
        if msg.metadata.message_type != "train":
            return reply
        glob, local = from_record(msg.content["arrays"]), from_record(reply.content["arrays"])
        return replace_arrays(msg, reply, robust.scale_update(glob, local, scale))

    return respond


def test_hostile_updates_in_a_round_are_screened_logged_and_the_state_stays_finite(tmp_path, client, capsys):
    from fedprompt.checkpoint import load_latest
    from tests.fakegrid import client_responder

    cfg = _cfg(federation__rounds=1, federation__reject_norm_factor=5.0)
    client.cfg = cfg
    responders = {101 + i: client_responder(client, i) for i in range(3)}
    responders[104] = _hostile(client, 0, -10.0)  # boosted and sign-flipped
    responders[105] = _hostile(client, 1, 1e6)  # absurd
    responders[106] = _hostile(client, 2, -1.0)  # sign-flipped: as long as an honest one
    rows = _serve(cfg, tmp_path / "run", responders)
    out = capsys.readouterr().out
    assert "round 1: rejected: node 104: update norm" in out and "round 1: rejected: node 105: update norm" in out
    assert "node 106" not in out  # norm screening cannot see a sign flip: robust aggregation's job
    assert "exceeds 5 x the round's median update norm" in out
    assert all(r["clients"] == 4 and r["failures"] == 2 and r["screened_out"] == 2 for r in rows[1:])
    ck, _ = load_latest(tmp_path / "run")
    assert all(np.isfinite(v).all() for v in ck.tensors.values())


def test_norm_bound_in_a_round_bounds_every_long_update(tmp_path, client, capsys):
    from fedprompt.checkpoint import load_latest
    from tests.fakegrid import client_responder

    cfg = _cfg(federation__rounds=1, federation__norm_bound=1e-3)
    client.cfg = cfg
    rows = _serve(cfg, tmp_path / "run", {101 + i: client_responder(client, i) for i in range(3)})
    out = capsys.readouterr().out
    for node in (101, 102, 103):
        assert f"round 1: node {node}: update norm " in out and "bounded to 0.001" in out
    assert rows[1]["bounded"] == 3 and rows[1]["update_norm_median"] > 1e-3
    ck, _ = load_latest(tmp_path / "run")
    init = {k: v.numpy() for k, v in client.initial_payload().items()}
    # A weighted mean of updates no longer than B is no longer than B.
    assert robust.update_norm(init, ck.tensors) <= 1e-3 * (1 + 1e-5)


def test_an_attacking_client_sends_its_update_scaled(client):
    from fedprompt.client.handler import attacking, handle
    from fedprompt.protocol import Kind, Request

    glob = {k: v.numpy() for k, v in client.initial_payload().items()}
    request = Request(kind=Kind.FIT, round=1, partition_id=2, tensors=glob)
    client.cfg = _cfg()
    honest = handle(client, request).tensors
    client.cfg = _cfg(attack__clients=1, attack__scale=-10.0)
    assert [attacking(client.cfg, i) for i in range(3)] == [False, False, True]  # the last one
    poisoned = handle(client, request).tensors
    assert list(poisoned) == list(honest)
    for k in glob:
        np.testing.assert_allclose(poisoned[k] - glob[k], -10.0 * (honest[k] - glob[k]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(honest[k], glob[k])  # training moved it: the test is not vacuous


def test_an_aggregate_that_overflows_is_not_released(tmp_path, client, capsys, monkeypatch):
    """Finite updates can still average to Inf in float32: the round keeps the global state."""
    from fedprompt.checkpoint import load_latest
    from fedprompt.server import app as server_app
    from tests.fakegrid import client_responder

    real = server_app.make_strategy

    def overflowing(cfg):
        s = real(cfg)
        aggregate = s.aggregate_train

        def aggregate_train(rnd, replies):
            arrays, metrics = aggregate(rnd, replies)
            t = from_record(arrays)
            k = next(iter(t))
            t[k] = np.full_like(t[k], np.inf)
            return to_record(t), metrics

        s.aggregate_train = aggregate_train
        return s

    monkeypatch.setattr(server_app, "make_strategy", overflowing)
    cfg = _cfg(federation__rounds=1)
    client.cfg = cfg
    rows = _serve(cfg, tmp_path / "run", {101 + i: client_responder(client, i) for i in range(3)})
    assert "round 1: the aggregate of 3 updates (or the server optimizer's state) holds NaN or Inf; the global state is kept" in capsys.readouterr().out
    ck, _ = load_latest(tmp_path / "run")
    init = client.initial_payload()
    assert rows[1]["digest"] == payload.digest(init)
    assert all(np.array_equal(ck.tensors[k], init[k].numpy()) for k in init)
