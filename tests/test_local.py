"""LocalClient: one backbone per client lifetime; fit/evaluate move only the payload."""

from __future__ import annotations

import torch

from fedprompt import payload
from fedprompt.local import LocalClient
from fedprompt.run import setup
from tests.tiny import tiny_config


def _distance(a: dict, b: dict) -> float:
    return float(sum(((a[k] - b[k]) ** 2).sum() for k in a)) ** 0.5


def test_rounds_reuse_the_backbone_and_move_only_the_payload(monkeypatch):
    loads = []

    def counting_setup(cfg, data=None):
        loads.append(1)
        return setup(cfg, data=data)

    cfg = tiny_config("bert", "prompt", train__lr=0.05, data__partition="iid")
    client = LocalClient(cfg, num_partitions=2, setup_fn=counting_setup)
    n_train = len(client.shard(1).train)
    assert 30 <= n_train <= 50  # half of the ~80 training examples
    start = payload.extract(client.state.model)
    frozen = {n: p.detach().clone() for n, p in client.state.model.backbone.named_parameters() if not p.requires_grad}
    g = start
    for r in range(1, 4):
        res = client.fit(g, partition_id=1, round_num=r)
        assert set(res.tensors) == set(start) and res.num_examples == n_train
        assert _distance(res.tensors, g) > 0 and res.metrics["train_s"] > 0
        g = res.tensors
        metrics, n = client.evaluate(g)  # centralized: the whole (capped) test split
        assert 0.0 <= metrics["accuracy"] <= 1.0 and n == 16
        _, n_local = client.evaluate(g, partition_id=1)
        assert 0 < n_local <= len(client.state.test)
    assert client.initial_payload().keys() == start.keys()
    assert payload.digest(client.initial_payload()) == payload.digest(start)  # round 0 stays round 0
    assert len(loads) == 1
    after = dict(client.state.model.backbone.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())


def test_fit_is_a_function_of_the_global_payload():
    """Same global payload and round -> same update, whatever the client did before."""
    cfg = tiny_config("bert", "prompt", train__lr=0.05)
    client = LocalClient(cfg)
    g = payload.extract(client.state.model)
    a = client.fit(g, round_num=2).tensors
    client.fit(a, round_num=1)  # disturb the live state and the optimizer
    b = client.fit(g, round_num=2).tensors
    assert payload.digest(a) == payload.digest(b)


def test_fedprox_term_pulls_towards_the_global_payload():
    cfg = tiny_config("bert", "prompt", train__lr=0.05, train__local_steps=4)
    client = LocalClient(cfg)
    g = payload.extract(client.state.model)
    free = client.fit(g, round_num=1).tensors
    prox = client.fit(g, round_num=1, proximal_mu=50.0).tensors
    assert _distance(prox, g) < _distance(free, g)


def test_a_clients_own_test_split_also_gets_the_prediction_under_its_own_label_prior():
    """personal_accuracy: the argmax of logits + log(the partition's training label
    frequencies), on its own test split only; not on the whole test split, not under DP-SGD."""
    from fedprompt.engine import collate

    cfg = tiny_config("bert", "prompt", data__partition="dirichlet", data__alpha=0.1, federation__num_clients=2)
    client = LocalClient(cfg, num_partitions=2)
    g = payload.extract(client.state.model)
    metrics, n = client.evaluate(g, partition_id=0)
    shard, s = client.shard(0), client.state
    counts = torch.bincount(torch.tensor(shard.train.target), minlength=len(s.data.labels)).double()
    prior = torch.log((counts / counts.sum()).clamp_min(1e-12)).float()
    batch = collate(shard.test, list(range(n)), s.pad_id, s.backbone.device)
    with torch.no_grad():
        logits = s.model(batch["input_ids"], batch["attention_mask"])
    want = int(((logits.float() + prior).argmax(-1) == batch["labels"]).sum()) / n
    assert metrics["personal_accuracy"] == want
    assert want != metrics["accuracy"]  # a skewed prior changes the predictions of an untrained head
    assert "personal_accuracy" not in client.evaluate(g)[0]
    client.cfg.privacy.mode = "sample"  # read at each evaluation
    assert "personal_accuracy" not in client.evaluate(g, partition_id=0)[0]


def test_a_new_run_in_a_reused_worker_frees_the_previous_backbone(tmp_path):
    """A simulation worker that serves a second run drops the first run's LocalClient (and
    its backbone) before loading the next one: nothing keeps it alive."""
    import weakref

    from fedprompt.client import handler

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(tiny_config("bert", "prompt").to_yaml())
    second.write_text(tiny_config("bert", "prompt", train__seed=7).to_yaml())
    gone = weakref.ref(handler.client_for(first, 1).state.backbone.model)
    handler.client_for(second, 1)
    assert gone() is None
    handler._CLIENTS.clear()
