"""Container health check of the fedprompt images (Docker HEALTHCHECK; exit 0 = healthy).

One image serves both roles, so the check looks at what runs:
- `fedprompt server ...`: healthy when a TCP connection to its port on 127.0.0.1 succeeds:
  the SuperLink's `server.superlink_port` when `server.front` is `external` (a proxy in
  front, as in deploy/k8s, where this is the server container's liveness probe), else the
  port of `server.address` (fedprompt's own front; 9092 by default). Settings come from
  `--set` and the `--config` file. A TCP connect is all a TLS port allows without
  credentials. Also healthy once the run is finished (`summary.json` in `--output`): a
  `--keep-alive` server then idles with nothing listening.
- `fedprompt client ...`: healthy while that process is alive. Under tini it is not PID 1;
  if it exits, tini exits and the container stops anyway, so this mostly reports a client
  that was never started.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import psutil

DEFAULT_PORT = 9092


def fedprompt_commands() -> list[list[str]]:
    """The argv of every running `fedprompt <command> ...` process (console script or -m)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        for i, word in enumerate(argv[:3]):
            if word.rsplit("/", 1)[-1] == "fedprompt" and i + 1 < len(argv):
                found.append(argv[i + 1 :])
                break
    return found


def _option(args: list[str], flag: str) -> str | None:
    for i, word in enumerate(args):
        if word == flag and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(flag + "="):
            return word[len(flag) + 1 :]
    return None


def server_settings(args: list[str]) -> dict[str, str]:
    """The `server.*` settings of a `fedprompt server` command line: its --config file's
    `server:` section, overridden by --set server.KEY=VALUE."""
    settings: dict[str, str] = {}
    config = _option(args, "--config")
    if config:
        try:
            import yaml

            section = (yaml.safe_load(Path(config).read_text()) or {}).get("server") or {}
            settings.update({str(k): str(v) for k, v in section.items()} if isinstance(section, dict) else {})
        except Exception:  # an unreadable config: the server itself reports it
            pass
    for i, word in enumerate(args):
        value = args[i + 1] if word == "--set" and i + 1 < len(args) else word.removeprefix("--set=")
        if value.startswith("server.") and "=" in value:
            key, v = value[len("server.") :].split("=", 1)
            settings[key] = v
    return settings


def server_port(args: list[str]) -> int:
    """The port on 127.0.0.1 that a healthy `fedprompt server <args>` accepts connections on."""
    s = server_settings(args)
    if s.get("front") == "external" and int(s.get("superlink_port") or 0):
        return int(s["superlink_port"])
    if "address" in s:
        return int(s["address"].rsplit(":", 1)[1])
    return DEFAULT_PORT


def finished(args: list[str]) -> bool:
    """Whether the server's --output holds a finished run (what a --keep-alive server idles on)."""
    output = _option(args, "--output")
    return bool(output) and (Path(output) / "summary.json").is_file()


def main() -> int:
    commands = fedprompt_commands()
    servers = [c for c in commands if c[:1] == ["server"]]
    if servers:
        port = server_port(servers[0])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError as e:
            if finished(servers[0]):
                return 0
            print(f"fedprompt server: port {port} refuses connections ({e})")
            return 1
        return 0
    if any(c[:1] == ["client"] for c in commands):
        return 0
    print("no fedprompt server or client process is running")
    return 1


if __name__ == "__main__":
    sys.exit(main())
