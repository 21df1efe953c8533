"""Untrusted participants over the real wire: a TLS + client-authentication `fedprompt server`
and three `fedprompt client` processes, one of them changed by the test to lie (its installed
fedprompt patched as it is imported, tests/lies/sitecustomize.py), and a server changed to
send a crafted global to evaluate in its last round. Each lie meets its defence under the defaults."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedprompt.processes import free_port
from tests.helpers import ROOT, TINY, client_tls, make_certs, metrics_rows, set_args, start_fedprompt, stop_all
from tests.tiny import tiny_folder

pytestmark = pytest.mark.slow

LIES = ROOT / "tests" / "lies"


def _lying(kind: str):
    """start_fedprompt's environment for a process that lies as `kind`."""
    return {"PYTHONPATH": os.pathsep.join([str(LIES), os.environ.get("PYTHONPATH", "")]), "FEDPROMPT_TEST_LIE": kind}


def _partition(i: int) -> list[str]:
    return ["--partition-id", str(i), "--num-partitions", "3"]


def _records(d: Path) -> list[dict]:
    return [json.loads(x) for f in sorted(d.glob("record-*.jsonl")) for x in f.read_text().splitlines()]


def test_one_lying_client_and_a_lying_server_meet_the_defaults(tmp_path):
    port, out = free_port(), tmp_path / "run"
    names = ["honest-0", "honest-1", "liar"]
    certs = make_certs(tmp_path / "certs", names)
    common = set_args(
        [
            f"model.name={tiny_folder('bert')}",
            *TINY,
            "federation.rounds=3",
            "data.partition=iid",
            "federation.num_clients=3",
            "federation.min_clients=3",
            "federation.fraction_fit=1.0",
            "federation.fraction_evaluate=1.0",
        ]
    )
    addr = f"127.0.0.1:{port}"
    server = start_fedprompt(
        ["server", *common, *set_args([f"server.address={addr}", f"server.certs_dir={certs}"]), "--output", str(out)],
        tmp_path / "server.log",
        threads=1,
        extra_env=_lying("server"),
    )
    clients = [
        start_fedprompt(
            ["client", *common, *client_tls(certs, name), *set_args([f"client.state_dir={tmp_path / name}"]), "--server", addr, *_partition(i)],
            tmp_path / f"{name}.log",
            threads=1,
            extra_env=_lying("client") if name == "liar" else None,
        )
        for i, name in enumerate(names)
    ]
    try:
        assert server.wait(timeout=900) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        stop_all([server, *clients])
    console = (tmp_path / "server.log").read_text()
    log = (out / "logs" / "run.log").read_text()  # the round loop's own lines; the console shows them as notes
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3], console[-3000:]
    liar = next(n for n, v in rows[1]["fed_nodes"].items() if v["examples"] == 10**9)
    honest = sorted(n for n in rows[1]["fed_nodes"] if n != liar)

    # Round 0 is the honest clients' seeded payload, whoever answered first; the liar is named.
    sent = {r["sent"] for name in names[:2] for r in _records(tmp_path / name) if r["kind"] == "init"}
    assert sent == {rows[0]["digest"]}
    assert f"node {liar} answered a different initial payload" in log

    # Round 1: the inflated count weighs what the median claim weighs, and is named.
    w = rows[1]["weights"]
    assert w[liar] == sorted(w.values())[1] and f"node {liar} claims " in log and "weighed as" in log
    assert f"note: round 1: node {liar} claims " in console
    assert f"node {liar} sent metric(s) no fedprompt client sends, dropped: 'leak'" in log

    # Every round: the reported accuracy is bounded by the honest clients' own figures.
    for r in rows[:3]:
        figures = [r["fed_nodes"][n]["accuracy"] for n in honest if n in r["fed_nodes"]]
        if len(r["fed_nodes"]) == 3:
            assert min(figures) <= r["accuracy"] <= max(figures), r
        assert r["fed_nodes"].get(liar, {"accuracy": 1.0})["accuracy"] == 1.0

    # Round 2: a NaN training loss rejects the liar's reply, by node.
    assert f"round 2: rejected: node {liar}: metric 'train_loss' is nan" in log
    assert rows[2]["clients"] == 2 and rows[2]["failures"] == 1

    # Round 3: the liar hangs; the round waits a bounded time derived from rounds 1-2 and goes on.
    assert rows[3]["clients"] == 2 and "round 3: 1 of 3 sampled clients did not reply within" in log and f"node(s) {liar}" in log
    bound = 3 * max(rows[1]["train_s"], rows[2]["train_s"]) + 10
    assert rows[3]["train_s"] < bound + 15, (rows[3]["train_s"], bound)

    # Round 3's evaluation: the server's crafted global is refused by every honest client, with
    # the reason (the liar, still busy, is not asked).
    assert rows[3]["accuracy"] is None and "fed_nodes" not in rows[3]
    for node in honest:
        assert f"round 3: node {node} failed the evaluation: GlobalRefused: refuses the global of round 3" in log
    for name in names[:2]:
        assert "refuses the global of round 3" in (tmp_path / f"{name}.log").read_text()
        records = _records(tmp_path / name)
        refused = [r for r in records if r.get("refused")]
        assert [(r["round"], r["kind"]) for r in refused] == [(3, "evaluate")] and "client.max_global_norm_factor" in refused[0]["refused"]
        fits = [r for r in records if r["kind"] == "fit"]
        assert [r["round"] for r in fits] == [1, 2, 3]
        # The record audits the server: what each round sent is the global its log says.
        assert all(r["received"] == rows[r["round"] - 1]["digest"] and r["sent"] for r in fits)
