"""The manifests' commands really work: the rendered cpu overlay's server and client
containers (command, args, environment, mounted Secrets and ConfigMaps) started as local
processes, the Service name resolved to 127.0.0.1, complete a round over TLS with client
authentication on the real MiniLM backbone."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import yaml

from fedprompt.federation.processes import free_port
from fedprompt.report import read_jsonl
from tests.k8slocal import local_specs
from tests.test_deploy import SHIPPED_CONFIG, _render, pki_deploy  # noqa: F401 (a fixture)
from tests.test_federation_e2e import _stop

pytestmark = pytest.mark.slow


def _quick(config: dict) -> dict:
    """The shipped config cut to one short round (the smoke test checks the plumbing)."""
    config["federation"].update(rounds=1, local_steps=3)
    config["model"]["max_length"] = 32
    config.setdefault("train", {})["max_eval_examples"] = 32
    return config


def _argv(spec: dict, port: int) -> list[str]:
    out = []
    for a in spec["argv"]:
        a = a.replace("server.address=0.0.0.0:9092", f"server.address=127.0.0.1:{port}")  # a free port, loopback
        out.append("127.0.0.1:%d" % port if a == "fedprompt-server:9092" else a)  # the Service, resolved
    return out


def _start(spec: dict, port: int, log) -> subprocess.Popen:
    env = {**os.environ, **spec["env"], "FEDPROMPT_CACHE": os.environ.get("FEDPROMPT_CACHE", os.path.expanduser("~/.cache/fedprompt"))}
    return subprocess.Popen(_argv(spec, port), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_rendered_manifests_complete_a_round_as_local_processes(pki_deploy, tmp_path):
    copy, _ = pki_deploy
    base = copy / "k8s" / "base"
    (base / "config.yaml").write_text(yaml.safe_dump(_quick(yaml.safe_load(SHIPPED_CONFIG.read_text()))))
    specs = local_specs(_render(copy / "k8s" / "overlays" / "cpu"), tmp_path / "root")
    [server] = [s for s in specs["fedprompt-server"] if not s["init"]]
    clients = [s for s in specs["fedprompt-client"] if not s["init"]]
    assert len(clients) == 2
    port, procs, logs = free_port(), [], {}
    try:
        logs["server"] = open(tmp_path / "server.log", "wb")
        procs.append(_start(server, port, logs["server"]))
        for s in clients:
            logs[s["pod"]] = open(tmp_path / f"{s['pod']}.log", "wb")
            procs.append(_start(s, port, logs[s["pod"]]))
        # --keep-alive: the server finishes the run, then stays up (a Deployment's pod).
        t0 = time.monotonic()
        while "idle until stopped" not in (tmp_path / "server.log").read_text(errors="replace"):
            assert procs[0].poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 900, "the round did not finish"
            time.sleep(1)
        assert all(p.poll() is None for p in procs), "a process died"
    finally:
        _stop(procs)
        for f in logs.values():
            f.close()
    # The run directory is on the server's PVC; each client's state on its own volume.
    run = server["mounts"]["/var/lib/fedprompt"] / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] >= 1
    log = (tmp_path / "server.log").read_text()
    assert "client 'client-0' registered" in log and "client 'client-1' registered" in log
    assert "WARNING: --insecure" not in log
    for s in clients:
        assert "serving 127.0.0.1" in (tmp_path / f"{s['pod']}.log").read_text()
