"""Flower's processes (SuperLink, SuperNode, `flwr run`) as supervised subprocesses.

Flower has no supported in-process API to start them, so fedprompt runs its binaries. Each
is started with the parent-death signal set (a killed fedprompt takes its Flower processes
with it), with telemetry and update checks off, and is stopped with its whole process tree
(SuperLink and SuperNode start SuperExec and app processes of their own).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

from fedprompt.errors import UserError

APP_DIR = Path(__file__).parent / "flower_app"  # the Flower App that `flwr run` submits
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # telemetry and update checks try to reach the internet
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # SuperExec checks for work to launch every second by default: 0.2 s cuts the wait for each
    # ClientApp/ServerApp process at almost no CPU cost.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences a Ray FutureWarning on every worker
    "RAY_DEDUP_LOGS": "0",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
}


# Every process we start, and every process those start (Ray daemonises some of its own, out
# of the process tree), inherits this tag in its environment: `reap` finds them all by it.
TAG_VAR, TAG = "FEDPROMPT_PROCESS_TAG", uuid.uuid4().hex


class ProcessError(UserError, RuntimeError):
    """A Flower process could not be started or died (the message quotes its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_address(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProcessError(f"{what}: {address!r} is not HOST:PORT (for example 0.0.0.0:9092)")
    return host.strip("[]"), int(port)


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on host:port (connections of a killed server lingering in
    TIME_WAIT do not count: the SuperLink binds with SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def binary(name: str) -> str:
    """A Flower console script of the environment fedprompt runs in."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    e = {**os.environ, **QUIET_ENV, **extra, TAG_VAR: TAG}
    # SuperLink and SuperNode start `flower-superexec` and app processes by name: from here.
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    if flwr_home is not None:
        e["FLWR_HOME"] = str(flwr_home)
    return e


def spawn(args: list[str], *, log: Path, environ: dict[str, str]) -> subprocess.Popen:
    """Start `args` with stdout and stderr to `log` (appended)."""
    with open(log, "ab") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environ, preexec_fn=_die_with_parent)


def spawn_piped(args: list[str], *, environ: dict[str, str]) -> subprocess.Popen:
    """Start `args` with pipes to its stdin and from its stdout (binary, unbuffered), its
    stderr shared with this process's."""
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environ, bufsize=0, preexec_fn=_die_with_parent)


# Terminal control sequences (colours, cursor moves) that Flower's logs carry: never in our messages.
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")


def plain(text: str) -> str:
    """`text` without terminal control sequences."""
    return _ANSI.sub("", text)


def one_line(text: str, limit: int = 300) -> str:
    """Untrusted text (a participant's error, a request path, another program's output) as one
    printable line of at most `limit` characters: no control sequences, newlines or megabytes."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in plain(str(text)[:100_000])).split())
    return text if len(text) <= limit else text[:limit] + "..."


def tail(log: Path, lines: int = 5) -> str:
    """The last `lines` non-empty lines of `log`, joined by " | ", without colour codes."""
    try:
        text = plain(log.read_text(encoding="utf-8", errors="replace")).strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in [t for t in text if t.strip()][-lines:])


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate `proc` and every process it started, then kill what is left."""
    if proc is None:
        return
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    if proc.poll() is None:
        proc.wait(timeout)


def reap() -> None:
    """Kill whatever is left of the processes this process started (by their tag)."""
    me, left = os.getpid(), []
    for p in psutil.process_iter():
        try:
            if p.pid != me and p.environ().get(TAG_VAR) == TAG:
                p.kill()
                left.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    psutil.wait_procs(left, timeout=10)


def wait_listening(host: str, port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60.0) -> None:
    """Block until `host:port` accepts connections, or raise if `proc` died or time ran out."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise ProcessError(f"{what} exited with status {proc.returncode}: {tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise ProcessError(f"{what} did not start listening on {host}:{port} within {timeout:.0f} s: {tail(log)}")


def start_superlink(host: str, port: int, *, simulation: bool, flwr_home: Path, log: Path, tls: dict[str, Path] | None = None) -> subprocess.Popen:
    """A SuperLink serving its Fleet, Control and Runtime APIs on `host:port`. Runtime
    dependency installation is off: the app's code is this installed package. With `tls`
    (ca, cert, key files) it serves HTTPS and admits only registered SuperNodes; without,
    plain HTTP (a simulation's private loopback link, or `--insecure`)."""
    args = [binary("flower-superlink"), "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if tls:
        args += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth"]
    else:
        args.append("--insecure")
    if simulation:
        args.append("--simulation")
    proc = spawn(args, log=log, environ=env(flwr_home))
    wait_listening(host, port, proc, log, "flower-superlink")
    return proc


def write_connection(flwr_home: Path, address: str, *, root_certificates: Path | None = None) -> None:
    """A Flower config with one SuperLink connection, "fedprompt", to `address` (TLS trusting
    `root_certificates`, or plain)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    trust = f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates else "insecure = true"
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "fedprompt"\n\n[superlink.fedprompt]\naddress = "{address}"\n{trust}\n', encoding="utf-8")


def _toml(v: int | float | bool | str) -> str:
    return str(v).lower() if isinstance(v, bool) else (str(v) if isinstance(v, int | float) else f'"{v}"')


def submit(
    flwr_home: Path, run_config: dict[str, int | bool | str], *, log: Path, federation_config: dict[str, int | float | bool | str] | None = None
) -> subprocess.Popen:
    """`flwr run` of the fedprompt Flower App; it streams the run's log to `log` and exits
    when the run ends."""
    args = [binary("flwr"), "run", str(APP_DIR), "fedprompt", "--stream", "--run-config", " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())]
    return spawn(args, log=log, environ=env(flwr_home))


def was_stopped(flwr_home: Path, run_log: Path) -> bool:
    """Whether the run that `flwr run` logged to `run_log` was stopped (`flwr stop`), as the
    SuperLink of the connection in `flwr_home` records it."""
    try:
        found = re.search(r"Successfully started run (\d+)", plain(run_log.read_text(encoding="utf-8", errors="replace")))
        if found is None:
            return False
        r = subprocess.run(
            [binary("flwr"), "ls", "--run-id", found.group(1), "--format", "json"], capture_output=True, text=True, timeout=30, env=env(flwr_home)
        )
        runs = json.loads(r.stdout[r.stdout.find("{") :]).get("runs", [])
    except (OSError, ValueError, subprocess.SubprocessError):
        return False
    return any(str(run.get("status", "")).endswith(":stopped") for run in runs)


def start_supernode(
    superlink: str, *, runtime_port: int, secret_file: Path, flwr_home: Path, log: Path, root_certificates: str | None = None, auth_key: str | None = None
) -> subprocess.Popen:
    """A SuperNode connected to `superlink` (retrying for ever) that executes nothing itself
    (`--isolation process`): it queues each message's task on its runtime API at
    127.0.0.1:`runtime_port`, where only the holder of `secret_file` takes them (executor.py).
    Over TLS trusting `root_certificates` and authenticated by `auth_key`, or plain when both
    are None (`--insecure`)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    args = [
        binary("flower-supernode"),
        "--superlink",
        superlink,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--superexec-auth-secret-file",
        str(secret_file),
    ]
    if root_certificates:
        args += ["--root-certificates", root_certificates, "--auth-supernode-private-key", str(auth_key)]
    else:
        args.append("--insecure")
    return spawn(args, log=log, environ=env(flwr_home))
