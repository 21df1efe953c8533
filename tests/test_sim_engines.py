"""The two simulation engines (federation.engine): Flower's (a real SuperLink, a Ray worker,
the ServerApp in its own process) and inprocess (the same round loop and client code in one
process) compute the same federation."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedprompt.report import read_jsonl
from tests.helpers import TINY, metrics_rows, set_args, start_fedprompt, stop_all, wait_for_round
from tests.tiny import tiny_folder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _sets(engine: str, rounds: int = 2) -> list[str]:
    return [
        f"model.name={tiny_folder('bert')}",
        *TINY,
        "data.partition=iid",
        "federation.num_clients=3",
        "federation.fraction_fit=1.0",  # every client every round: the same updates on both engines
        f"federation.rounds={rounds}",
        f"federation.engine={engine}",
    ]


def _simulate(out: Path, engine: str, rounds: int = 2) -> subprocess.CompletedProcess:
    sets = _sets(engine, rounds)
    r = subprocess.run(
        [sys.executable, "-m", "fedprompt", "simulate", *set_args(sets), "--output", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def test_the_inprocess_engine_computes_what_flowers_engine_computes(tmp_path):
    """Same config, both engines: the same losses and the same global adapter (up to the order
    of the weighted sum: node ids differ), the same run directory; the in-process run keeps
    the round loop's lines and Flower's log in logs/run.log, off the terminal."""
    flower = _simulate(tmp_path / "flower", "flower")
    inproc = _simulate(tmp_path / "inprocess", "inprocess")
    assert "1 worker(s), each" in flower.stdout  # Flower's engine: a Ray worker
    assert "this process (federation.engine inprocess)" in inproc.stdout and "Summary" in inproc.stdout
    assert "INFO" not in inproc.stdout + inproc.stderr and "configure_train" in (tmp_path / "inprocess/logs/run.log").read_text()
    a, b = read_jsonl(tmp_path / "flower/metrics.jsonl"), read_jsonl(tmp_path / "inprocess/metrics.jsonl")
    assert [r["round"] for r in a] == [r["round"] for r in b] == [0, 1, 2]
    assert [r["clients"] for r in b] == [0, 3, 3]
    for ra, rb in zip(a[1:], b[1:], strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        # The same payloads; the messages' metadata differ by a few bytes (node ids 1..3 here,
        # random 64-bit ids on Flower's engine, as varints).
        assert rb["bytes_up"] == pytest.approx(ra["bytes_up"], abs=32)
    fa, fb = (load_file(str(tmp_path / d / "adapter/adapter_model.safetensors")) for d in ("flower", "inprocess"))
    assert set(fa) == set(fb)
    for k in fa:
        assert fb[k] == pytest.approx(fa[k], rel=1e-4, abs=1e-6), k
    for f in ("summary.json", "checkpoint.safetensors", "adapter/adapter_config.json"):
        assert (tmp_path / "inprocess" / f).exists(), f


def test_an_interrupted_inprocess_run_exits_130_and_resumes(tmp_path):
    """Ctrl-C mid-run: exit 130 at once with one line (no C++ abort from the round loop's
    thread), the last completed round kept; the same command resumes after it."""
    out = tmp_path / "run"
    p = start_fedprompt(["simulate", *set_args(_sets("inprocess", rounds=200)), "--output", str(out)], tmp_path / "sim.log")
    try:
        wait_for_round(out, 2, [p], timeout=300)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 130
    finally:
        stop_all([p])
    log = (tmp_path / "sim.log").read_text()
    assert "fedprompt: interrupted" in log and "terminate called" not in log and "Traceback" not in log
    done = metrics_rows(out)[-1]["round"]
    r = _simulate(out, "inprocess", rounds=done + 1)
    assert f"resuming after round {done}" in r.stdout
    assert [x["round"] for x in metrics_rows(out)] == list(range(done + 2))
