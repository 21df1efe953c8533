"""Privacy in the round loop (in-process grid, real tiny clients): sample-level epsilon
reported per round and kept across client restarts; client-level DP with Flower's wrappers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Error, Message

from fedprompt import payload, privacy
from fedprompt.local import LocalClient
from fedprompt.report import read_jsonl
from fedprompt.server import strategies as fs
from fedprompt.server.app import serve
from tests.fakegrid import FakeGrid, client_responder
from tests.tiny import federation_config


def _cfg(**sets):
    return federation_config(**({"federation__min_clients": 3, "federation__fraction_evaluate": 0.0} | sets))


def _run(cfg, out, client, wrap=None):
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    responders = {101 + i: client_responder(client, i) for i in range(3)}
    if wrap:
        responders = {n: wrap(n, r) for n, r in responders.items()}
    serve(FakeGrid(responders), cfg, out, centralized=True)
    return read_jsonl(out / "metrics.jsonl")


def test_sample_dp_epsilon_grows_per_round_is_the_largest_and_survives_a_restart(tmp_path):
    state = tmp_path / "clients"
    cfg = _cfg(privacy__mode="sample", privacy__noise_multiplier=1.2, client__state_dir=str(state), train__batch_size=4)
    client = LocalClient(cfg, num_partitions=3)
    rows = _run(cfg, tmp_path / "run", client)
    eps = [r["epsilon"] for r in rows[1:]]
    assert eps[0] > 0 and eps[0] < eps[1] < eps[2]
    ledgers = sorted(state.glob("ledger-*.json"))
    assert len(ledgers) == 3  # one per client's data
    own = [privacy.Ledger.open(f).epsilon(cfg.privacy.delta) for f in ledgers]
    assert eps[-1] == pytest.approx(max(own), rel=1e-12)
    # Each ledger: 3 rounds x local_steps steps at the client's own q, as Opacus counts them.
    n = len(client.shard(0).train)
    ledger = privacy.Ledger.open(client.ledger_path(client.shard(0).train))
    assert ledger.history == [(1.2, 4 / n, 3 * cfg.round_steps)]
    # A restarted client (a new process: a new LocalClient) continues the same account.
    again = LocalClient(cfg, num_partitions=3)
    res = again.fit(again.initial_payload(), partition_id=0, round_num=1)
    assert res.metrics["dp_steps"] == 4 * cfg.round_steps
    assert res.metrics["epsilon"] == pytest.approx(privacy.epsilon([(1.2, 4 / n, 4 * cfg.round_steps)], cfg.privacy.delta))


def test_a_client_never_trains_past_its_target_epsilon(tmp_path):
    cfg = _cfg(privacy__mode="sample", privacy__target_epsilon=5.0, client__state_dir=str(tmp_path), train__batch_size=4, federation__rounds=2)
    client = LocalClient(cfg, num_partitions=3)
    g = client.initial_payload()
    first = client.fit(g, partition_id=0, round_num=1).metrics["epsilon"]
    second = client.fit(g, partition_id=0, round_num=2).metrics["epsilon"]
    assert first < second <= 5.0
    with pytest.raises(privacy.PrivacyError, match="budget exhausted"):
        client.fit(g, partition_id=0, round_num=3)  # a round beyond the plan would pass the target


@pytest.fixture(scope="module")
def plain_client():
    return LocalClient(_cfg(), num_partitions=3)


@pytest.mark.parametrize("clipping", ["server", "client"])
def test_client_dp_with_flowers_wrappers_noises_accounts_and_resumes(tmp_path, plain_client, clipping):
    sigma, clip = 1.0, 1e-4
    # Federated evaluation on: its replies must satisfy the uniform weighting too.
    client_dp = dict(privacy__mode="client", privacy__client_noise_multiplier=sigma, privacy__client_clip_norm=clip, privacy__clipping=clipping)
    cfg = _cfg(**client_dp, federation__rounds=2, federation__fraction_evaluate=1.0)
    plain_client.cfg = cfg
    strategy = fs.make_strategy(cfg)
    assert type(strategy).__name__ == f"DifferentialPrivacy{clipping.title()}SideFixedClipping"
    seen = []

    def watch(node, respond):
        def r(msg):
            reply = respond(msg)
            if msg.metadata.message_type == "train":
                sent, back = msg.content["arrays"].to_numpy_ndarrays(), reply.content["arrays"].to_numpy_ndarrays()
                seen.append(math.sqrt(sum(float(((b - a) ** 2).sum()) for a, b in zip(sent, back, strict=True))))
            return reply

        return r

    out = tmp_path / "run"
    rows = _run(cfg, out, plain_client, watch)
    assert [r["dp_releases"] for r in rows[1:]] == [1, 2]
    want = [privacy.gaussian_epsilon(sigma, k, cfg.privacy.delta) for k in (1, 2)]
    assert [r["client_epsilon"] for r in rows[1:]] == pytest.approx(want)
    assert [r["epsilon"] for r in rows[1:]] == pytest.approx(want)
    assert want[0] < want[1] and all(r["fed_accuracy"] is not None for r in rows[1:])
    assert not any("fed_nodes" in r for r in rows)  # nothing published per client under client-level DP
    if clipping == "client":  # Flower's mod clipped every update before it left the client
        assert max(seen) <= clip * 1.001
    else:
        assert min(seen) > clip  # the server did the clipping
    # Resumed from the checkpoint (tensors come back in another key order): rounds go on.
    more = _cfg(**client_dp, federation__rounds=3, federation__fraction_evaluate=1.0)
    plain_client.cfg = more
    rows = _run(more, out, plain_client)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[3]["dp_releases"] == 3


def test_adaptive_clipping_is_refused_with_the_reason():
    from fedprompt.config import ConfigError

    with pytest.raises(ConfigError, match="update the clip norm before sizing the noise"):
        _cfg(privacy__mode="client", privacy__adaptive_clipping="true")


def test_client_dp_noise_has_std_sigma_clip_over_m(tmp_path, plain_client):
    """With a clip far below the updates, the global change of a round is the noise alone:
    std sigma * C / m per coordinate (Flower's fixed-clipping wrapper, m = 3 clients)."""
    from fedprompt.checkpoint import load_latest

    sigma, clip = 2.0, 1e-6
    cfg = _cfg(privacy__mode="client", privacy__client_noise_multiplier=sigma, privacy__client_clip_norm=clip, federation__rounds=1)
    plain_client.cfg = cfg
    out = tmp_path / "run"
    _run(cfg, out, plain_client)
    start = {k: v.numpy() for k, v in plain_client.initial_payload().items()}
    end = load_latest(out)[0].tensors
    change = np.concatenate([(end[k] - start[k]).ravel() for k in start])
    n = change.size
    assert abs(change.std() / (sigma * clip / 3) - 1) < 6 / math.sqrt(2 * n)


def test_client_dp_releases_nothing_when_a_sampled_client_fails(tmp_path, plain_client, capsys):
    cfg = _cfg(privacy__mode="client", federation__rounds=2)
    plain_client.cfg = cfg

    def fail_round_1(node, respond):
        def r(msg):
            if node == 102 and msg.metadata.message_type == "train" and int(msg.content["config"]["server-round"]) == 1:
                return Message(Error(code=1, reason="boom"), reply_to=msg)
            return respond(msg)

        return r

    rows = _run(cfg, tmp_path / "run", plain_client, fail_round_1)
    assert rows[1]["dp_releases"] == 0 and rows[1]["client_epsilon"] == 0.0
    assert rows[1]["digest"] == payload.digest(plain_client.initial_payload())  # the global state did not move
    assert rows[2]["dp_releases"] == 1
    assert "client-level DP needs exactly 3 sampled updates, got 2 of 3 sampled" in capsys.readouterr().out
