"""The server's front: the only thing of `fedprompt server` that faces the network.

Flower 1.42's SuperLink serves three APIs on one HTTP port: the Fleet API (`/v1/fleet/...`,
what SuperNodes use), the Control API (`/v1/control/...`: submit a run with its code, register
or unregister node keys, list and stop runs; no login in open-source Flower) and the runtime
API (`/v1/runtime/...`, for the server's own app processes), plus `GET /health`. Whoever
reaches the Control API can run code on the server and on every client. So the SuperLink
listens on 127.0.0.1 only, and this front listens on `server.address` and forwards exactly
`POST /v1/fleet/<route>` and `GET /health`; every other request is answered 403 and logged.

Built on uvicorn + Starlette + httpx, the maintained HTTP stack Flower itself runs on (its
SuperLink serves with uvicorn/Starlette, its SuperNode calls with httpx): no new dependency,
and bodies are streamed both ways, never buffered whole. Where a proxy is already run and
audited (Kubernetes), use it instead (`server.front: external`; deploy/ ships nginx).
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from pathlib import Path

from fedprompt.processes import one_line

# Fleet routes are lowercase words joined by dashes (register-node, pull-messages, ...): a path
# with anything else (dot segments, encoded characters, a second slash) is not a Fleet call.
_FLEET = re.compile(r"/v1/fleet/[a-z]+(-[a-z]+)*")
# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are not forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"}


def allowed(method: str, path: str) -> bool:
    """Whether the front forwards `method path` to the SuperLink."""
    return (method == "POST" and _FLEET.fullmatch(path) is not None) or (method == "GET" and path == "/health")


class Front:
    """Serve `host:port` (TLS with `certfile`/`keyfile`, or plain when None) and forward what
    `allowed` admits to the SuperLink at `upstream` (`https://127.0.0.1:PORT`, verified with
    `cafile`, or `http://...`). `say(text)` gets one line per refused kind of request."""

    def __init__(
        self, host: str, port: int, upstream: str, *, certfile: Path | None = None, keyfile: Path | None = None, cafile: Path | None = None, say=print
    ):
        self.host, self.port, self.upstream = host, port, upstream.rstrip("/")
        self.certfile, self.keyfile, self.cafile, self.say = certfile, keyfile, cafile, say
        self.refused = 0  # requests answered 403 (tests and the log read it)
        self._said: dict[tuple[str, str], float] = {}
        self._server = None
        self._thread: threading.Thread | None = None

    def _log_refusal(self, method: str, path: str, peer: str) -> None:
        self.refused += 1
        shown = one_line(path, 80)  # the path is the requester's text
        key, now = (method, shown), time.monotonic()
        if now - self._said.get(key, -1e9) >= 60.0:  # one line a minute per kind: a scan is no log flood
            self._said[key] = now
            self.say(f"front: refused {one_line(method, 16)} {shown} from {peer} (only the Fleet API faces the network)")

    def _app(self):
        import httpx
        from starlette.background import BackgroundTask
        from starlette.responses import PlainTextResponse, StreamingResponse

        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.cafile)) if self.cafile else False
        # A SuperNode's calls are short; 120 s covers pulling or pushing a large object.
        client = httpx.AsyncClient(
            base_url=self.upstream,
            verify=verify,
            timeout=httpx.Timeout(120.0, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    msg = await receive()
                    if msg["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    elif msg["type"] == "lifespan.shutdown":
                        await client.aclose()
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            if scope["type"] != "http":
                return
            method, path = scope["method"], scope["path"]
            if not allowed(method, path) or scope.get("query_string"):
                peer = scope.get("client") or ("?", 0)
                self._log_refusal(method, path, f"{peer[0]}:{peer[1]}")
                await PlainTextResponse("403 Forbidden: only the Fleet API is served here\n", status_code=403)(scope, receive, send)
                return
            headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in _HOP]

            async def body():
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    yield msg.get("body", b"")
                    if not msg.get("more_body", False):
                        return

            try:
                req = client.build_request(method, path, headers=headers, content=body() if method == "POST" else None)
                up = await client.send(req, stream=True)
            except httpx.HTTPError as e:
                await PlainTextResponse(f"502 Bad Gateway: the SuperLink did not answer ({type(e).__name__})\n", status_code=502)(scope, receive, send)
                return
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            await StreamingResponse(up.aiter_raw(), status_code=up.status_code, headers=out_headers, background=BackgroundTask(up.aclose))(scope, receive, send)

        return app

    def start(self, timeout: float = 30.0) -> None:
        """Listen (in a daemon thread of this process); return once it accepts connections."""
        import uvicorn

        config = uvicorn.Config(
            self._app(),
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            server_header=False,
            date_header=False,
            ssl_certfile=str(self.certfile) if self.certfile else None,
            ssl_keyfile=str(self.keyfile) if self.keyfile else None,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fedprompt-front", daemon=True)
        self._thread.start()
        t0 = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"the front could not listen on {self.host}:{self.port}")
            if time.monotonic() - t0 > timeout:
                raise OSError(f"the front did not start listening on {self.host}:{self.port} within {timeout:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
