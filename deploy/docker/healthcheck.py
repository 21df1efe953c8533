"""Container health check of the fedprompt images (Docker HEALTHCHECK; exit 0 = healthy).

One image serves both roles, so the check looks at what runs:
- `fedprompt server ...`: healthy when a TCP connection to the SuperLink port succeeds (the
  port of `--set server.address=HOST:PORT`, else 9092). A TCP connect is all a TLS port
  allows without credentials, and it is what the Kubernetes probes check too.
- `fedprompt client ...`: healthy while that process is alive. Under tini it is not PID 1;
  if it exits, tini exits and the container stops anyway, so this mostly reports a client
  that was never started.
"""

from __future__ import annotations

import socket
import sys

import psutil

DEFAULT_PORT = 9092


def fedprompt_commands() -> list[list[str]]:
    """The argv of every running `fedprompt <command> ...` process (console script or -m)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        for i, word in enumerate(argv[:3]):
            if word.rsplit("/", 1)[-1] == "fedprompt" and i + 1 < len(argv):
                found.append(argv[i + 1:])
                break
    return found


def server_port(args: list[str]) -> int:
    for i, word in enumerate(args):
        value = args[i + 1] if word == "--set" and i + 1 < len(args) else word.removeprefix("--set=")
        if value.startswith("server.address="):
            return int(value.rsplit(":", 1)[1])
    return DEFAULT_PORT


def main() -> int:
    commands = fedprompt_commands()
    servers = [c for c in commands if c[:1] == ["server"]]
    if servers:
        port = server_port(servers[0])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError as e:
            print(f"fedprompt server: port {port} refuses connections ({e})")
            return 1
        return 0
    if any(c[:1] == ["client"] for c in commands):
        return 0
    print("no fedprompt server or client process is running")
    return 1


if __name__ == "__main__":
    sys.exit(main())
