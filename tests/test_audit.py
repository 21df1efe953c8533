"""The privacy audit: its math by hand, canaries planted where the audit looks for them, and
both attacks shown able to succeed (an audit that cannot fail proves nothing)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedprompt import audit, canaries, label_leak
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
    assert len(refs) == 5 and not {c for c, _ in planted} & set(refs)
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
    assert res["server_view"]["clients"] == 2 and set(res["server_view"]) >= {"plain", "secure", "no_update"}


def test_label_leak_scores_by_hand():
    truth = np.array([[0.8, 0.2, 0.0], [0.0, 0.1, 0.9]])
    assert label_leak.label_distribution([0, 0, 0, 0, 1], 3).tolist() == [0.8, 0.2, 0.0]
    exact = label_leak.score(truth, truth)
    assert exact == {"majority_hit": 1.0, "tv": 0.0}
    one_guess = label_leak.score(np.tile([1 / 3, 1 / 3, 1 / 3], (2, 1)), truth)  # argmax ties: class 0
    assert one_guess["majority_hit"] == 0.5
    assert one_guess["tv"] == pytest.approx(np.mean([0.5 * (0.8 - 1 / 3 + 1 / 3 - 0.2 + 1 / 3), 0.5 * (1 / 3 + 1 / 3 - 0.1 + 0.9 - 1 / 3)]))


def test_server_sees_label_skew_in_plain_updates_and_not_in_the_secure_mean(tmp_path):
    """The attack succeeds where it should (every client's update, Dirichlet 0.1) and is
    reduced to one guess for all by the mean a secure round reveals."""
    cfg = tiny_config(
        "bert", "prompt", federation__num_clients=4, data__partition="dirichlet", data__alpha=0.1, train__lr=0.3, federation__local_steps=20, audit__canaries=0
    )
    client = LocalClient(cfg, num_partitions=4)
    view = label_leak.server_view(client, client.initial_payload())
    truth = np.stack([label_leak.label_distribution(client.shard(k).train.target, 5) for k in range(4)])
    assert len({int(t.argmax()) for t in truth}) >= 3  # the clients' majority labels differ
    plain, secure = view["plain"], view["secure"]
    assert plain["majority_hit"] >= 0.75 and plain["tv"] < view["no_update"]["tv"] - 0.1
    # One estimate for every client: it names at most the clients sharing one majority label.
    assert secure["majority_hit"] <= 0.5 and secure["tv"] > plain["tv"] + 0.2


def test_generation_canaries_are_memorised_and_the_audit_sees_it(tmp_path):
    """Generation: canaries are prompt -> code; after training hard on them the codes rank
    first among the references (exposure at its ceiling), before it they do not."""
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Item {i} colour:", "response": f" {['red', 'green', 'blue'][i % 3]}"}) + "\n" for i in range(40)))
    sets = dict(data__dataset="file", data__path=str(f), data__task="generation", audit__canaries=2, audit__canary_repeats=20, audit__references=15)
    cfg = tiny_config("llama", "lora", train__lr=0.02, train__local_steps=60, train__batch_size=8, **sets)
    client = LocalClient(cfg)
    shard = client.shard(0)
    prompts = client.state.task.tok.batch_decode([ids[: shard.train.prompt_len[i]] for i, ids in enumerate(shard.train.ids)])
    assert prompts[shard.members :] == [canaries.PROMPT] * 40 and prompts[0].startswith("Item")
    before = audit.canary_exposures(client, cfg)
    client.fit(client.initial_payload(), round_num=1, source="test")
    after = audit.canary_exposures(client, cfg)
    assert max(before) < 2.0 and after == [4.0, 4.0]  # ceiling log2(15 + 1)
