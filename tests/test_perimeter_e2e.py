"""The server's port is a perimeter, tested as an attacker would run the attacks: real
`fedprompt server` / `fedprompt client` processes over TLS with client authentication, and
Flower's own CLI (`flwr`) in the hands of a third party, or of a compromised server."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from fedprompt.processes import binary, env, free_port
from tests.helpers import TINY, client_tls, make_certs, metrics_rows, set_args, start_fedprompt, stop_all, wait_for_round
from tests.tiny import tiny_folder

pytestmark = pytest.mark.slow

# The foreign app claims fedprompt's own identity (publisher, name, version): only its bundle
# hash gives it away. Its ClientApp would write a marker; its ServerApp reports the replies.
FOREIGN_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedprompt-app"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedprompt"

[tool.flwr.app.components]
serverapp = "foreignmod:server"
clientapp = "foreignmod:client"

[tool.flwr.app.config]
marker = ""
report = ""
"""
FOREIGN_PY = """import json, time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def train(msg, context):
    Path(str(context.run_config["marker"])).write_text(f"foreign code ran on node {context.node_id}")
    return Message(RecordDict({"config": ConfigRecord({"pwned": 1})}), reply_to=msg)


@server.main()
def main(grid, context):
    nodes, t0 = [], time.time()
    while not nodes and time.time() - t0 < 120:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    msgs = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    Path(str(context.run_config["report"])).write_text(json.dumps(
        [{"error": r.has_error(), "reason": r.error.reason if r.has_error() else ""} for r in replies]))
"""


def _foreign_app(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "pyproject.toml").write_text(FOREIGN_TOML)
    (d / "foreignmod.py").write_text(FOREIGN_PY)
    return d


def _flwr(home: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([binary("flwr"), *args], capture_output=True, text=True, timeout=timeout, env=env(home))


def _connection(home: Path, address: str, ca: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\nroot-certificates = "{ca}"\n')
    return home


def _run_id(out: Path) -> str:
    """The Flower run id of the federation writing `out` (from its `flwr run` log)."""
    log = (out / "logs" / "run.log").read_text()
    return next(w for line in log.splitlines() if "Successfully started run" in line for w in line.split() if w.isdigit())


def _federation(tmp_path: Path, name: str, extra_server: list[str] = ()) -> tuple[list[subprocess.Popen], Path, str, Path]:
    """A TLS server (3 rounds) and one registered client; (processes, run dir, address, certs)."""
    d = tmp_path / name
    d.mkdir()
    port, out = free_port(), d / "run"
    certs = make_certs(d / "certs", ["client-0"])
    common = set_args(
        [
            f"model.name={tiny_folder('bert')}",
            *TINY,
            "federation.rounds=3",
            "data.partition=iid",
            "federation.num_clients=1",
            "federation.min_clients=1",
            "federation.fraction_fit=1.0",
            "federation.round_timeout=120",
        ]
    )
    addr = f"127.0.0.1:{port}"
    server = start_fedprompt(
        ["server", *common, *set_args([f"server.address={addr}", f"server.certs_dir={certs}", *extra_server]), "--output", str(out)],
        d / "server.log",
        threads=1,
    )
    client = start_fedprompt(
        ["client", *common, *client_tls(certs, "client-0"), "--server", addr, "--partition-id", "0", "--num-partitions", "1"], d / "client.log", threads=1
    )
    return [server, client], out, addr, certs


def _finish(procs: list[subprocess.Popen], out: Path, log: Path, timeout: float = 600) -> list[dict]:
    try:
        assert procs[0].wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        stop_all(procs)
    return metrics_rows(out)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("undisturbed")
    procs, out, _, _ = _federation(tmp, "ref")
    return _finish(procs, out, tmp / "ref" / "server.log")


def test_a_third_party_with_the_ca_and_network_reach_is_refused_everything(tmp_path, undisturbed):
    """Submit a foreign app, register its own node key, unregister the honest node, list runs,
    stop the run: each refused at the front (403), and the federation ends exactly as an
    undisturbed one."""
    procs, out, addr, certs = _federation(tmp_path, "fed")
    from fedprompt import certs as c

    c.new_client_key(tmp_path / "fed" / "certs", name="intruder")  # a valid key, never registered
    intruder = tmp_path / "fed" / "certs" / "clients" / "intruder.pub"
    app = _foreign_app(tmp_path / "foreign")
    home = _connection(tmp_path / "attacker", addr, certs / "ca.crt")
    try:
        wait_for_round(out, 1, procs, timeout=300)  # the federation is under way
        run_id = _run_id(out)
        server_log = (tmp_path / "fed" / "server.log").read_text()
        node_id = server_log.split("registered (node ")[1].split(")")[0]
        attempts = {
            "run": ["run", str(app), "target"],
            "register": ["supernode", "register", str(intruder), "target"],
            "unregister": ["supernode", "unregister", node_id, "target"],
            "ls": ["ls", "target"],
            "stop": ["stop", run_id, "target"],
        }
        for what, args in attempts.items():
            r = _flwr(home, *args)
            assert r.returncode != 0, f"flwr {what} succeeded from outside: {r.stdout[-1500:]}"
    finally:
        rows = _finish(procs, out, tmp_path / "fed" / "server.log")
    log = (tmp_path / "fed" / "server.log").read_text()
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/control/unregister-node", "/v1/control/list-runs", "/v1/control/stop-run"):
        assert f"refused POST {path}" in log, (path, log[-3000:])
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["digest"] for r in rows[1:]] == [r["digest"] for r in undisturbed[1:]]
    assert rows[-1]["accuracy"] == undisturbed[-1]["accuracy"]
    assert "\x1b[" not in log


def test_a_client_runs_none_of_a_foreign_apps_code_and_goes_on_serving(tmp_path, undisturbed):
    """The server is compromised: on its own host it submits an app that claims to be
    fedprompt (same publisher, name and version) to the client's node. The client runs none of
    its code (no marker), answers with an error naming the run, and finishes the fedprompt run
    exactly as an undisturbed one."""
    link = free_port()
    procs, out, _, certs = _federation(tmp_path, "fed", [f"server.superlink_port={link}"])
    app = _foreign_app(tmp_path / "foreign")
    marker, report = tmp_path / "marker.txt", tmp_path / "report.json"
    home = _connection(tmp_path / "operator", f"127.0.0.1:{link}", certs / "ca.crt")  # loopback: the server host
    try:
        wait_for_round(out, 1, procs, timeout=300)  # the federation is under way
        r = _flwr(home, "run", str(app), "target", "--run-config", f'marker="{marker}" report="{report}"')
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        t0 = time.monotonic()
        while not report.exists():
            assert time.monotonic() - t0 < 300, "the foreign ServerApp got no reply"
            time.sleep(0.5)
        replies = json.loads(report.read_text())
    finally:
        rows = _finish(procs, out, tmp_path / "fed" / "server.log")
    assert not marker.exists(), marker.read_text()
    assert replies and all(r["error"] for r in replies), replies
    assert all("fedprompt client refuses run" in r["reason"] and "bundle sha256" in r["reason"] for r in replies), replies
    client_log = (tmp_path / "fed" / "client.log").read_text()
    assert "refused run" in client_log and "none of its code runs here" in client_log
    assert [r["digest"] for r in rows[1:]] == [r["digest"] for r in undisturbed[1:]]


def test_a_run_stopped_on_the_server_host_says_so_plainly(tmp_path):
    """`flwr stop` is for the server host only (loopback); a run stopped there ends the server
    with one plain line that says who can do that and how to resume, no colour codes."""
    link = free_port()
    procs, out, _, certs = _federation(tmp_path, "fed", [f"server.superlink_port={link}"])
    home = _connection(tmp_path / "operator", f"127.0.0.1:{link}", certs / "ca.crt")
    log = tmp_path / "fed" / "server.log"
    try:
        wait_for_round(out, 1, procs, timeout=300)  # the federation is under way
        run_id = _run_id(out)
        r = _flwr(home, "stop", run_id, "target")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert procs[0].wait(timeout=120) == 2, log.read_text()[-3000:]
    finally:
        stop_all(procs)
    text = log.read_text()
    assert "fedprompt: error: federated run stopped: someone on the server host stopped it with `flwr stop`" in text, text[-2000:]
    assert "\x1b[" not in text and "Traceback" not in text
