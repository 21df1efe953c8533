"""What several test modules share: tiny-run overrides, starting and stopping real
`fedprompt` processes, reading a run's metrics, a federation's certificates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedprompt.report import read_jsonl
from tests.tiny import TINY  # noqa: F401  (re-exported: the e2e tests' overrides)

ROOT = Path(__file__).resolve().parent.parent


def set_args(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def start_fedprompt(args: list[str], log: Path, *, threads: int | None = None, extra_env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    env = dict(os.environ) | (extra_env or {})
    if threads:  # several torch processes share this machine's cores: do not oversubscribe
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "fedprompt", *args], stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)


def wait_for_round(out: Path, rnd: int, procs: list[subprocess.Popen], timeout: float) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if any(r["round"] >= rnd for r in metrics_rows(out)):
            return
        assert all(p.poll() is None for p in procs), "a process died"
        time.sleep(0.5)
    raise AssertionError(f"round {rnd} not reached in {timeout} s")


def metrics_rows(out: Path) -> list[dict]:
    try:
        return read_jsonl(out / "metrics.jsonl")
    except (json.JSONDecodeError, OSError):
        return []


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def make_certs(d: Path, clients: list[str], *, register: bool = True) -> Path:
    """A federation's certificate folder made by `fedprompt certs` (CA, server, client keys)."""
    from fedprompt import certs

    certs.init_ca(d)
    certs.issue_server_cert(d, names=[])
    for name in clients:
        certs.new_client_key(d, name=name)
        if register:
            certs.register(d, name=name)
    return d


def client_tls(certs: Path, name: str) -> list[str]:
    return set_args([f"client.root_certificates={certs / 'ca.crt'}", f"client.auth_key={certs / 'clients' / name}"])
