"""Spike: one SecAgg+ round driven stage by stage from a fedprompt-style round loop.

Server: Flower 1.42's SecAggPlusWorkflow stage methods (setup_stage, share_keys_stage,
collect_masked_vectors_stage, unmask_stage), each called by this loop with
  - a `StageGrid` whose send_and_receive goes through fedprompt.server.messages.exchange over
    fedprompt.server.localgrid.LocalGrid (and counts wire bytes per stage, records every reply),
  - a LegacyContext holding a capture-only legacy Strategy (configure_fit names the nodes this
    loop sampled; aggregate_fit only keeps the unmasked aggregate).
Clients: one flwr ClientApp, @app.train(mods=[secaggplus_mod, fit_bridge_mod]); the inner train
function answers fedprompt's record names ("arrays" + "metrics"); fit_bridge_mod turns that into
the legacy "fitres.*" records secaggplus_mod reads, sending the UPDATE (local - global) weighted
by the server-assigned (capped) weight. Every message crosses a protobuf round trip, as on the wire.

No cryptography here: all of it is Flower's.
"""

from __future__ import annotations

import sys
import time

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
# Run: .venv/bin/python docs/spikes/secagg_spike.py (research code: not part of the package or the suite)

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitIns, Parameters, bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_mod
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedprompt.server.localgrid import LocalGrid
from fedprompt.server.messages import exchange
from fedprompt.server.trust import cap_weights
from fedprompt.wire import from_record, to_record, wire_bytes

RNG = np.random.default_rng(17)
import os
SHAPES = {"prompt": (10, 64), "head.weight": (5, 72)}  # 640 + 360 = 1000 floats
if os.environ.get("SPIKE_FLOATS"):  # one tensor of that many floats (payload-size runs)
    SHAPES = {"payload": (int(os.environ["SPIKE_FLOATS"]),)}
N = 5
NODE_IDS = [int(x) for x in RNG.integers(1, 2**62, size=N)]  # Flower node ids are large uint64
GLOBAL = {k: RNG.normal(0, 0.5, s).astype(np.float32) for k, s in SHAPES.items()}
# each client's local result = global + its own update (what training would give)
UPDATES = {n: {k: RNG.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()} for n in NODE_IDS}
CLAIMS = dict(zip(NODE_IDS, [30.0, 20.0, 40.0, 25.0, 1e6]))  # the last one lies

C_RANGE, Q_RANGE, M_RANGE, MAX_W = 0.5, 2**22, 2**32, 1000.0
NUM_SHARES, THRESHOLD = 5, 3
STAGE_TIMEOUT = 0.3  # in-process replies are immediate; a silent node costs this per stage


def flat(t: dict) -> np.ndarray:
    return np.concatenate([np.asarray(t[k], dtype=np.float64).ravel() for k in SHAPES])


def wire(msg: Message) -> Message:
    """What the other end gets: the message through protobuf bytes (as on the wire)."""
    p = ProtoMessage()
    p.ParseFromString(message_to_proto(msg).SerializeToString())
    return message_from_proto(p)


# ---------------------------------------------------------------- client side
def stage_of(msg: Message) -> str | None:
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    return None if cfg is None else str(cfg.get(Key.STAGE))


def fit_bridge_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Between secaggplus_mod and fedprompt's train: fedprompt's reply ("arrays", "metrics") ->
    the legacy fitres.* records secaggplus_mod reads. The vector is the update (local - global),
    the weight the server assigned (its capped claim), else the client's own claim."""
    reply = call_next(msg, ctxt)
    if reply.has_error():
        return reply
    glob = from_record(msg.content["arrays"])
    local = from_record(reply.content["arrays"])
    update = [np.asarray(local[k] - glob[k]) for k in glob]  # global's order: the server maps back by it
    cfg = msg.content["config"]
    weight = float(cfg["secagg-weight"]) if "secagg-weight" in cfg else float(reply.content["metrics"]["num-examples"])
    params = ArrayRecord({str(i): __import__("flwr").app.Array(u) for i, u in enumerate(update)})
    out = RecordDict(
        {
            "fitres.parameters": params,
            "fitres.num_examples": MetricRecord({"num_examples": weight}),
            "fitres.metrics": ConfigRecord({}),
            "fitres.status": ConfigRecord({"code": 0, "message": ""}),
            "metrics": reply.content["metrics"],  # fedprompt's own metrics (train loss...): in the clear
        }
    )
    return Message(out, reply_to=msg)


def unmask_guard_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """A client-side check (no crypto): refuse an unmask request naming a node both active and
    dead (it would hand out both secrets of that node)."""
    cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if cfg is not None and cfg.get(Key.STAGE) == Stage.UNMASK:
        both = set(cfg[Key.ACTIVE_NODE_ID_LIST]) & set(cfg[Key.DEAD_NODE_ID_LIST])
        if both:
            raise ValueError(f"unmask request names node(s) {sorted(both)} both active and dead: refused")
    return call_next(msg, ctxt)


def claim_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Outside secaggplus_mod: the setup reply also carries the client's claimed example count
    (its partition size, known before training), so the server can cap weights before masking."""
    is_setup = stage_of(msg) == Stage.SETUP
    reply = call_next(msg, ctxt)
    if is_setup and not reply.has_error():
        reply.content["claim"] = MetricRecord({"num-examples": CLAIMS[ctxt.node_id]})
    return reply


def make_app(guard: bool) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[claim_mod] + ([unmask_guard_mod] if guard else []) + [secaggplus_mod, fit_bridge_mod])
    def train(msg: Message, context: Context) -> Message:  # fedprompt's shape of a train reply
        node = context.node_id
        g = from_record(msg.content["arrays"])
        local = {k: g[k] + UPDATES[node][k] for k in g}
        return Message(RecordDict({"arrays": to_record(local), "metrics": MetricRecord({"num-examples": int(CLAIMS[node]), "train_loss": 0.5})}), reply_to=msg)

    return app


def responder(app: ClientApp, node: int, silent_from: str | None):
    ctx = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
    order = list(Stage.all())

    def respond(msg: Message) -> Message | None:
        msg = wire(msg)
        st = stage_of(msg)
        if silent_from and st and order.index(st) >= order.index(silent_from):
            return None  # SIGKILLed: nothing more is ever answered
        try:
            reply = app(msg, ctx)
        except Exception as e:  # what Flower does with an exception in a ClientApp
            reply = Message(Error(code=1, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
        return wire(reply)

    return respond


# ---------------------------------------------------------------- server side
class Capture(Strategy):
    """The legacy Strategy the workflow's stages call: configure_fit names the nodes the round
    loop sampled; aggregate_fit keeps the unmasked aggregate. No aggregation of its own."""

    def __init__(self, nodes):
        self.nodes, self.aggregate = nodes, None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(n, None, 0), FitIns(Parameters([], ""), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        self.aggregate = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, *a):
        return []

    def aggregate_evaluate(self, *a):
        return None, {}

    def evaluate(self, *a):
        return None


class StageGrid:
    """What the workflow's stages call (send_and_receive), over fedprompt's exchange; bytes and
    every reply recorded per stage."""

    def __init__(self, grid, timeout):
        self.grid, self.timeout, self.stages, self.received = grid, timeout, [], []

    def send_and_receive(self, messages, *, timeout=None):
        msgs = list(messages)
        stage = stage_of(msgs[0]) if msgs else "?"
        down = [wire_bytes(m) for m in msgs]
        replies = exchange(self.grid, msgs, self.timeout)
        up = [wire_bytes(r) for r in replies]
        errs = [r.error.reason for r in replies if r.has_error()]
        self.stages.append({"stage": stage, "sent": len(msgs), "replies": len(replies) - len(errs), "errors": errs, "down": down, "up": up})
        self.received += [(stage, r) for r in replies]
        return replies


def secure_round(grid, nodes, rnd, weights, *, restart_on_early_drop=False, malicious_target=None):
    wf = SecAggPlusWorkflow(NUM_SHARES, THRESHOLD, max_weight=MAX_W, clipping_range=C_RANGE, quantization_range=Q_RANGE, modulus_range=M_RANGE)
    sg = StageGrid(grid, STAGE_TIMEOUT)
    attempt_nodes = list(nodes)
    for attempt in range(2):
        cap = Capture(attempt_nodes)
        ctx = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=cap)
        ctx.state.config_records["config"] = ConfigRecord({"current_round": rnd})
        ctx.state.array_records["parameters"] = ArrayRecord()
        st = WorkflowState()
        ok = wf.setup_stage(sg, ctx, st)
        # claims came with the setup replies (claim_mod); capped before anything is masked
        setup = [r for s, r in sg.received if s == Stage.SETUP and not r.has_error()][-len(st.active_node_ids) or None:]
        claims = {r.metadata.src_node_id: float(r.content["claim"]["num-examples"]) for r in setup if "claim" in r.content}
        weights, _ = cap_weights(claims, 1.0)
        top = max(weights.values())
        st.nid_to_fitins = {
            n: RecordDict({"arrays": to_record(GLOBAL), "config": ConfigRecord({"server-round": rnd, "secagg-weight": weights[n] / top * MAX_W})})
            for n in st.nid_to_fitins
        }
        ok = ok and wf.share_keys_stage(sg, ctx, st)
        if restart_on_early_drop and st.active_node_ids != st.sampled_node_ids:
            lost = st.sampled_node_ids - st.active_node_ids
            print(f"    restart: {len(lost)} node(s) lost before their key shares were out; setup again with {len(st.active_node_ids)}")
            attempt_nodes = sorted(st.active_node_ids)
            continue
        break
    ok = ok and wf.collect_masked_vectors_stage(sg, ctx, st)
    if malicious_target is not None and ok:
        return sg, st, malicious_unmask(sg, st, malicious_target), (attempt_nodes, weights)
    ok = ok and wf.unmask_stage(sg, ctx, st)
    return sg, st, (cap.aggregate if ok else None), (attempt_nodes, weights)


def malicious_unmask(sg, st, target):
    """A server that breaks the protocol: it names `target` both active and dead to every
    neighbour, gets both its mask seed shares and its sk1 shares, and removes all of target's
    masks from target's OWN masked vector (Flower primitives only)."""
    masked = {r.metadata.src_node_id: [bytes_to_ndarray(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
              for s, r in sg.received if s == Stage.COLLECT_MASKED_VECTORS and not r.has_error()}
    msgs = []
    for nid in st.active_node_ids:
        nb = st.nid_to_neighbours[nid]
        cfg = ConfigRecord({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: list(nb & st.active_node_ids),
                            Key.DEAD_NODE_ID_LIST: list((nb & (st.sampled_node_ids - st.active_node_ids)) | ({target} & nb))})
        msgs.append(Message(content=RecordDict({RECORD_KEY_CONFIGS: cfg}), dst_node_id=nid, message_type="train", group_id="1"))
    replies = sg.send_and_receive(msgs)
    b_sh, sk_sh = [], []
    for r in replies:
        if r.has_error():
            continue
        c = r.content.config_records[RECORD_KEY_CONFIGS]
        nids, shares = list(c[Key.NODE_ID_LIST]), list(c[Key.SHARE_LIST])
        # the reply lists active ids first, then dead ids (secaggplus_mod._unmask): the target's
        # first share is of its mask seed, its second of its sk1
        mine = [s for n, s in zip(nids, shares) if n == target]
        if len(mine) == 2:
            b_sh.append(mine[0])
            sk_sh.append(mine[1])
    if len(b_sh) < THRESHOLD or len(sk_sh) < THRESHOLD:
        return None
    b, sk1 = combine_shares(b_sh), combine_shares(sk_sh)
    vec = masked[target]
    shapes = [a.shape for a in vec]
    vec = [v - m for v, m in zip(vec, pseudo_rand_gen(b, M_RANGE, shapes))]
    for nb in st.nid_to_neighbours[target] - {target}:
        key = generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(st.nid_to_publickeys[nb][0]))
        pm = pseudo_rand_gen(key, M_RANGE, shapes)
        vec = [v - m for v, m in zip(vec, pm)] if target > nb else [v + m for v, m in zip(vec, pm)]
    vec = parameters_mod(vec, M_RANGE)
    q_ratio = int(vec[0][0])
    x = dequantize(vec[1:], C_RANGE, Q_RANGE)
    return np.concatenate([a.ravel() for a in x]) / (q_ratio / Q_RANGE)


# ---------------------------------------------------------------- checks and report
def error_bound(dq: list[float], spread: np.ndarray) -> np.ndarray:
    """Per coordinate: |secure - plain FedAvg| < [n (1 + 3.5 Q 2^-24) 2c + n spread / 2] / (Q D),
    D = sum of the quantized weight ratios (see docs/secagg-design.md for the derivation)."""
    n, D = len(dq), sum(dq)
    return (n * (1 + 3.5 * Q_RANGE * 2.0**-24) * 2 * C_RANGE + n * spread / 2) / (Q_RANGE * D)


def analyse(received):
    """Every array in the replies the server process received (ArrayRecords, and npy bytes in
    ConfigRecords: SecAgg+ sends its masked vector there), compared with each client's tensors."""
    arrays = []
    for stage, r in received:
        if r.has_error():
            continue
        for name, rec in r.content.array_records.items():
            arrays += [(stage, f"ArrayRecord {name}[{k}]", a.numpy()) for k, a in rec.items()]
        for name, rec in r.content.config_records.items():
            for k, v in rec.items():
                for b in (v if isinstance(v, list) else [v]):
                    if isinstance(b, bytes) and b[:6] == b"\x93NUMPY":
                        arrays.append((stage, f"ConfigRecord {name}[{k}]", bytes_to_ndarray(b)))
    # compare every received array with every client's tensor of the same shape (the masked
    # vector travels per tensor): as the update, as the weighted update, and as the local result
    refs = []
    for n in NODE_IDS:
        for k in SHAPES:
            refs += [UPDATES[n][k].astype(np.float64), (GLOBAL[k] + UPDATES[n][k]).astype(np.float64)]
    big = [(s, where, a) for s, where, a in arrays if a.size >= 100]
    hits, maxcorr, compared, chance = 0, 0.0, 0, 0.0
    noise = np.random.default_rng(5)
    for s, where, a in big:
        v = a.astype(np.float64)
        for ref in refs:
            if v.shape != ref.shape:
                continue
            compared += 1
            if np.allclose(v, ref, atol=1e-3) or np.allclose(v / max(np.abs(v).max(), 1e-30), ref / np.abs(ref).max(), atol=1e-2):
                hits += 1
            maxcorr = max(maxcorr, abs(np.corrcoef(v.ravel(), ref.ravel())[0, 1]))
            chance = max(chance, abs(np.corrcoef(noise.integers(0, M_RANGE, v.size), ref.ravel())[0, 1]))
    return arrays, big, hits, maxcorr, compared, chance


def run_case(title, silent: dict[int, str], *, restart=False, guard=False, malicious=False):
    print(f"\n== {title}")
    apps = {g: make_app(g) for g in (False, True)}
    grid = LocalGrid({n: responder(apps[guard], n, silent.get(n)) for n in NODE_IDS})
    weights, capped = cap_weights(CLAIMS, 1.0)
    t0 = time.perf_counter()
    if malicious:
        sg, st, stolen, _ = secure_round(grid, NODE_IDS, 1, weights, malicious_target=NODE_IDS[0])
        truth = flat(UPDATES[NODE_IDS[0]])
        if stolen is None:
            print(f"    malicious unmask got too few shares of node ...{str(NODE_IDS[0])[-4:]}: nothing recovered")
            errs = [e for s in sg.stages for e in s["errors"]]
            print(f"    client errors: {errs[0] if errs else None} (x{len(errs)})")
        else:
            print(f"    malicious server recovered node ...{str(NODE_IDS[0])[-4:]}'s own update: max |recovered - true| = {np.max(np.abs(stolen - truth)):.2e} (|update| ~ {np.std(truth):.3f})")
        return
    sg, st, agg, (used, weights) = secure_round(grid, NODE_IDS, 1, None, restart_on_early_drop=restart)
    dt = time.perf_counter() - t0
    for s in sg.stages:
        per_up = f"{np.mean(s['up']):,.0f}" if s["up"] else "-"
        print(f"    stage {s['stage']:<24} sent {s['sent']} ok {s['replies']}  down {sum(s['down']):>8,} B ({np.mean(s['down']):>7,.0f}/client)  up {sum(s['up']):>8,} B ({per_up:>7}/client)"
              + (f"  errors: {s['errors'][0][:90]}" if s["errors"] else ""))
    # the aggregate holds every node whose masked vector arrived (a node lost in unmask included)
    survivors = sorted(r.metadata.src_node_id for s, r in sg.received if s == Stage.COLLECT_MASKED_VECTORS and not r.has_error())
    if agg is None:
        print(f"    released nothing (round halted); global stays.  [{dt:.2f} s]")
        return
    top = max(weights.values())
    dq = [round(weights[n] / top * MAX_W / MAX_W * Q_RANGE) / Q_RANGE for n in survivors]
    secure_mean_update = np.concatenate([a.ravel() for a in agg])
    ups = np.stack([flat(UPDATES[n]) for n in survivors])
    w = np.array([weights[n] for n in survivors])
    plain = (w[:, None] * ups).sum(0) / w.sum()  # plain FedAvg (capped weights) of the survivors' updates
    err = np.abs(secure_mean_update - plain)
    bound = error_bound(dq, ups.max(0) - ups.min(0))
    print(f"    in the sum {len(survivors)}/{N} (answered unmask: {len(st.active_node_ids)}); weights used (capped from the claims in the setup replies) {[round(weights[n], 1) for n in survivors]}  [{dt:.2f} s]")
    print(f"    max |secure - plain FedAvg| = {err.max():.3e}   derived bound (max over coords) {bound.max():.3e}   within bound: {bool(np.all(err < bound))}")
    arrays, big, hits, maxcorr, compared, chance = analyse(sg.received)
    kinds = sorted({f"{s}: {where} {a.dtype} {a.shape}" for s, where, a in arrays})
    print(f"    server received {len(arrays)} arrays ({len(big)} of >= 100 elements; {compared} same-shape comparisons with clients' updates and local tensors): equal (or equal up to scale): {hits}; max |corr| {maxcorr:.3f} (uniform noise in the same comparisons: {chance:.3f})")
    for k in kinds:
        print(f"      {k}")
    st2 = next(r for s, r in sg.received if s == Stage.COLLECT_MASKED_VECTORS and not r.has_error())
    print(f"    a collect_masked_vectors reply carries: " + ", ".join(f"{k}={dict(v) if not isinstance(v, ArrayRecord) and k != RECORD_KEY_CONFIGS else type(v).__name__ + '(' + ','.join(v.keys()) + ')'}" for k, v in st2.content.items()))
    empty = [(name, len(rec)) for _, r in sg.received if not r.has_error() for name, rec in r.content.array_records.items()]
    if empty:
        print(f"      array records in replies (names, entries): {sorted(set(empty))}")


def plain_bytes():
    from fedprompt.server.localgrid import set_task_identity
    set_task_identity(1)
    msg = Message(RecordDict({"arrays": to_record(GLOBAL), "config": ConfigRecord({"server-round": 1})}), dst_node_id=NODE_IDS[0], message_type="train")
    local = {k: GLOBAL[k] + UPDATES[NODE_IDS[0]][k] for k in GLOBAL}
    rep = RecordDict({"arrays": to_record(local), "metrics": MetricRecord({"num-examples": 30, "train_loss": 0.5})})
    g = LocalGrid({NODE_IDS[0]: lambda m: Message(rep, reply_to=m)})
    down = wire_bytes(msg)
    (r,) = g.pull_messages(g.push_messages([msg]))
    return down, wire_bytes(r)


def plain_control():
    """The recorder's positive control: a plain round through the same analysis must find every
    client's local tensors."""
    def plain_node(n):
        def respond(m):
            local = {k: GLOBAL[k] + UPDATES[n][k] for k in GLOBAL}
            return wire(Message(RecordDict({"arrays": to_record(local), "metrics": MetricRecord({"num-examples": 1})}), reply_to=m))
        return respond

    grid = LocalGrid({n: plain_node(n) for n in NODE_IDS})
    msgs = [Message(RecordDict({"arrays": to_record(GLOBAL)}), dst_node_id=n, message_type="train") for n in NODE_IDS]
    replies = exchange(grid, msgs, 1.0)
    arrays, big, hits, maxcorr, compared, chance = analyse([("plain", r) for r in replies])
    print(f"\n== positive control, plain round through the same recorder: {len(arrays)} arrays, equal to a client's tensor: {hits} of {len(big)}")


def prg_demo():
    print("\n== Flower's mask PRG (secaggplus_utils.pseudo_rand_gen): the seed is folded to 32 bits")
    s1 = bytes(range(32))
    s2 = s1[4:8] + s1[0:4] + s1[8:]  # swap two 4-byte words: same XOR fold
    m1, m2 = pseudo_rand_gen(s1, M_RANGE, [(1000,)]), pseudo_rand_gen(s2, M_RANGE, [(1000,)])
    print(f"    two different 32-byte seeds, same fold -> identical masks: {bool(np.array_equal(m1[0], m2[0]))}")
    t = time.perf_counter()
    for s in range(2000):
        np.random.RandomState(s).randint(0, M_RANGE - 1, 4, dtype=np.int64)
    per = (time.perf_counter() - t) / 2000
    print(f"    one seed guess (numpy, 4 outputs) {per * 1e6:.1f} us -> 2^32 guesses {per * 2**32 / 3600:.1f} core-hours here")
    big = [(450_000,)]
    t = time.perf_counter()
    pseudo_rand_gen(s1, M_RANGE, big)
    print(f"    one mask for a 450k-element (1.8 MB LoRA) payload: {1e3 * (time.perf_counter() - t):.1f} ms")


if __name__ == "__main__":
    print(f"flower SecAgg+ spike: {N} clients, {sum(int(np.prod(s)) for s in SHAPES.values())} floats, num_shares {NUM_SHARES}, "
          f"threshold {THRESHOLD}, clipping_range {C_RANGE}, quantization_range 2^{Q_RANGE.bit_length() - 1}, modulus 2^{M_RANGE.bit_length() - 1}, max_weight {MAX_W:g}")
    w, capped = cap_weights(CLAIMS, 1.0)
    print(f"claims {[CLAIMS[n] for n in NODE_IDS]} -> capped weights (trust.cap_weights, factor 1) {[w[n] for n in NODE_IDS]}")
    d, u = plain_bytes()
    print(f"plain round, one client: down {d:,} B, up {u:,} B")
    run_case("no dropout", {})
    if os.environ.get("SPIKE_FLOATS"):
        raise SystemExit
    run_case("1 of 5 SIGKILLed after share-keys (silent from collect_masked_vectors)", {NODE_IDS[1]: Stage.COLLECT_MASKED_VECTORS})
    run_case("2 of 5 after share-keys (threshold 3: at the limit)", {n: Stage.COLLECT_MASKED_VECTORS for n in NODE_IDS[1:3]})
    run_case("3 of 5 after share-keys (below threshold)", {n: Stage.COLLECT_MASKED_VECTORS for n in NODE_IDS[1:4]})
    run_case("1 of 5 dies DURING share-keys (never sends its shares), Flower's stages as is", {NODE_IDS[1]: Stage.SHARE_KEYS})
    run_case("same, the loop restarts setup with the survivors", {NODE_IDS[1]: Stage.SHARE_KEYS}, restart=True)
    run_case("1 of 5 dies after sending its masked vector (silent in unmask)", {NODE_IDS[1]: Stage.UNMASK})
    run_case("malicious server: target named active AND dead in unmask", {}, malicious=True)
    run_case("same, clients run a guard mod refusing active & dead overlap", {}, malicious=True, guard=True)
    plain_control()
    prg_demo()
