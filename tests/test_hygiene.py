"""After a simulation that finished, failed or was interrupted (Ctrl-C, SIGTERM), no
fedprompt, Flower or Ray process is left and every port its processes listened on is free
(finished: test_federation_e2e's simulations, with the helpers here)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from fedprompt.processes import port_in_use
from tests.helpers import TINY, set_args, start_fedprompt, stop_all, wait_for_round
from tests.tiny import tiny_folder

pytestmark = pytest.mark.slow


def _marked(mark: str) -> list[psutil.Process]:
    """Live processes that inherited FEDPROMPT_TEST_MARK=mark (every descendant does)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.environ().get("FEDPROMPT_TEST_MARK") == mark and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _listening(procs: list[psutil.Process]) -> set[tuple[str, int]]:
    ports = set()
    for p in procs:
        try:
            ports |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ports


def start_marked(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`fedprompt args` started with a fresh FEDPROMPT_TEST_MARK, which every descendant
    inherits (so `_marked` finds them all, Ray's and Flower's included)."""
    mark = f"{args[0]}-{os.getpid()}-{time.monotonic_ns()}"
    os.environ["FEDPROMPT_TEST_MARK"] = mark
    try:
        return start_fedprompt(args, log), mark
    finally:
        del os.environ["FEDPROMPT_TEST_MARK"]


def watch_until_exit(p: subprocess.Popen, mark: str, timeout: float) -> set[tuple[str, int]]:
    """The ports the marked processes listened on while `p` ran, polled until it exits."""
    ports: set[tuple[str, int]] = set()
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < timeout:
        ports |= _listening(_marked(mark))
        time.sleep(0.2)
    return ports


def assert_nothing_outlives(mark: str, ports: set[tuple[str, int]]) -> None:
    """No marked process is left (15 s of grace) and every port they listened on is free."""
    t0 = time.monotonic()
    while _marked(mark) and time.monotonic() - t0 < 15:
        time.sleep(0.5)
    left = [" ".join(x.cmdline()) for x in _marked(mark)]
    assert not left, left
    assert ports, "no listening port seen: the check would prove nothing"
    assert not [a for a in ports if port_in_use("127.0.0.1" if a[0] in ("0.0.0.0", "::") else a[0], a[1])]


# "finished" is checked by test_federation_e2e's simulations (start_marked + assert_nothing_outlives);
# SIGTERM reaches the same handler as SIGINT (test_sigterm_and_sigint_reach_one_handler).
@pytest.mark.parametrize("outcome", ["failed", "SIGINT"])
def test_no_process_or_port_outlives_a_simulation(tmp_path, outcome):
    sets = [f"model.name={tiny_folder('bert')}", *TINY, "federation.num_clients=4", "federation.rounds=50"]
    if outcome == "SIGINT":  # also the suite's federated run of prefix tuning on an 8-bit backbone
        sets += [f"model.name={tiny_folder('llama')}", "peft.method=prefix", "model.quantization=8bit"]
    if outcome == "failed":  # fails once running: no client can answer in a millisecond
        sets.append("federation.round_timeout=0.001")
    out = tmp_path / "run"
    p, mark = start_marked(["simulate", *set_args(sets), "--output", str(out)], tmp_path / "sim.log")
    ports: set[tuple[str, int]] = set()
    try:
        if outcome.startswith("SIG"):
            wait_for_round(out, 1, [p], timeout=300)
            ports = _listening(_marked(mark))
            p.send_signal(getattr(signal, outcome))
            assert p.wait(timeout=60) == 130
        else:
            ports = watch_until_exit(p, mark, 600)
            assert p.wait(timeout=5) == 2, (tmp_path / "sim.log").read_text()[-2000:]
    finally:
        stop_all([p])
    assert_nothing_outlives(mark, ports)
    log = Path(tmp_path / "sim.log").read_text()
    if outcome.startswith("SIG"):
        assert "fedprompt: interrupted" in log
    if outcome == "failed":
        assert "Traceback" not in log and not (out / "summary.json").exists()


def test_sigterm_and_sigint_reach_one_handler(monkeypatch):
    """What Kubernetes and systemd send (SIGTERM) stops a federated run exactly as Ctrl-C does,
    which the simulation above interrupts end to end."""
    import argparse

    from fedprompt import cli
    from fedprompt.config import load_config
    from fedprompt.server import runner

    seen = {}
    monkeypatch.setattr(runner, "run_simulate", lambda *a, **k: seen.update(term=signal.getsignal(signal.SIGTERM), int=signal.getsignal(signal.SIGINT)))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        cli._federated(argparse.Namespace(command="simulate", output="unused", overwrite=False), load_config(None))
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
    assert seen["term"] is seen["int"] is cli._interrupt
    with pytest.raises(KeyboardInterrupt):
        cli._interrupt(signal.SIGTERM, None)


def test_simulation_workers_share_the_machine(monkeypatch):
    """One worker per visible GPU (a share of one when there are more workers), the cores
    divided; GPUs counted without torch (CUDA_VISIBLE_DEVICES first)."""
    from fedprompt.config import load_config
    from fedprompt.server.runner import placement, visible_gpus

    two = load_config(None, ["federation.workers=2"])
    assert (placement(two, cpus=16, gpus=2).cpus, placement(two, cpus=16, gpus=2).gpus) == (8, 1.0)
    assert placement(two, cpus=16, gpus=1).gpus == 0.5 and placement(two, cpus=1, gpus=0).cpus == 1
    assert str(placement(two, cpus=16, gpus=2)) == "2 worker(s), each 1 GPU + 8 CPU core(s)"
    assert str(placement(two, cpus=2, gpus=0)) == "2 worker(s), each 1 CPU core(s)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert visible_gpus() == 3 and placement(load_config(None, ["model.device=cpu"]), cpus=4).gpus == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0
