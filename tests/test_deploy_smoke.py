"""The manifests' commands really work, as local processes: the rendered containers (command,
args, environment, mounted Secrets and ConfigMaps; tests/k8slocal.py) complete a round over
TLS with client authentication on the real MiniLM backbone, every client's traffic passing
through the server pod's nginx front.

- The cpu overlay: `fedprompt server` (SuperLink on loopback), its nginx front and the two
  in-cluster clients, the Service name resolved to 127.0.0.1.
- Across clusters: the expose overlay (the server and its front) and, rendered separately,
  the silo overlay twice (partition 0 as shipped; partition 1 through a silo's own
  kustomization on top of it, with its own key): the silos dial the front's address.
  Meanwhile the Control and runtime APIs are asked for through the front and refused (403),
  and nothing of the server's process tree listens beyond loopback.

Each pod's ports are moved to free local ports (pods share this machine's loopback here).
nginx is required (CI installs it); without it these tests skip, naming it.
"""

from __future__ import annotations

import http.client
import os
import re
import ssl
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from fedprompt.processes import free_port
from fedprompt.report import read_jsonl
from tests.helpers import stop_all
from tests.k8slocal import local_specs
from tests.test_deploy import PORT, SHIPPED_CONFIG, SUPERLINK_PORT, _render, _spec, need_nginx, pki_deploy  # noqa: F401 (pki_deploy: a fixture)

pytestmark = pytest.mark.slow

ROUND_TIMEOUT = 900  # seconds, for a whole run of one round


def _quick(config: dict) -> dict:
    """The shipped config cut to one short round (the smoke test checks the plumbing)."""
    config["federation"].update(rounds=1, local_steps=3)
    config["model"]["max_length"] = 32
    config.setdefault("train", {})["max_eval_examples"] = 32
    return config


def _quick_deploy(copy: Path) -> None:
    (copy / "k8s" / "components" / "common" / "config.yaml").write_text(yaml.safe_dump(_quick(yaml.safe_load(SHIPPED_CONFIG.read_text()))))


def _server_argv(spec: dict, link_port: int) -> list[str]:
    """The server container's command with the SuperLink and the metrics endpoint on free
    loopback ports (the front's upstream is mapped to the SuperLink's)."""
    argv = [a.replace(f"server.superlink_port={SUPERLINK_PORT}", f"server.superlink_port={link_port}") for a in spec["argv"]]
    assert argv != spec["argv"], "the server container no longer sets server.superlink_port"
    # The metrics endpoint (0.0.0.0:9100 in the pod) on a free loopback port here.
    metrics = [a.replace("server.metrics_address=0.0.0.0:9100", f"server.metrics_address=127.0.0.1:{free_port()}") for a in argv]
    assert metrics != argv, "the server container no longer sets server.metrics_address"
    return metrics


def _client_argv(spec: dict, front_port: int) -> list[str]:
    """A client container's command dialing the front's local port: --server's host (the
    Service name, or a silo's external name) resolved to 127.0.0.1, which the server
    certificate always names."""
    argv = list(spec["argv"])
    i = argv.index("--server") + 1
    assert argv[i].endswith(f":{PORT}"), argv[i]
    argv[i] = f"127.0.0.1:{front_port}"
    return argv


class Pods:
    """Local processes of pods' containers, each with its own log."""

    def __init__(self, folder: Path):
        self.folder, self.procs, self.logs = folder, {}, {}

    def start(self, name: str, argv: list[str], spec: dict) -> None:
        env = {**os.environ, **spec["env"], "FEDPROMPT_CACHE": os.environ.get("FEDPROMPT_CACHE", os.path.expanduser("~/.cache/fedprompt"))}
        # Appending: nginx writes its access log through a file of its own (/dev/stdout) and its
        # error log to the inherited descriptor; without O_APPEND they overwrite each other.
        self.logs[name] = open(self.folder / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=self.logs[name], stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def alive(self) -> None:
        for name, p in self.procs.items():
            assert p.poll() is None, f"{name} exited with {p.returncode}:\n{self.log(name)[-3000:]}"

    def wait_for(self, name: str, text: str, timeout: float = ROUND_TIMEOUT) -> None:
        t0 = time.monotonic()
        while text not in self.log(name):
            self.alive()
            assert time.monotonic() - t0 < timeout, f"{name}: no {text!r} within {timeout} s:\n{self.log(name)[-3000:]}"
            time.sleep(1)

    def stop(self) -> None:
        stop_all(list(self.procs.values()))
        for f in self.logs.values():
            f.close()


def _https(port: int, ca: Path, method: str, path: str, body: bytes = b"") -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=str(ca)), timeout=30)
    try:
        conn.request(method, path, body=body or None, headers={"content-type": "application/protobuf"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _wait_healthy(pods: Pods, front_port: int, ca: Path) -> None:
    """GET /health through the front answers 200: nginx verified the SuperLink's TLS on loopback."""
    t0 = time.monotonic()
    while True:
        pods.alive()
        try:
            if _https(front_port, ca, "GET", "/health") == 200:
                return
        except OSError:
            pass
        assert time.monotonic() - t0 < 120, "GET /health through the front never succeeded:\n" + pods.log("front")[-2000:]
        time.sleep(0.5)


def _assert_round(server_spec: dict, pods: Pods, clients: list[str], keys: list[str]) -> None:
    # The run directory is on the server's PVC.
    run = server_spec["mounts"]["/var/lib/fedprompt"] / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] >= 1
    log = pods.log("server")
    for key in keys:
        assert f"client '{key}' registered" in log
    assert "WARNING: --insecure" not in log
    for name in clients:
        assert "serving 127.0.0.1" in pods.log(name), name
    # Every client call went through the front: its access log has the Fleet calls.
    assert re.search(r'"POST /v1/fleet/[a-z-]+ HTTP/1\.1" 200 ', pods.log("front")), pods.log("front")[-2000:]


def test_rendered_manifests_complete_a_round_as_local_processes(pki_deploy, tmp_path):
    need_nginx()
    copy, pki = pki_deploy
    _quick_deploy(copy)
    front_port, link_port = free_port(), free_port()
    specs = local_specs(_render(copy / "k8s" / "overlays" / "cpu"), tmp_path / "root", ports={PORT: front_port, SUPERLINK_PORT: link_port})
    server, front = _spec(specs, "fedprompt-server", "server"), _spec(specs, "fedprompt-server", "front")
    clients = [s for s in specs["fedprompt-client"] if not s["init"]]
    assert len(clients) == 2
    pods = Pods(tmp_path)
    try:
        pods.start("front", front["argv"], front)
        pods.start("server", _server_argv(server, link_port), server)
        for s in clients:
            pods.start(s["pod"], _client_argv(s, front_port), s)
        # --keep-alive: the server finishes the run, then stays up (a Deployment's pod).
        pods.wait_for("server", "idle until stopped")
        pods.alive()
    finally:
        pods.stop()
    _assert_round(server, pods, [s["pod"] for s in clients], ["client-0", "client-1"])


def _silo_kustomization(folder: Path, silo: Path, partition: int, key: Path) -> Path:
    """A second silo rendered from the same checkout: a kustomization on top of
    overlays/silo that changes only the partition and the key (the ConfigMap and Secret a
    silo fills in are patchable)."""
    folder.mkdir(parents=True)
    (folder / "client.key").write_bytes(key.read_bytes())
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(silo, folder)],
                "configMapGenerator": [{"name": "fedprompt-silo", "behavior": "merge", "literals": [f"PARTITION_ID={partition}"]}],
                "secretGenerator": [{"name": "fedprompt-client-key", "behavior": "replace", "files": ["client.key"]}],
            }
        )
    )
    return folder


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket of a process and its descendants."""
    out = []
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            out += [(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def test_exposed_server_and_separately_rendered_silos_complete_a_round(pki_deploy, tmp_path):
    need_nginx()
    copy, pki = pki_deploy
    _quick_deploy(copy)
    overlays = copy / "k8s" / "overlays"
    front_port, link_port = free_port(), free_port()
    # Three clusters: the server's, and one per silo, each rendered on its own.
    specs = local_specs(_render(overlays / "expose"), tmp_path / "server-cluster", ports={PORT: front_port, SUPERLINK_PORT: link_port})
    server, front = _spec(specs, "fedprompt-server", "server"), _spec(specs, "fedprompt-server", "front")
    assert "fedprompt-client" not in specs  # no client runs in the server's cluster
    silo1 = _silo_kustomization(tmp_path / "silo-1", overlays / "silo", 1, pki / "clients" / "client-1")
    silos = {}
    for name, folder in (("silo-0", overlays / "silo"), ("silo-1", silo1)):
        objects = _render(folder)
        assert not [o for o in objects if o["kind"] == "Deployment"]
        [silos[name]] = local_specs(objects, tmp_path / f"{name}-cluster")["fedprompt-client"]
    assert [s["argv"][s["argv"].index("--partition-id") + 1] for s in silos.values()] == ["0", "1"]
    pods = Pods(tmp_path)
    try:
        pods.start("front", front["argv"], front)
        pods.start("server", _server_argv(server, link_port), server)
        for name, s in silos.items():
            pods.start(name, _client_argv(s, front_port), s)
        _wait_healthy(pods, front_port, pki / "ca.crt")
        # The perimeter, live: what is not the Fleet API never passes the front.
        for method, path in [
            ("POST", "/v1/control/list-runs"),
            ("POST", "/v1/control/start-run"),
            ("POST", "/v1/control/stop-run"),
            ("GET", "/v1/control/list-runs"),
            ("POST", "/v1/runtime/get-nodes"),
            ("POST", "/v1/runtime/pull-messages"),
            ("POST", "/v1/fleet/../control/list-runs"),
            ("GET", "/v1/fleet/get-run"),
        ]:
            assert _https(front_port, pki / "ca.crt", method, path, b"\x00") == 403, (method, path)
        # ... and the server side listens on loopback alone (the front's port is nginx's).
        listening = _listening(pods.procs["server"].pid)
        assert listening and all(ip in ("127.0.0.1", "::1") for ip, _ in listening), listening
        assert (link_port in {p for _, p in listening}) and front_port not in {p for _, p in listening}
        pods.wait_for("server", "idle until stopped")
        pods.alive()
    finally:
        pods.stop()
    _assert_round(server, pods, list(silos), ["client-0", "client-1"])
    refused = re.findall(r'"(\S+) (/v1/(?:control|runtime)/\S+) HTTP/1\.1" 403 ', pods.log("front"))
    assert ("POST", "/v1/control/list-runs") in refused and ("POST", "/v1/runtime/get-nodes") in refused
