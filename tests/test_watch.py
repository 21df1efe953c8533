"""Watching and comparing runs: the experiment trackers (TensorBoard, MLflow) read back with
their own readers, a tracker that cannot be reached, the Prometheus exporter scraped over
HTTP, and `fedprompt compare`. End to end: a simulation with both trackers and a real server's
endpoint scraped round by round (tests/test_federation_e2e.py)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from fedprompt.processes import free_port
from fedprompt.tracking import TRACKERS, Trackers, numbers
from tests.tiny import tiny_config


def test_the_tracker_names_are_the_configs():
    import typing

    from fedprompt.config.schema import OutputConfig

    (allowed,) = typing.get_args(typing.get_type_hints(OutputConfig)["trackers"])
    assert set(typing.get_args(allowed)) == set(TRACKERS)


def test_numbers_keeps_finite_scalars_only():
    row = {"round": 2, "accuracy": 0.5, "released": True, "digest": "ab", "weights": {"1": 2.0}, "loss": None, "x": float("nan")}
    assert numbers(row) == {"round": 2.0, "accuracy": 0.5, "released": 1.0}


def test_train_logs_every_row_to_both_trackers_and_compare_puts_runs_side_by_side(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the run's local store (see fedprompt/tracking.py)
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedprompt.cli import main
    from fedprompt.report import read_jsonl
    from fedprompt.run import run_train

    runs = []
    for name, lr in (("lr-small", 0.01), ("lr-large", 0.1)):
        cfg = tiny_config("bert", train__eval_every=1, train__lr=lr, output__trackers="tensorboard,mlflow", output__experiment="watch-test")
        run_train(cfg, tmp_path / name, quiet=True)
        runs.append(tmp_path / name)
    rows = read_jsonl(runs[0] / "metrics.jsonl")
    tb = EventAccumulator(str(runs[0] / "tensorboard"))
    tb.Reload()
    assert {e.step: e.value for e in tb.Scalars("accuracy")} == {r["step"]: pytest.approx(r["accuracy"]) for r in rows}
    client = MlflowClient(tracking_uri=(runs[0] / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("watch-test").experiment_id])
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")} == {r["step"]: pytest.approx(r["loss"]) for r in rows}
    assert run.info.status == "FINISHED" and run.data.params["train.lr"] == "0.01"

    # The adapter folder says what it needs elsewhere: base model, labels, input length.
    meta = json.loads((runs[0] / "adapter" / "fedprompt.json").read_text())
    labels = sorted({"business", "entertainment", "politics", "sport", "tech"})
    assert meta["labels"] == labels and meta["id2label"] == {str(i): x for i, x in enumerate(labels)} and meta["max_length"] == 32
    assert json.loads((runs[0] / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == cfg.model.name  # not built in: as given
    card = (runs[0] / "adapter" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card and "- 3: sport" in card
    assert f"test accuracy: {rows[-1]['accuracy']:.4f}" in card

    png = tmp_path / "cmp" / "compare.png"
    assert main(["compare", *map(str, runs), "--output", str(png)]) == 0
    out = capsys.readouterr().out
    assert "lr-small" in out and "lr-large" in out and "final_acc" in out and str(png) in out
    assert png.stat().st_size > 1000
    table = json.loads(png.with_suffix(".json").read_text())
    assert [t["run"] for t in table] == ["lr-small", "lr-large"] and table[0]["final_accuracy"] == pytest.approx(rows[-1]["accuracy"])
    assert main(["compare", str(tmp_path / "nothing-here")]) == 2
    assert "not a readable fedprompt run directory" in capsys.readouterr().err
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.yaml").write_text("- a list\n")
    (odd / "metrics.jsonl").write_text('{"no_round": 1}\n')
    assert main(["compare", str(odd)]) == 2
    assert "is not what fedprompt writes" in capsys.readouterr().err


def test_an_unreachable_mlflow_costs_one_warning_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    cfg = tiny_config("bert", output__trackers="mlflow,tensorboard")
    t = Trackers(cfg, tmp_path, "run")
    t.row({"round": 1, "accuracy": 0.5}, "round")
    t.finish(ok=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedprompt: warning: tracker mlflow cannot start") and "the run goes on without it" in err[0]
    assert (tmp_path / "tensorboard").is_dir()  # the other tracker still works


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_the_prometheus_exporter_serves_what_the_rows_say():
    from fedprompt.rundir import RunError
    from fedprompt.server.metrics import Exporter

    port = free_port()
    e = Exporter(f"127.0.0.1:{port}", rounds=5)
    try:
        e.row({"round": 0})
        row = {"round": 1, "clients": 2, "failures": 1, "connected": 3, "rejected": {"error": 0, "metrics": 1}, "bytes_up_total": 100, "bytes_down_total": 60}
        e.row(row | {"round_s": 4.5, "accuracy": 0.75, "epsilon": 1.5})
        e.row(row | {"round": 2, "round_s": 3.0, "accuracy": 0.8})
        text = _scrape(port)
        for line in [
            "fedprompt_rounds_completed 2.0",
            "fedprompt_rounds_planned 5.0",
            "fedprompt_clients_sampled 3.0",
            "fedprompt_clients_aggregated 2.0",
            "fedprompt_clients_connected 3.0",
            'fedprompt_replies_rejected_total{reason="metrics"} 2.0',
            "fedprompt_bytes_up_total 200.0",
            "fedprompt_round_duration_seconds 3.0",
            "fedprompt_accuracy 0.8",
            "fedprompt_epsilon 1.5",
        ]:
            assert line in text, line
        with pytest.raises(RunError, match="already in use"):
            Exporter(f"127.0.0.1:{port}", rounds=5)
    finally:
        e.close()


def test_settings_that_sample_a_single_client_are_named():
    from fedprompt.config import load_config
    from fedprompt.server.runner import sampling_warnings

    shipped = load_config("configs/bbc-minilm-prompt.yaml")  # fraction_fit 0.5, fraction_evaluate 0.25
    fit, ev = sampling_warnings(shipped, 2)
    assert fit.startswith("federation.fraction_fit 0.5 with 2 clients trains a single client per round")
    assert ev.startswith("federation.fraction_evaluate 0.25 with 2 clients evaluates on a single client's local test split")
    assert sampling_warnings(shipped, 8) == []  # 4 train, 2 evaluate
    assert sampling_warnings(load_config("configs/deploy-2-clients.yaml"), 2) == []  # the README's walk-through
