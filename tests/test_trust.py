"""Untrusted participants, in process: what a reply's numbers may say (protocol.METRICS), capped
claims, round 0 agreed by a quorum or read from a trusted adapter, evaluation a liar cannot
set, a bounded wait for a hung client, and a client that refuses a crafted global. The same
lies over the real wire: tests/test_untrusted_e2e.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedprompt import payload
from fedprompt.protocol import NUM_EXAMPLES, Kind, MetricError, Request, check_metrics
from fedprompt.server import trust
from fedprompt.wire import from_record, to_record

# ---- what a reply's metrics may say ----


def test_known_metrics_are_kept_and_unknown_keys_dropped():
    kept, dropped = check_metrics({NUM_EXAMPLES: 12, "accuracy": 0.5, "loss": 1.25, "exfil": 3.0, "x" * 500: 1})
    assert kept == {NUM_EXAMPLES: 12, "accuracy": 0.5, "loss": 1.25}
    assert dropped[0] == "'exfil'" and dropped[1].endswith("...") and len(dropped[1]) < 50


@pytest.mark.parametrize(
    "metrics, why",
    [
        ({NUM_EXAMPLES: 0}, "outside [1, inf]"),
        ({NUM_EXAMPLES: 2.5}, "not an integer"),
        ({NUM_EXAMPLES: -4}, "outside"),
        ({NUM_EXAMPLES: True}, "not a finite number"),
        ({NUM_EXAMPLES: 10, "accuracy": 1.5}, "'accuracy' is 1.5, outside [0, 1]"),
        ({NUM_EXAMPLES: 10, "epsilon": -1.0}, "'epsilon' is -1.0, outside"),
        ({NUM_EXAMPLES: 10, "train_loss": math.nan}, "'train_loss' is nan, not a finite number"),
        ({NUM_EXAMPLES: 10, "loss": math.inf}, "not a finite number"),
        ({NUM_EXAMPLES: 10, "accuracy": "high"}, "'accuracy' is 'high', not a finite number"),
        ({"accuracy": 0.5}, "'num-examples' (the example count) is missing"),
    ],
)
def test_a_metric_no_honest_client_sends_is_named(metrics, why):
    with pytest.raises(MetricError, match=None) as e:
        check_metrics(metrics)
    assert why in str(e.value)


# ---- claims, agreement, robust figures, patience (plain functions) ----


def test_claims_are_capped_at_the_factor_times_the_rounds_median():
    weights, capped = trust.cap_weights({1: 100, 2: 120, 3: 10**9}, 1.0)
    assert weights == {1: 100, 2: 120, 3: 120} and capped == [3]
    weights, capped = trust.cap_weights({1: 100, 2: 120, 3: 10**9}, 2.0)
    assert weights[3] == 240 and capped == [3]
    assert trust.cap_weights({1: 100, 2: 10**9}, 0) == ({1: 100, 2: 10**9}, [])


def test_a_claim_that_changes_wildly_between_rounds_is_named():
    c = trust.Claims()
    assert c.note(1, {7: 100, 8: 50}) == []
    assert c.note(2, {7: 120, 8: 50}) == []  # within 2x: quiet
    lines = c.note(3, {7: 120, 8: 5000})
    assert lines == ["node 8 claims 5000 training examples, 50 in round 2: an honest client's data does not change"]


def test_the_initial_payload_needs_a_strict_majority():
    assert trust.agree({1: "a", 2: "a", 3: "b"}) == ("a", [1, 2], [3])
    assert trust.agree({1: "a"}) == ("a", [1], [])
    for split in ({1: "a", 2: "b"}, {1: "a", 2: "b", 3: "c"}, {}):
        with pytest.raises(trust.NoAgreement):
            trust.agree(split)


def test_one_lying_evaluator_among_three_does_not_set_the_headline():
    per_node = {1: {"accuracy": 0.86}, 2: {"accuracy": 0.84}, 3: {"accuracy": 1.0}}
    claims = {1: 100.0, 2: 100.0, 3: 1e9}
    fig = trust.robust_figures(per_node, trust.cap_weights(claims, 1.0)[0])
    assert fig["fed_accuracy"] == 0.86  # the median
    assert fig["fed_accuracy_weighted"] == pytest.approx((0.86 + 0.84 + 1.0) / 3)  # capped weights
    assert trust.robust_figures(per_node, claims)["fed_accuracy_weighted"] > 0.999  # what an uncapped mean reports
    two = trust.robust_figures({1: {"accuracy": 0.8}, 2: {"accuracy": 0.6}}, {1: 3.0, 2: 1.0})
    assert two["fed_accuracy"] == pytest.approx(0.75)  # below 3 reports a median says nothing: the mean


def test_a_round_waits_a_bounded_time_derived_from_the_rounds_before():
    p = trust.Patience()
    assert p.timeout("fit") == trust.Patience.FIRST_WAIT
    p.took("fit", 4.0)
    p.took("fit", 2.0)
    assert p.timeout("fit") == 3 * 4.0 + 10
    assert trust.Patience(fixed=7.0).timeout("fit") == 7.0


# ---- the client's guard ----


def _guard(tmp_path, factor=10.0):
    from fedprompt.client.guard import Guard

    initial = {"a": np.ones((2, 3), np.float32), "b": np.full((4,), 0.5, np.float32)}
    return Guard(payload.manifest_from(initial), lambda rank: initial, factor, tmp_path / "record.jsonl"), initial


def test_the_client_refuses_a_crafted_global_naming_round_and_tensor(tmp_path):
    from fedprompt.client.guard import GlobalRefused

    g, initial = _guard(tmp_path)
    ok = {"a": initial["a"] * 2, "b": initial["b"]}
    g.check(Request(Kind.FIT, round=1, tensors=ok, run=5))
    crafted = {"a": initial["a"], "b": initial["b"] * 1000}
    with pytest.raises(GlobalRefused, match=r"refuses the global of round 2 \(run 5\): its L2 norm .* x the initial payload's .*largest growth in tensor 'b'"):
        g.check(Request(Kind.FIT, round=2, tensors=crafted, run=5))
    with pytest.raises(GlobalRefused, match="tensor 'a' holds NaN or Inf"):
        g.check(Request(Kind.FIT, round=2, tensors={"a": initial["a"] * np.nan, "b": initial["b"]}, run=5))
    with pytest.raises(GlobalRefused, match="tensor 'b' has shape"):
        g.check(Request(Kind.FIT, round=2, tensors={"a": initial["a"], "b": np.ones(5, np.float32)}, run=5))
    with pytest.raises(GlobalRefused, match="round 0 goes back, this client already received round 1"):
        g.check(Request(Kind.EVALUATE, round=0, tensors=ok, run=5))
    g.check(Request(Kind.EVALUATE, round=1, tensors=ok, run=5))  # the same round again: a retry or its evaluation
    g.check(Request(Kind.FIT, round=1, tensors=ok, run=6))  # another run starts again
    _guard(tmp_path, factor=0)[0].check(Request(Kind.FIT, round=3, tensors=crafted, run=7))  # 0: the ceiling is off


def test_the_client_records_what_it_received_and_sent_and_a_restart_remembers(tmp_path):
    from fedprompt.client.guard import GlobalRefused
    from fedprompt.protocol import Reply

    g, initial = _guard(tmp_path)
    req = Request(Kind.FIT, round=3, tensors=initial, run=9)
    g.check(req)
    g.record(req, Reply(metrics={NUM_EXAMPLES: 1}, tensors={"a": initial["a"] + 1, "b": initial["b"]}))
    g.record(Request(Kind.FIT, round=4, tensors=initial, run=9), None, refused="refuses the global of round 4: ...")
    lines = [json.loads(x) for x in (tmp_path / "record.jsonl").read_text().splitlines()]
    assert lines[0]["received"] == payload.digest(initial) and lines[0]["sent"] != lines[0]["received"]
    assert lines[0]["run"] == 9 and lines[0]["round"] == 3 and lines[0]["kind"] == "fit"
    assert lines[1]["refused"].startswith("refuses the global of round 4") and lines[1]["sent"] is None
    again, _ = _guard(tmp_path)  # a restarted client reads its record: round 3 was received
    with pytest.raises(GlobalRefused, match="round 2 goes back"):
        again.check(Request(Kind.FIT, round=2, tensors=initial, run=9))


# ---- the round loop with lying clients (tiny model, in-process grid) ----


def _cfg(**sets):
    from tests.tiny import federation_config

    return federation_config(**({"federation__rounds": 1, "federation__min_clients": 3} | sets))


@pytest.fixture(scope="module")
def client():
    from fedprompt.local import LocalClient

    return LocalClient(_cfg(), num_partitions=3)


def _serve(cfg, out, responders, centralized=False):
    from fedprompt.report import read_jsonl
    from fedprompt.server.app import serve
    from tests.fakegrid import FakeGrid

    out.mkdir()
    (out / "config.yaml").write_text(cfg.to_yaml())
    grid = FakeGrid(responders)
    serve(grid, cfg, out, centralized=centralized)
    return read_jsonl(out / "metrics.jsonl"), grid


def _nodes(client, **liar):
    """Nodes 101, 102 honest; node 103 honest, or lying as localgrid.Lies(**liar) says."""
    from fedprompt.server.localgrid import Lies, lying_responder
    from tests.fakegrid import client_responder

    third = lying_responder(client, 2, Lies(**liar)) if liar else client_responder(client, 2)
    return {101: client_responder(client, 0), 102: client_responder(client, 1), 103: third}


def test_an_inflated_claim_weighs_no_more_than_the_median_claim(tmp_path, client, capsys):
    """The liar's update counts exactly as if it had claimed the round's median count; an
    uncapped server (max_weight_factor 0) lets the same lie decide the aggregate."""
    cfg = _cfg()
    client.cfg = cfg
    claims = {101 + i: len(client.shard(i).train) for i in range(3)}
    honest_rows, _ = _serve(cfg, tmp_path / "honest", _nodes(client, flip=True))
    rows, _ = _serve(cfg, tmp_path / "lying", _nodes(client, flip=True, count_factor=10**6))
    out = capsys.readouterr().out
    median = float(np.median(list(claims.values())))
    assert rows[1]["weights"] == {str(n): min(float(c), median) for n, c in claims.items()} | {"103": median}
    assert f"node 103 claims {claims[103] * 10**6:g} training examples; weighed as {median:g}," in out
    if claims[103] == median:  # then the capped lie is exactly the truth
        assert rows[1]["digest"] == honest_rows[1]["digest"]
    uncapped, _ = _serve(_cfg(federation__max_weight_factor=0), tmp_path / "uncapped", _nodes(client, flip=True, count_factor=10**6))
    assert uncapped[1]["weights"]["103"] == claims[103] * 10**6
    from fedprompt.checkpoint import load_latest
    from fedprompt.server.robust import update_norm

    g0 = load_latest(tmp_path / "honest")[0]
    moved = {name: update_norm(load_latest(tmp_path / name)[0].tensors, g0.tensors) for name in ("lying", "uncapped")}
    # Capped, the lie moves the global by its claim's small excess over the truth (here 27 vs 26);
    # uncapped, the liar's flipped update is the aggregate.
    assert moved["lying"] < 0.05 * moved["uncapped"]


def test_uniform_weighting_ignores_the_claims(tmp_path, client):
    cfg = _cfg(federation__weighting="uniform")
    client.cfg = cfg
    rows, _ = _serve(cfg, tmp_path / "run", _nodes(client, count_factor=10**6))
    assert rows[1]["weights"] == {"101": 1.0, "102": 1.0, "103": 1.0}


def test_round_0_is_the_majoritys_seeded_payload_and_the_liar_is_named(tmp_path, client, capsys):
    cfg = _cfg()
    client.cfg = cfg
    rows, grid = _serve(cfg, tmp_path / "run", _nodes(client, init_shift=1.0))
    out = capsys.readouterr().out
    assert rows[0]["digest"] == payload.digest(client.initial_payload())
    assert "node 103 answered a different initial payload" in out and "agreed by node(s) 101, 102" in out
    meta = json.loads((tmp_path / "run" / "adapter" / "fedprompt.json").read_text())
    assert meta["labels"] == list(client.state.data.labels) and meta["labels"]  # agreed with round 0, exported
    assert sum(m.metadata.message_type == "query" for m in grid.sent) == 3


def test_without_a_majority_the_server_refuses_to_start(tmp_path, client):
    from fedprompt.server.app import FederationError
    from fedprompt.server.localgrid import Lies, lying_responder
    from tests.fakegrid import client_responder

    cfg = _cfg(federation__min_clients=2, federation__num_clients=3)
    client.cfg = cfg
    with pytest.raises(FederationError, match="initial payloads do not agree .*federation.initial_adapter"):
        _serve(cfg, tmp_path / "run", {101: client_responder(client, 0), 102: lying_responder(client, 1, Lies(init_shift=1.0))})


def test_a_trusted_adapter_is_round_0_and_continues_an_earlier_run(tmp_path, client, capsys):
    from fedprompt.checkpoint import load_latest

    cfg = _cfg()
    client.cfg = cfg
    _serve(cfg, tmp_path / "first", _nodes(client))
    earlier = load_latest(tmp_path / "first")[0]
    cont = _cfg(federation__initial_adapter=str(tmp_path / "first" / "adapter"))
    rows, grid = _serve(cont, tmp_path / "second", _nodes(client, init_shift=1.0))  # the liar is never asked
    assert rows[0]["digest"] == payload.digest(earlier.tensors)
    assert not any(m.metadata.message_type == "query" for m in grid.sent)
    assert "initial payload from federation.initial_adapter" in capsys.readouterr().out
    assert load_latest(tmp_path / "second")[0].labels == list(client.state.data.labels)  # from the adapter's fedprompt.json


def test_a_lying_evaluator_does_not_set_the_reported_accuracy(tmp_path, client):
    cfg = _cfg(federation__fraction_evaluate=1.0)
    client.cfg = cfg
    rows, _ = _serve(cfg, tmp_path / "run", _nodes(client, eval_metrics={"accuracy": 1.0, NUM_EXAMPLES: 10**9}))
    row = rows[1]
    honest = sorted(v["accuracy"] for n, v in row["fed_nodes"].items() if n != "103")
    assert row["fed_nodes"]["103"] == {**row["fed_nodes"]["103"], "accuracy": 1.0, "examples": 10**9}
    assert honest[0] <= row["accuracy"] == row["fed_accuracy"] <= honest[1]  # the median of three
    assert row["fed_accuracy_weighted"] < 1.0 and row["fed_examples"] < 10**6


def test_bad_metrics_reject_the_reply_by_node_and_unknown_ones_are_dropped(tmp_path, client, capsys):
    cfg = _cfg()
    client.cfg = cfg
    rows, _ = _serve(cfg, tmp_path / "nan", _nodes(client, fit_metrics={"train_loss": math.nan}))
    out = capsys.readouterr().out
    assert "round 1: rejected: node 103: metric 'train_loss' is nan, not a finite number" in out
    assert rows[1]["clients"] == 2 and rows[1]["failures"] == 1
    rows, _ = _serve(cfg, tmp_path / "extra", _nodes(client, fit_metrics={"leak": 42.0}))
    assert "round 1: node 103 sent metric(s) no fedprompt client sends, dropped: 'leak'" in capsys.readouterr().out
    assert rows[1]["clients"] == 3 and "leak" not in json.dumps(rows)


def test_a_hung_client_costs_a_bounded_round_and_is_not_asked_to_evaluate(tmp_path, client, capsys, monkeypatch):
    monkeypatch.setattr(trust.Patience, "MARGIN", 1.0)
    cfg = _cfg(federation__rounds=2, federation__fraction_evaluate=1.0)
    client.cfg = cfg
    rows, grid = _serve(cfg, tmp_path / "run", _nodes(client, hang_from=2))
    out = capsys.readouterr().out
    assert "round 2: 1 of 3 sampled clients did not reply within" in out and "node(s) 103" in out
    assert rows[2]["clients"] == 2 and rows[2]["round_s"] < 3 * rows[1]["train_s"] + 1.0 + 5
    round2_evals = [m for m in grid.sent if m.metadata.message_type == "evaluate" and m.metadata.dst_node_id == 103]
    assert len(round2_evals) == 2  # rounds 0 and 1 only: busy in round 2, not asked


def test_the_client_handler_refuses_a_crafted_global_before_loading_it(client, tmp_path):
    from fedprompt.client.guard import GlobalRefused
    from tests.fakegrid import _identity, client_responder

    _identity(424242)  # a run of its own
    client.cfg = _cfg()
    respond = client_responder(client, 0)
    init = respond(Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=0, message_type="query"))
    crafted = {k: v * 1000 for k, v in from_record(init.content["arrays"]).items()}
    before = {k: t.clone() for k, t in client.state.model.trainable().items()}
    reply = respond(Message(RecordDict({"arrays": to_record(crafted), "config": ConfigRecord({"server-round": 1})}), dst_node_id=0, message_type="train"))
    assert reply.has_error() and "GlobalRefused" in reply.error.reason and "refuses the global of round 1" in reply.error.reason
    assert all((before[k] == t).all() for k, t in client.state.model.trainable().items())  # nothing loaded
    assert issubclass(GlobalRefused, ValueError)
