"""The server's front (fedprompt/server/front.py) against a real HTTP upstream: it forwards
exactly the Fleet API and /health, bodies and headers intact, and refuses everything else."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fedprompt.client.executor import AppIdentity, mismatch
from fedprompt.processes import free_port
from fedprompt.server.front import Front, allowed


class _Echo(BaseHTTPRequestHandler):
    """The stand-in SuperLink: answers every request with what it received."""

    seen: list[str] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).seen.append(f"{self.command} {self.path}")
        out = json.dumps({"path": self.path, "body": body.decode("latin-1"), "sig": self.headers.get("x-sig", "")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def front():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    said: list[str] = []
    f = Front("127.0.0.1", free_port(), f"http://127.0.0.1:{upstream.server_address[1]}", say=said.append)
    f.start()
    yield f, said
    f.stop()
    upstream.shutdown()


def _call(port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.read()


def test_the_fleet_api_and_health_pass_with_body_and_headers_intact(front):
    f, _ = front
    body = bytes(range(256)) * 1000  # binary protobuf-like bytes, 256 KB
    status, out = _call(f.port, "POST", "/v1/fleet/pull-messages", body, {"x-sig": "abc", "content-type": "application/protobuf"})
    assert status == 200
    got = json.loads(out)
    assert got["path"] == "/v1/fleet/pull-messages" and got["body"].encode("latin-1") == body and got["sig"] == "abc"
    assert _call(f.port, "GET", "/health")[0] == 200


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/stop-run"),
        ("POST", "/v1/runtime/pull-messages"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet//x"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("POST", "/v1/fleet/pull-messages?next=/v1/control"),
        ("POST", "/V1/fleet/pull-messages"),
        ("GET", "/v1/fleet/pull-messages"),
        ("PUT", "/v1/fleet/push-messages"),
        ("POST", "/health"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/"),
    ],
)
def test_everything_else_is_refused_and_never_reaches_the_superlink(front, method, path):
    f, said = front
    before, seen = f.refused, len(_Echo.seen)
    status, _ = _call(f.port, method, path, b"x" if method != "GET" else b"")
    assert status == 403
    assert f.refused == before + 1 and len(_Echo.seen) == seen
    assert any("refused" in s and "only the Fleet API" in s for s in said)


def test_allowed_is_an_allowlist():
    assert allowed("POST", "/v1/fleet/register-node") and allowed("GET", "/health")
    assert not allowed("POST", "/v1/fleet/") and not allowed("POST", "/v1/fleet/a/b") and not allowed("POST", "/v1/fleet/x.y")


def test_a_dead_superlink_is_a_502_not_a_hang():
    f = Front("127.0.0.1", free_port(), f"http://127.0.0.1:{free_port()}", say=lambda s: None)
    f.start()
    try:
        assert _call(f.port, "POST", "/v1/fleet/pull-messages", b"x")[0] == 502
    finally:
        f.stop()


def test_a_client_accepts_only_its_own_app():
    import hashlib

    content = b"bundle"
    mine = AppIdentity("fedprompt/fedprompt-app", "1.0.0", hashlib.sha256(content).hexdigest())
    assert mismatch(mine, "fedprompt/fedprompt-app", "1.0.0", content) is None
    assert "is not 'fedprompt/fedprompt-app'" in mismatch(mine, "evil/fedprompt-app", "1.0.0", content)
    assert "is not 'fedprompt/fedprompt-app'" in mismatch(mine, "fedprompt/other", "1.0.0", content)
    assert "version '2.0.0'" in mismatch(mine, "fedprompt/fedprompt-app", "2.0.0", content)
    assert "bundle sha256" in mismatch(mine, "fedprompt/fedprompt-app", "1.0.0", content + b"\n")


def test_the_installed_app_identity_is_what_flwr_run_submits():
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    from fedprompt.client.executor import installed_app
    from fedprompt.processes import APP_DIR

    me = installed_app()
    assert me.fab_id == "fedprompt/fedprompt-app"
    assert me.fab_hash == hashlib.sha256(build_fab_from_disk(APP_DIR)).hexdigest() == installed_app().fab_hash


def test_a_participants_error_text_is_logged_as_one_short_plain_line():
    from types import SimpleNamespace

    from fedprompt.wire import error_reason

    hostile = SimpleNamespace(error=SimpleNamespace(reason="\x1b[92mINFO\x1b[0m: bad\nthing\r\x07" + "x" * 10_000))
    text = error_reason(hostile)
    assert text.startswith("INFO: bad thing") and "\x1b" not in text and "\n" not in text and len(text) <= 303


def test_a_refused_path_is_logged_as_plain_text(front):
    """The path is the requester's text: terminal escapes and newlines never reach the log."""
    f, said = front
    assert _call(f.port, "POST", "/v1/control/%1b[31mred%0aforged-line", b"x")[0] == 403
    line = next(s for s in said if "red" in s)
    assert "\x1b" not in line and "\n" not in line and "forged-line" in line
