"""Secure aggregation (federation.secure_aggregation): Flower's SecAgg+ stages driven from the
round loop (server/secagg.py) and Flower's mod behind fedprompt's on each client
(client/secagg.py), in process, every message through a protobuf round trip.

Numeric clients (an update drawn per client, no model) check the mean against plain FedAvg
within the quantization bound, what the server receives, dropouts, and the strategies that
step from the mean; one tiny-model federation checks the run goes on after a round that
released nothing."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedprompt import checkpoint, payload
from fedprompt.client import secagg as client_secagg
from fedprompt.client.app import clipping_mod
from fedprompt.config import ConfigError, load_config
from fedprompt.protocol import NUM_EXAMPLES, UNIFORM_WEIGHT
from fedprompt.server import secagg
from fedprompt.server import strategies as fs
from fedprompt.server.localgrid import LocalGrid, set_task_identity, through_wire
from fedprompt.server.messages import exchange
from fedprompt.server.rounds import Watch, train_round
from fedprompt.server.trust import Patience, cap_weights
from fedprompt.wire import from_record, to_record

C, Q = 0.5, 2**22
SHAPES = {"prompt": (10, 64), "head.weight": (5, 72)}  # 1,000 floats, two tensors
NODES = [11, 22, 33, 44, 55]
CLAIMS = dict(zip(NODES, [30, 20, 40, 25, 10**6], strict=True))  # the last one lies: capped to the median, 30
STAGES = list(Stage.all())


def _cfg(*sets: str):
    base = [
        "federation.num_clients=5",
        "federation.min_clients=5",
        "federation.secure_aggregation=true",
        "federation.reject_norm_factor=0",
        f"federation.clipping_range={C}",
        "federation.fraction_evaluate=0",
        "federation.round_timeout=0.3",  # in-process replies are immediate: a silent node costs this per stage
    ]
    return load_config(None, [*base, *sets])


def _world(seed: int = 17):
    rng = np.random.default_rng(seed)
    glob = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}
    updates = {n: {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()} for n in NODES}
    return glob, updates


def _node(node: int, updates: dict, silent_from: str | None = None):
    """A client answering fedprompt's train request with global + its update, behind the same
    secure chain as the real ClientApp; silent from stage `silent_from` on (a SIGKILLed client)."""
    ctx = Context(run_id=0, node_id=node, node_config={}, state=RecordDict(), run_config={})

    def train(msg: Message, _ctx) -> Message:
        g = from_record(msg.content["arrays"])
        local = {k: g[k] + updates[node][k] for k in g}
        metrics = MetricRecord({NUM_EXAMPLES: CLAIMS[node], UNIFORM_WEIGHT: 1, "train_loss": 0.5})
        return Message(RecordDict({"arrays": to_record(local), "metrics": metrics}), reply_to=msg)

    app = client_secagg.secure_app(lambda m, c: CLAIMS[node], train)

    def respond(msg: Message) -> Message | None:
        stage = client_secagg.stage_of(msg)
        if silent_from and stage in STAGES[STAGES.index(silent_from) :]:
            return None
        msg = through_wire(msg)
        try:
            if client_secagg.is_secure(msg):
                return through_wire(app(msg, ctx))
            mod = clipping_mod(msg)  # client-level DP, client-side clipping: as the real ClientApp
            return through_wire(mod(msg, ctx, train) if mod else train(msg, ctx))
        except Exception as e:  # what Flower does with an exception in a ClientApp
            return Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    return respond


class Recorder:
    """The server side's Grid, recording every reply it pulls."""

    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, ids):
        got = self.grid.pull_messages(ids)
        self.replies += got
        return got

    def arrays(self) -> list[tuple[str, np.ndarray]]:
        """Every array in what the server received: every ArrayRecord's, and every npy-encoded
        bytes value (or list of them) in every ConfigRecord (SecAgg+ sends its masked vectors
        there, int64); a recorder looking only at ArrayRecords would pass vacuously."""
        out = []
        for r in self.replies:
            if r.has_error():
                continue
            for name, rec in r.content.array_records.items():
                out += [(f"ArrayRecord {name}[{k}]", a.numpy()) for k, a in rec.items()]
            for name, rec in r.content.config_records.items():
                for k, v in rec.items():
                    for b in v if isinstance(v, list) else [v]:
                        if isinstance(b, bytes) and b[:6] == b"\x93NUMPY":
                            out.append((f"ConfigRecord {name}[{k}]", bytes_to_ndarray(b)))
        return out


def _requests(glob: dict, rnd: int = 1) -> list[Message]:
    return [Message(RecordDict({"arrays": to_record(glob), "config": ConfigRecord({"server-round": rnd})}), dst_node_id=n, message_type="train") for n in NODES]


def _secure(grid, glob, cfg=None):
    cfg = cfg or _cfg()
    return secagg.secure_round(grid, cfg, 1, _requests(glob), glob, Patience(0.3), 0.3, lambda claims: cap_weights(claims, 1.0)[0])


def _flat(t: dict) -> np.ndarray:
    return np.concatenate([np.asarray(t[k], dtype=np.float64).ravel() for k in SHAPES])


def _check_mean(res, updates, c: float = C) -> tuple[float, float]:
    """(max error, max bound) of the released mean against plain FedAvg with the capped weights."""
    ups = np.stack([_flat(updates[n]) for n in res.in_sum])
    w = np.array([res.weights[n] for n in res.in_sum])
    plain = (w[:, None] * ups).sum(0) / w.sum()
    top = w.max()
    ratios = [round(x / top * Q) / Q for x in w]
    bound = np.array([secagg.error_bound(c, Q, ratios, s) for s in ups.max(0) - ups.min(0)])
    err = np.abs(_flat(res.update) - plain)
    assert np.all(err < bound), f"max error {err.max():.3e} vs bound {bound.max():.3e}"
    return float(err.max()), float(bound.max())


def test_the_secure_mean_is_plain_fedavgs_within_the_quantization_bound_and_the_server_never_holds_an_update():
    glob, updates = _world()
    grid = Recorder(LocalGrid({n: _node(n, updates) for n in NODES}))
    res = _secure(grid, glob)
    assert res.released and res.in_sum == NODES and res.restarts == 0
    assert res.weights == {11: 30.0, 22: 20.0, 33: 30.0, 44: 25.0, 55: 30.0}  # the liar's claim capped before masking
    err, bound = _check_mean(res, updates)
    print(f"\nsecure vs plain FedAvg, 5 clients, 1,000 floats: max error {err:.2e} < bound {bound:.2e}")
    row = secagg.describe(res, C, Q)
    print("bytes per stage (largest client, down/up):", {s: (v["down"], v["up"]) for s, v in row["bytes_stages"].items()})
    assert row["secagg_in_sum"] == 5 and row["secagg_error_bound"] >= bound and all(v["up"] > 0 for v in row["bytes_stages"].values())

    # What the server received: every array, decoded; none is, or correlates with, a client's
    # update, its local tensors, or a rescaled copy.
    received = [(w, a) for w, a in grid.arrays() if a.size >= 100]
    assert received and all(w.startswith("ConfigRecord secaggplus_configs[masked_params]") for w, _ in received)
    assert all(a.dtype == np.int64 for _, a in received)
    refs = [u[k] for u in updates.values() for k in SHAPES] + [glob[k] + u[k] for u in updates.values() for k in SHAPES]
    same_shape, worst = 0, 0.0
    for _, a in received:
        for ref in refs:
            if a.shape != ref.shape:
                continue
            same_shape += 1
            v, r = a.astype(np.float64), ref.astype(np.float64)
            assert not np.allclose(v, r, atol=1e-3)
            assert not np.allclose(v / np.abs(v).max(), r / np.abs(r).max(), atol=1e-2)
            corr = abs(np.corrcoef(v.ravel(), r.ravel())[0, 1])
            assert corr < 5 / np.sqrt(v.size)  # chance level for independent vectors
            worst = max(worst, corr)
    assert same_shape == 100  # 10 masked tensors (5 clients x 2) x the 10 client tensors of each shape
    print(f"server received {len(received)} arrays of >= 100 values; {same_shape} same-shape comparisons, max |corr| {worst:.3f}")

    # The positive control: a plain round through the same recorder holds every client's tensors.
    plain = Recorder(LocalGrid({n: _node(n, updates) for n in NODES}))
    exchange(plain, _requests(glob), 1.0)
    found = sum(any(a.shape == ref.shape and np.allclose(a, ref, atol=1e-6) for _, a in plain.arrays()) for ref in refs[len(refs) // 2 :])
    assert found == len(refs) // 2


def test_a_client_lost_after_share_keys_leaves_the_others_mean_and_three_lost_release_nothing():
    glob, updates = _world(5)
    res = _secure(LocalGrid({n: _node(n, updates, Stage.COLLECT_MASKED_VECTORS if n == 22 else None) for n in NODES}), glob)
    assert res.released and res.in_sum == [11, 33, 44, 55]
    err, bound = _check_mean(res, updates)
    print(f"\n1 of 5 lost after share-keys: the other four's mean, max error {err:.2e} < bound {bound:.2e}")
    lost = {22, 33, 44}
    res = _secure(LocalGrid({n: _node(n, updates, Stage.COLLECT_MASKED_VECTORS if n in lost else None) for n in NODES}), glob)
    assert not res.released and res.update is None
    assert "stopped at collect_masked_vectors: 2 of 5 clients answered" in res.why
    print(f"3 of 5 lost: released nothing ({res.why})")
    # Lost after its masked update went out: its mask seed is rebuilt from the others' shares.
    res = _secure(LocalGrid({n: _node(n, updates, Stage.UNMASK if n == 22 else None) for n in NODES}), glob)
    assert res.released and res.in_sum == NODES
    _check_mean(res, updates)
    # Lost before its key shares went out: setup again with the four survivors.
    res = _secure(LocalGrid({n: _node(n, updates, Stage.SHARE_KEYS if n == 22 else None) for n in NODES}), glob)
    assert res.released and res.restarts == 1 and res.in_sum == [11, 33, 44, 55]
    _check_mean(res, updates)


def test_client_norm_bound_scales_each_update_before_masking():
    """The defence that works under secure aggregation: each client bounds its own update's
    L2 norm (here 0.05, about 1/6 of the updates' ~0.32), and clipping_range defaults to it."""
    glob, updates = _world(9)
    cfg = _cfg("federation.clipping_range=0", "federation.client_norm_bound=0.05")
    res = _secure(LocalGrid({n: _node(n, updates) for n in NODES}), glob, cfg)
    bounded = {n: {k: v * np.float32(0.05 / np.linalg.norm(_flat(u))) for k, v in u.items()} for n, u in updates.items()}
    assert res.released
    err, bound = _check_mean(res, bounded, c=0.05)
    print(f"\nclient_norm_bound 0.05: max error {err:.2e} < bound {bound:.2e}")


def test_an_unmask_request_naming_a_node_both_active_and_dead_is_refused():
    set_task_identity()  # a Message needs Flower's task identity, which a LocalGrid sets (this test may run alone)
    cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: [11, 22, 33], Key.DEAD_NODE_ID_LIST: [33]})
    msg = Message(RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=11, message_type="train")
    with pytest.raises(ValueError, match=r"node\(s\) \[33\] both active and dead"):
        client_secagg.unmask_guard_mod(msg, None, lambda m, c: pytest.fail("passed on"))


def _state(glob):
    return checkpoint.ServerState(round=0, tensors={k: v.copy() for k, v in glob.items()}, rows=[{"round": 0}])


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedyogi", "fedavgm"])
def test_strategies_step_from_the_unmasked_mean_as_from_the_plain_one(strategy):
    """Two rounds of the round loop, plain and secure, on the same updates: the secure global
    stays within the propagated quantization error of the plain one. Each round's mean is off by
    at most the row's bound e; a FedAvgM step carries 0.5 of the last one (server lr 1), and a
    FedAdam/FedYogi step moves by at most server_lr (1 - beta1) / tau = 0.01 x 0.1 / 1e-3 = 1 x
    its mean's error: after two rounds, below 4 e."""
    glob, updates = _world(3)
    out, bounds = {}, []
    for secure in (False, True):
        cfg = _cfg(f"federation.strategy={strategy}", f"federation.secure_aggregation={str(secure).lower()}", "federation.server_lr=0.01")
        strategy_ = fs.make_strategy(cfg)
        grid = LocalGrid({n: _node(n, updates) for n in NODES})
        state = _state(glob)
        for rnd in (1, 2):
            tensors, row = train_round(grid, cfg, strategy_, state, rnd, payload.manifest_from(glob), centralized=False, watch=Watch(Patience(0.3)))
            assert row["released"] and row["clients"] == 5 and row.get("secure", False) == secure
            bounds += [row["secagg_error_bound"]] if secure else []
            state.round, state.tensors, state.rows = rnd, tensors, [*state.rows, row]
        out[secure] = _flat(state.tensors)
    diff, moved = np.abs(out[True] - out[False]), np.abs(out[False] - _flat(glob))
    print(f"\n{strategy}: secure vs plain after 2 rounds: max |diff| {diff.max():.2e} < {4 * max(bounds):.2e}; mean |step| {moved.mean():.2e}")
    assert np.all(diff < 4 * max(bounds)) and moved.mean() > 1e3 * max(bounds)


@pytest.mark.parametrize(
    "sets, says",
    [
        (["federation.strategy=fedmedian"], "federation.strategy: 'fedmedian' with federation.secure_aggregation"),
        (["federation.strategy=trimmedmean"], "federation.strategy: 'trimmedmean'"),
        (["federation.strategy=krum"], "federation.strategy: 'krum'"),
        (["federation.strategy=multikrum", "federation.num_malicious=1"], "federation.strategy: 'multikrum'"),
        (["federation.norm_bound=1.0"], "federation.norm_bound: 1.0 with federation.secure_aggregation"),
        (["federation.reject_norm_factor=10"], "federation.reject_norm_factor: 10.0 with federation.secure_aggregation"),
        (["peft.method=lora", "federation.lora_aggregation=svd"], "federation.lora_aggregation: 'svd'"),
        (["privacy.mode=client"], "privacy.clipping: 'server' with federation.secure_aggregation"),
        (["federation.clipping_range=0"], "federation.clipping_range: required"),
        (["federation.num_clients=3", "federation.min_clients=3"], "federation.reconstruction_threshold: 2 (3 clients per round"),
        (["federation.reconstruction_threshold=2"], "is below 3"),
        (["federation.num_clients=8", "federation.reconstruction_threshold=4"], "at most half of num_shares (8)"),
        (["federation.reconstruction_threshold=5"], "must be below num_shares (5)"),
        (["federation.num_shares=2"], "federation.num_shares: 2 is out of range"),
        (["federation.quantization_range=1073741824"], "federation.quantization_range: 1073741824 with 5 clients per round"),
    ],
)
def test_settings_that_need_individual_updates_or_weaken_the_protocol_are_refused(sets, says):
    with pytest.raises(ConfigError) as e:
        _cfg(*sets)
    text = str(e.value)
    assert says in text, text
    if "norm" in says or "strategy" in says:
        assert "federation.client_norm_bound" in text  # the compatible defence is offered


def test_client_norm_bound_needs_secure_aggregation_and_clipping_range_defaults_to_it():
    with pytest.raises(ConfigError, match="client_norm_bound: 0.5 applies under federation.secure_aggregation only"):
        load_config(None, ["federation.client_norm_bound=0.5"])
    cfg = _cfg("federation.clipping_range=0", "federation.client_norm_bound=0.2")
    assert secagg.clipping_range(cfg) == 0.2


@pytest.mark.parametrize("secure", [False, True])
def test_client_level_dp_noises_the_secure_mean_as_flowers_wrapper_noises_the_plain_one(secure):
    """privacy.mode client with client-side clipping: each client clips its update to
    client_clip_norm before masking (uniform weights: the liar's claim of 10**6 counts 1), the
    server adds N(0, (sigma C / m)^2) per coordinate to the unmasked mean and counts a release.
    Brute force: the residual of the released global against the exact mean of the clipped
    updates has the std Flower's wrapper gives a plain round (1000 coordinates: within 10%), and
    the round's epsilon is the plain round's. A round with a client lost releases nothing."""
    from fedprompt.privacy import gaussian_epsilon

    clip, sigma = 0.05, 1.0
    sets = [
        "privacy.mode=client",
        "privacy.clipping=client",
        f"privacy.client_clip_norm={clip}",
        f"privacy.client_noise_multiplier={sigma}",
        "federation.clipping_range=0",
        f"federation.secure_aggregation={str(secure).lower()}",
    ]
    cfg = _cfg(*sets)
    glob, updates = _world(23)
    clipped = np.stack([_flat(u) * min(1.0, clip / np.linalg.norm(_flat(u))) for u in updates.values()])
    strategy = fs.make_strategy(cfg)
    state = _state(glob)
    tensors, row = train_round(
        LocalGrid({n: _node(n, updates) for n in NODES}), cfg, strategy, state, 1, payload.manifest_from(glob), centralized=False, watch=Watch(Patience(0.3))
    )
    residual = _flat(tensors) - _flat(glob) - clipped.mean(0)
    want = sigma * clip / len(NODES)
    print(f"\nclient-level DP, {'secure' if secure else 'plain'}: residual std {residual.std():.4e}, want {want:.4e}")
    assert row["released"] and row["dp_releases"] == 1 and row.get("secure", False) == secure
    assert abs(residual.std() / want - 1) < 0.1 and abs(residual.mean()) < 4 * want / np.sqrt(residual.size)
    assert row["client_epsilon"] == row["epsilon"] == gaussian_epsilon(sigma, 1, cfg.privacy.delta)
    if secure:
        assert set(row["weights"].values()) == {1.0} and row["clip_norm"] == clip
        lost = {n: _node(n, updates, Stage.COLLECT_MASKED_VECTORS if n == 22 else None) for n in NODES}
        same, row2 = train_round(LocalGrid(lost), cfg, strategy, state, 1, payload.manifest_from(glob), centralized=False, watch=Watch(Patience(0.3)))
        assert not row2["released"] and row2["dp_releases"] == 0 and all(np.array_equal(same[k], glob[k]) for k in glob)


def _silent_in(respond, rnd: int):
    """`respond`, SIGKILLed after share-keys in round `rnd` (silent from its training request
    to the round's end), restarted for the next round."""
    dead = [False]

    def r(msg: Message):
        stage = client_secagg.stage_of(msg)
        if stage == Stage.SETUP:
            dead[0] = False
        if stage == Stage.COLLECT_MASKED_VECTORS and int(msg.content["config"]["server-round"]) == rnd:
            dead[0] = True
        return None if dead[0] else respond(msg)

    return r


def test_a_tiny_federation_runs_on_after_a_round_that_released_nothing(tmp_path):
    """The round loop with real LocalClients (tiny model): round 1 loses 3 of 5 clients after
    share-keys (nothing released, the global stays), round 2 loses 1 (the other four's mean)."""
    from fedprompt.local import LocalClient
    from fedprompt.report import read_jsonl
    from fedprompt.server.app import serve
    from fedprompt.server.localgrid import client_responder
    from tests.tiny import federation_config

    cfg = federation_config(
        federation__num_clients=5,
        federation__min_clients=5,
        federation__rounds=2,
        federation__secure_aggregation="true",
        federation__reject_norm_factor=0,
        federation__clipping_range=1.0,
        federation__round_timeout=1,
        federation__fraction_evaluate=0,
    )
    client = LocalClient(cfg, num_partitions=5)
    lost = {1: {102, 103, 104}, 2: {105}}
    responders = {}
    for i in range(5):
        node, r = 101 + i, client_responder(client, i)
        for rnd, nodes in lost.items():
            r = _silent_in(r, rnd) if node in nodes else r
        responders[node] = r
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    serve(LocalGrid(responders), cfg, tmp_path, centralized=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    r1, r2 = rows[1], rows[2]
    assert r1["secure"] and not r1["released"] and r1["digest"] == rows[0]["digest"] and r1["clients"] == 0
    assert "2 of 5 clients answered" in r1["released_why"]
    assert r2["released"] and r2["secagg_in_sum"] == 4 and r2["clients"] == 4 and r2["digest"] != rows[0]["digest"]
    assert r2["secagg_lost"]["collect_masked_vectors"] == 1 and r2["update_norm_median"] is None
    assert set(r2["bytes_stages"]) == set(STAGES) and r2["bytes_up"] > r2["bytes_stages"]["collect_masked_vectors"]["up"]
    print(f"\nround 1: {r1['released_why']}\nround 2: {r2['secagg_in_sum']}/5 in the sum, bytes per stage {r2['bytes_stages']}")
