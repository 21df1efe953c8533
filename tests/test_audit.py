"""The privacy audit: its math by hand, canaries planted where the audit looks for them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedprompt import audit, canaries
from fedprompt.local import LocalClient
from tests.tiny import tiny_config


def test_auc_by_hand():
    # members' losses lower than every non-member's: the attacker wins always.
    assert audit.auc(np.array([0.1, 0.2]), np.array([0.3, 0.4, 0.5])) == 1.0
    assert audit.auc(np.array([0.9]), np.array([0.1, 0.2])) == 0.0
    # pairs (member, non-member): (0.2, 0.3) won, (0.2, 0.5) won, (0.5, 0.3) lost, (0.5, 0.5) tied
    assert audit.auc(np.array([0.2, 0.5]), np.array([0.3, 0.5])) == (1 + 1 + 0 + 0.5) / 4


def test_exposure_by_hand():
    refs = np.array([0.5, 0.6, 0.7])  # R = 3: ceiling log2(4) = 2 bits
    assert audit.exposure(0.1, refs) == 2.0  # rank 1
    assert audit.exposure(0.65, refs) == pytest.approx(2 - math.log2(3))
    assert audit.exposure(0.9, refs) == 0.0  # rank 4: the least likely


def test_canaries_are_planted_in_the_audited_client_only(tmp_path):
    cfg = tiny_config(
        "bert", "prompt", federation__num_clients=2, data__partition="iid", audit__canaries=3, audit__canary_repeats=2, audit__references=5, audit__client=1
    )
    planted, refs = canaries.canaries(cfg, 5)
    assert planted == canaries.canaries(cfg, 5)[0]  # a function of the config
    assert len(refs) == 5 and not {t for t, _ in planted} & set(refs)
    client = LocalClient(cfg, num_partitions=2)
    s0, s1 = client.shard(0), client.shard(1)
    assert len(s0.train) == s0.members
    assert len(s1.train) == s1.members + 6
    tail = s1.train.target[s1.members :]
    assert tail == [y for _, y in planted] * 2


def test_audit_of_a_run_writes_its_figures(tmp_path):
    cfg = tiny_config("bert", "prompt", federation__num_clients=2, data__partition="iid", audit__canaries=2, audit__references=7)
    client = LocalClient(cfg, num_partitions=2)
    client.state.model.save_adapter(tmp_path / "adapter", client.state.backbone.path)
    res = audit.run_audit(cfg, tmp_path, quiet=True)
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved == res
    assert 0.0 <= res["mia_auc"] <= 1.0 and res["members"] == client.shard(0).members
    assert 0.0 <= res["canary_exposure"] <= res["exposure_ceiling"] == 3.0
