"""The client's probe of a server before it starts a SuperNode, against real SuperLinks."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedprompt import certs as c
from fedprompt import processes, security
from fedprompt.processes import free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """The federation's certificates; its parent also holds another federation's CA."""
    root = tmp_path_factory.mktemp("pki")
    c.init_ca(root / "certs")
    c.issue_server_cert(root / "certs", names=[])
    c.init_ca(root / "other")
    return root / "certs"


def _superlink(tmp: Path, tls: dict | None):
    port = free_port()
    proc = processes.start_superlink("127.0.0.1", port, simulation=False, flwr_home=tmp / "flwr", log=tmp / "link.log", tls=tls)
    return proc, f"127.0.0.1:{port}"


def test_nothing_listening_is_not_yet_never_a_go():
    """No server yet: the client waits (a SuperNode started now could meet a TLS server plainly
    and retry for ever without a word)."""
    addr = f"127.0.0.1:{free_port()}"
    assert security.check_server(addr, root_certificates=None) is security.NOT_YET
    assert security.check_server(addr, root_certificates="/nonexistent/ca.crt") is security.NOT_YET


def test_tls_server_probe(pki, tmp_path):
    proc, addr = _superlink(tmp_path, security.server_files(str(pki)))
    try:
        assert security.check_server(addr, root_certificates=str(pki / "ca.crt")) is None
        why = security.check_server(addr, root_certificates=None)  # a plain client
        assert why and why is not security.NOT_YET and "speaks TLS" in why
        why = security.check_server(addr, root_certificates=str(pki.parent / "other" / "ca.crt"))
        assert why and "is not trusted" in why
    finally:
        processes.stop(proc)


def test_plain_server_probe(pki, tmp_path):
    proc, addr = _superlink(tmp_path, None)
    try:
        assert security.check_server(addr, root_certificates=None) is None
        why = security.check_server(addr, root_certificates=str(pki / "ca.crt"))
        assert why and "does not speak TLS" in why
    finally:
        processes.stop(proc)
