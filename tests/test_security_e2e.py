"""TLS and client authentication with real processes on loopback: the default deployment."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedprompt.processes import free_port
from tests.helpers import TINY, client_tls, make_certs, metrics_rows, set_args, start_fedprompt, stop_all, wait_for_round
from tests.tiny import tiny_folder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _wait_exit(p: subprocess.Popen, timeout: float) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return -999


def test_tls_server_admits_registered_clients_only_and_revocation_takes_effect(tmp_path):
    """Registered clients train over TLS. A client with a valid key that was never registered
    is refused with a clear error while the run goes on; so are a client that does not trust
    the server's CA and a plain one. A key revoked while the server runs is unregistered and
    the rounds go on without that client."""
    port, out = free_port(), tmp_path / "run"
    certs = make_certs(tmp_path / "certs", ["client-0", "client-1"])
    make_certs(tmp_path / "other", [])  # another federation's CA
    from fedprompt import certs as c

    c.new_client_key(certs, name="stranger")  # a valid key in the right format, never registered
    common = set_args(
        [
            f"model.name={tiny_folder('bert')}",
            *TINY,
            "federation.rounds=40",
            "data.partition=iid",
            "federation.num_clients=2",
            "federation.min_clients=1",
            "federation.fraction_fit=1.0",
            "federation.round_timeout=30",
        ]
    )
    addr = f"127.0.0.1:{port}"
    server = start_fedprompt(
        ["server", *common, *set_args([f"server.address={addr}", f"server.certs_dir={certs}"]), "--output", str(out)], tmp_path / "server.log"
    )
    client = lambda pid, extra, log: start_fedprompt(  # noqa: E731
        ["client", *common, *extra, "--server", addr, "--partition-id", str(pid), "--num-partitions", "2"], tmp_path / log, threads=1
    )
    # The stranger's grace: long enough to still be waiting when the registered clients start.
    stranger = client(0, [*client_tls(certs, "stranger"), *set_args(["client.registration_grace_s=30"])], "stranger.log")
    untrusting = client(
        1, set_args([f"client.root_certificates={tmp_path / 'other' / 'ca.crt'}", f"client.auth_key={certs / 'clients' / 'client-1'}"]), "untrusting.log"
    )
    plain = client(1, ["--insecure"], "plain.log")
    procs = [server, stranger, untrusting, plain]
    try:
        # The bad clients are refused by themselves, with the reason, and exit 2.
        assert _wait_exit(untrusting, 300) == 2, (tmp_path / "untrusting.log").read_text()[-2000:]
        assert "is not trusted" in (tmp_path / "untrusting.log").read_text()
        assert _wait_exit(plain, 300) == 2, (tmp_path / "plain.log").read_text()[-2000:]
        assert "speaks TLS" in (tmp_path / "plain.log").read_text()
        assert server.poll() is None and all(r["round"] == 0 for r in metrics_rows(out))  # nothing ran without registered clients
        # The registered clients start while the stranger still waits out its grace (75 s by
        # default, for a server that may still be registering keys): it never serves a round.
        good = [client(i, client_tls(certs, f"client-{i}"), f"client{i}.log") for i in range(2)]
        procs += good
        assert _wait_exit(stranger, 300) == 2, (tmp_path / "stranger.log").read_text()[-2000:]
        stranger_log = (tmp_path / "stranger.log").read_text()
        assert "not registered" in stranger_log and " fit: " not in stranger_log and " evaluate: " not in stranger_log
        t0 = time.monotonic()
        while not any(r["round"] >= 1 and r["clients"] == 2 for r in metrics_rows(out)):  # both registered clients trained
            assert all(p.poll() is None for p in [server, *good]), (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 600, "no round with both clients"
            time.sleep(0.5)
        c.revoke(certs, name="client-1")
        t0 = time.monotonic()
        while "client 'client-1' revoked" not in (tmp_path / "server.log").read_text():
            assert time.monotonic() - t0 < 60, (tmp_path / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        n = metrics_rows(out)[-1]["round"]
        wait_for_round(out, n + 3, [server, good[0]], timeout=600)
        assert all(r["clients"] == 1 for r in metrics_rows(out)[n + 2 :])  # the revoked client is out
    finally:
        stop_all(procs)
    log = (tmp_path / "server.log").read_text()
    assert "client 'client-0' registered" in log and "client 'client-1' registered" in log and "stranger" not in log
    assert "WARNING" not in log


def test_the_server_refuses_to_start_without_tls_unless_told_insecure(tmp_path):
    base = [sys.executable, "-m", "fedprompt", "server", *set_args([f"model.name={tiny_folder('bert')}", *TINY, f"server.address=127.0.0.1:{free_port()}"])]
    r = subprocess.run([*base, "--output", str(tmp_path / "a")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "requires TLS" in r.stderr and "--insecure" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "a").exists()
    r = subprocess.run([sys.executable, "-m", "fedprompt", "client", "--server", "127.0.0.1:1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "requires TLS" in r.stderr and r.stderr.count("\n") == 1
