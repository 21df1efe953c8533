"""Secure aggregation deployed: a TLS + client-authentication `fedprompt server` and four
`fedprompt client` processes, one of which dies (SIGKILL of its whole process group, the test's
change to that participant, tests/lies/sitecustomize.py) after sending its key shares in round
2. Round 1 matches a plain federation of the same config; round 2 releases the survivors' mean."""

from __future__ import annotations

import os

import pytest

from fedprompt.processes import free_port
from tests.helpers import ROOT, TINY, client_tls, make_certs, metrics_rows, set_args, start_fedprompt, stop_all
from tests.tiny import tiny_folder

pytestmark = pytest.mark.slow

SETS = [
    *TINY,
    "federation.rounds=2",
    "data.partition=iid",
    "federation.num_clients=4",
    "federation.min_clients=4",
    "federation.fraction_fit=1.0",
    "federation.fraction_evaluate=1.0",
    "federation.reject_norm_factor=0",
    "federation.clipping_range=1.0",
    "federation.round_timeout=10",  # the dead client costs the round this, not the run
    "train.lr=0.05",
]


def _plain_round_one(tmp_path) -> dict:
    """Round 1 of the same federation without secure aggregation, in process (both rounds
    run: the learning-rate schedule spans federation.rounds)."""
    from fedprompt.config import load_config
    from fedprompt.local import LocalClient
    from fedprompt.server.app import serve
    from fedprompt.server.localgrid import LocalGrid, client_responder

    cfg = load_config(None, [f"model.name={tiny_folder('bert')}", *SETS])
    client = LocalClient(cfg, num_partitions=4, state_dir=tmp_path / "plain-state")
    (tmp_path / "plain").mkdir()
    serve(LocalGrid({i: client_responder(client, i) for i in range(4)}), cfg, tmp_path / "plain", centralized=False)
    return metrics_rows(tmp_path / "plain")[1]


def test_a_secure_deployment_over_tls_matches_plain_and_survives_a_client_killed_after_its_keys(tmp_path):
    port, out = free_port(), tmp_path / "run"
    names = ["silo-0", "silo-1", "silo-2", "dies"]
    certs = make_certs(tmp_path / "certs", names)
    common = set_args([f"model.name={tiny_folder('bert')}", *SETS, "federation.secure_aggregation=true"])
    addr = f"127.0.0.1:{port}"
    server = start_fedprompt(
        ["server", *common, *set_args([f"server.address={addr}", f"server.certs_dir={certs}"]), "--output", str(out)], tmp_path / "server.log", threads=1
    )
    dying = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "lies"), os.environ.get("PYTHONPATH", "")]), "FEDPROMPT_TEST_LIE": "die-after-keys"}
    clients = [
        start_fedprompt(
            ["client", *common, *client_tls(certs, name), *set_args([f"client.state_dir={tmp_path / name}"]), "--server", addr]
            + ["--partition-id", str(i), "--num-partitions", "4"],
            tmp_path / f"{name}.log",
            threads=1,
            extra_env=dying if name == "dies" else None,
        )
        for i, name in enumerate(names)
    ]
    try:
        assert server.wait(timeout=600) == 0, (tmp_path / "server.log").read_text()[-3000:]
        dead = clients[-1].wait(timeout=30)
    finally:
        stop_all([server, *clients])
    rows = metrics_rows(out)
    log = (out / "logs" / "run.log").read_text()
    assert [r["round"] for r in rows] == [0, 1, 2], log[-3000:]
    assert dead == -9  # the participant really died, by SIGKILL
    one, two = rows[1], rows[2]
    assert one["secure"] and one["released"] and one["secagg_in_sum"] == 4 and one["clients"] == 4
    # Round 2: the dead client's key shares went out, its masked update never came; the three
    # survivors' mean is released (its mask seed rebuilt from their shares).
    assert two["secure"] and two["released"] and two["secagg_in_sum"] == 3 and two["secagg_lost"]["collect_masked_vectors"] == 1, two
    assert sum(two["secagg_lost"].values()) == 1
    assert two["digest"] != one["digest"]
    # The secure round's global is plain FedAvg's up to quantization: the same accuracy.
    plain = _plain_round_one(tmp_path)
    assert abs(one["accuracy"] - plain["accuracy"]) <= 0.01, (one["accuracy"], plain["accuracy"])
    assert abs(one["loss"] - plain["loss"]) <= 1e-3, (one["loss"], plain["loss"])
