"""The server's round loop on an in-process grid: real LocalClients on a tiny model, real
Flower strategies and records, no processes (those are in test_federation_e2e.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Error, Message

from fedprompt import payload
from fedprompt.checkpoint import load_latest
from fedprompt.local import LocalClient
from fedprompt.report import read_jsonl
from fedprompt.server import strategies as fs
from fedprompt.server.app import FederationError, serve
from tests.fakegrid import FakeGrid, client_responder, replace_arrays
from tests.tiny import federation_config, tiny_config


def _cfg(**sets):
    return federation_config(**sets)


@pytest.fixture(scope="module")
def client():
    return LocalClient(_cfg(), num_partitions=3)


def _grid(client, wrap=None) -> FakeGrid:
    responders = {}
    for i in range(3):
        r = client_responder(client, i)
        responders[101 + i] = wrap(101 + i, r) if wrap else r
    return FakeGrid(responders)


def _run(cfg, out, grid, centralized=True):
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    serve(grid, cfg, out, centralized=centralized)
    return read_jsonl(out / "metrics.jsonl")


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedavgm"])
def test_a_crashed_server_resumes_exactly(tmp_path, client, strategy):
    cfg = _cfg(federation__strategy=strategy, federation__server_lr=0.05)
    client.cfg = cfg
    full = _run(cfg, tmp_path / "full", _grid(client))
    assert [r["round"] for r in full] == [0, 1, 2, 3]

    def crash_in_round_3(node, respond):
        def r(msg):
            if msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 3:
                raise KeyboardInterrupt  # the server dies mid-round
            return respond(msg)

        return r

    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path / "crash", _grid(client, crash_in_round_3))
    assert [r["round"] for r in read_jsonl(tmp_path / "crash" / "metrics.jsonl")] == [0, 1, 2]
    resumed = _run(cfg, tmp_path / "crash", _grid(client))
    assert [r["round"] for r in resumed] == [0, 1, 2, 3]  # each round exactly once
    assert [r["digest"] for r in resumed[1:]] == [r["digest"] for r in full[1:]]
    assert resumed[3]["accuracy"] == full[3]["accuracy"]
    if strategy == "fedavgm":  # its momentum was in play (and checkpointed by name) for the resume to match
        state, _ = load_latest(tmp_path / "full")
        assert set(state.strategy["momentum"]) == set(state.tensors) and any(np.abs(v).max() > 0 for v in state.strategy["momentum"].values())


def test_bad_replies_are_rejected_and_the_round_goes_on(tmp_path, client, capsys):
    cfg = _cfg(federation__rounds=2)
    client.cfg = cfg
    spec = {s.name: s for s in client.manifest}
    name = sorted(spec)[0]

    def tamper(node, respond):
        def r(msg):
            reply = respond(msg)
            if msg.metadata.message_type != "train" or node == 101:
                return reply
            t = {k: v.numpy() for k, v in client.initial_payload().items()}
            if node == 102:
                t[name] = np.full(spec[name].shape, np.nan, dtype=np.float32)
            else:
                t[name] = np.zeros((1, *spec[name].shape), dtype=np.float32)
            return replace_arrays(msg, reply, t)

        return r

    rows = _run(cfg, tmp_path / "run", _grid(client, tamper))
    out = capsys.readouterr().out
    assert "node 102" in out and "NaN or Inf" in out and "node 103" in out and "has shape" in out
    assert all(r["clients"] == 1 and r["failures"] == 2 for r in rows[1:])
    ck, _ = load_latest(tmp_path / "run")
    assert all(np.isfinite(v).all() for v in ck.tensors.values())


def test_a_round_without_any_usable_update_stops_the_run(tmp_path, client):
    cfg = _cfg(federation__rounds=1)
    client.cfg = cfg

    def failing(node, respond):
        def r(msg):
            if msg.metadata.message_type == "train":  # what Flower sends back for a raising ClientApp
                return Message(Error(code=1, reason="RuntimeError: disk full"), reply_to=msg)
            return respond(msg)

        return r

    with pytest.raises(FederationError, match="round 1: no usable update from 3 sampled clients.*disk full"):
        _run(cfg, tmp_path / "run", _grid(client, failing))


def test_rows_record_bytes_and_backbone_loads(tmp_path, client):
    from fedprompt import local

    cfg = _cfg(federation__rounds=2, federation__fraction_evaluate=1.0)
    client.cfg = cfg
    loads = local.BACKBONE_LOADS  # this test process may have built other clients before
    rows = _run(cfg, tmp_path / "run", _grid(client), centralized=False)
    raw = payload.raw_bytes(client.manifest)
    for r in rows[1:]:
        assert r["clients"] == 3 and raw < r["bytes_up"] and raw < r["bytes_down"]
        assert list(r["backbone_loads"].values()) == [loads]  # one process, no new load for 3 clients
        assert r["accuracy"] == r["fed_accuracy"]  # deployment: federated figures are the figures
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["payload_bytes"] == raw
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_strategies_are_flowers_own_classes():
    from flwr.serverapp import strategy as fl

    expected = {
        "fedavg": fl.FedAvg,
        "fedprox": fl.FedProx,
        "fedadam": fl.FedAdam,
        "fedyogi": fl.FedYogi,
        "fedmedian": fl.FedMedian,
        "trimmedmean": fl.FedTrimmedAvg,
    }
    for name, cls in expected.items():
        s = fs.make_strategy(
            tiny_config("bert", federation__strategy=name, federation__proximal_mu=0.5, federation__trim_fraction=0.1, federation__server_lr=0.3)
        )
        assert type(s) is cls
    assert fs.make_strategy(tiny_config("bert", federation__strategy="fedprox", federation__proximal_mu=0.5)).proximal_mu == 0.5
    assert fs.make_strategy(tiny_config("bert", federation__strategy="fedadam", federation__server_lr=0.3)).eta == 0.3
    assert fs.make_strategy(tiny_config("bert", federation__strategy="trimmedmean", federation__trim_fraction=0.1)).beta == 0.1


def test_weighted_mean_skips_worker_bookkeeping():
    from flwr.app import MetricRecord, RecordDict

    recs = [
        RecordDict({"m": MetricRecord({"num-examples": 1, "train_loss": 1.0, "pid": 7, "backbone_loads": 1})}),
        RecordDict({"m": MetricRecord({"num-examples": 3, "train_loss": 2.0, "pid": 9, "backbone_loads": 1})}),
    ]
    out = dict(fs.weighted_mean(recs, "num-examples"))
    assert out == {"train_loss": 1.75, "num-examples": 4}


def test_fedprox_mu_reaches_the_client(tmp_path, client):
    cfg = _cfg(federation__rounds=1, federation__strategy="fedprox", federation__proximal_mu=0.25)
    client.cfg = cfg
    grid = _grid(client)
    _run(cfg, tmp_path / "run", grid)
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert trains and all(float(m.content["config"]["proximal-mu"]) == 0.25 for m in trains)


def test_prepare_resumes_only_the_same_configuration(tmp_path, client):
    from fedprompt.run import RunError
    from fedprompt.server.runner import prepare

    cfg = _cfg(federation__rounds=2)
    client.cfg = cfg
    out = tmp_path / "run"
    assert prepare(cfg, out, overwrite=False) == 0
    serve(_grid(client), cfg, out, centralized=False)
    with pytest.raises(RunError, match="already holds a finished run of 2 rounds"):
        prepare(cfg, out, overwrite=False)
    assert prepare(_cfg(federation__rounds=4), out, overwrite=False) == 2  # longer: resumes
    with pytest.raises(RunError, match=r"different configuration \(peft.num_virtual_tokens: 4 there, 6 now"):
        prepare(_cfg(federation__rounds=4, peft__num_virtual_tokens=6), out, overwrite=False)
    assert prepare(_cfg(peft__num_virtual_tokens=6), out, overwrite=True) == 0  # a new run
    assert not (out / "checkpoint.safetensors").exists()


def test_the_server_app_entry_reads_the_run_directory(tmp_path, client):
    """main(): config from the run directory, centralized evaluation only in simulation and
    only when asked, status.json written."""
    from fedprompt.server.app import main
    from tests.fakegrid import FakeContext

    for mode, central, expect_central in (("simulation", "true", True), ("simulation", "false", False), ("deployment", "true", False)):
        cfg = _cfg(federation__rounds=1, federation__fraction_evaluate=1.0, federation__centralized_eval=central)
        client.cfg = cfg
        out = tmp_path / f"{mode}-{central}"
        out.mkdir()
        (out / "config.yaml").write_text(cfg.to_yaml())
        ctx = FakeContext({})
        ctx.run_config = {"output": str(out), "mode": mode, "superlink-pid": 0}
        grid = _grid(client)
        main(grid, ctx)
        assert json.loads((out / "status.json").read_text()) == {"state": "done"}
        central_asked = any(m.metadata.message_type == "evaluate" and m.content["config"].get("scope") == "centralized" for m in grid.sent)
        assert central_asked == expect_central, (mode, central)


def test_a_finished_run_is_recognised_for_keep_alive(tmp_path, client):
    from fedprompt.run import RunError
    from fedprompt.server import runner

    cfg = _cfg()
    client.cfg = cfg
    out = tmp_path / "run"
    assert not runner._finished(cfg, out)
    _run(cfg, out, _grid(client))
    assert runner._finished(cfg, out)  # a restarted --keep-alive server idles instead of failing
    more = _cfg(federation__rounds=5)
    assert not runner._finished(more, out)  # more rounds: it resumes
    with pytest.raises(RunError, match="different configuration"):
        runner._finished(_cfg(train__lr=0.5), out)


def test_reload_per_message_rebuilds_the_client_every_call_and_learns_the_same(tmp_path):
    """client.reload_per_message (the template pattern benchmarked in benchmarks/template.py):
    every message builds a new backbone through handler.client_for, and the federation's
    tensors are exactly those of the cached client (it changes the cost, not the result)."""
    from fedprompt import local
    from fedprompt.client import handler

    digests = {}
    for reload in (False, True):
        cfg = _cfg(federation__rounds=1, federation__fraction_evaluate=0.0, client__reload_per_message=reload)
        out = tmp_path / f"reload-{reload}"
        out.mkdir()
        (out / "config.yaml").write_text(cfg.to_yaml())
        handler._CLIENTS.clear()
        before = local.BACKBONE_LOADS

        def via_client_for(i):
            def respond(msg):
                return client_responder(handler.client_for(out / "config.yaml", 3), i)(msg)

            return respond

        rows = _run(cfg, out, FakeGrid({101 + i: via_client_for(i) for i in range(3)}))
        loads = local.BACKBONE_LOADS - before
        messages = 3 + 1 + 3 + 1  # 3 queries (the initial payload quorum), round 0's centralized evaluation, 3 fits, round 1's evaluation
        assert loads == (messages if reload else 1), loads
        digests[reload] = [r["digest"] for r in rows[1:]]
    handler._CLIENTS.clear()
    assert digests[True] == digests[False]


def test_every_configurable_strategy_is_registered_and_builds():
    """federation.strategy's allowed names are exactly the registry's, and each builds."""
    import typing

    from fedprompt.config import FederationConfig
    from fedprompt.server.strategies import STRATEGIES, make_strategy

    allowed = typing.get_args(typing.get_type_hints(FederationConfig)["strategy"])
    assert set(allowed) == set(STRATEGIES)
    for name in allowed:
        assert make_strategy(tiny_config("bert", "prompt", federation__strategy=name)) is not None
