"""Secure aggregation's cost: a plain round vs a secure round (SecAgg+), round time and bytes per
client, for the prompt and LoRA payloads and 4, 5 and 10 clients, measured in one run.

    python benchmarks/secagg_cost.py [--out runs/bench/secagg] [--long]

Every round is the server's real round loop (`server.rounds.train_round`, the one `serve`
calls each round, as tests/test_secagg.py drives it) over the in-process `LocalGrid`; every
message crosses a protobuf round trip. The clients are numpy clients behind the real secure
chain (`client.secagg.secure_app`: fedprompt's claim, guard and bridge mods around Flower's
`secaggplus_mod`) whose training is replaced by a fixed update of the payload's real size
(the shapes of tests/golden/manifests.json), so the figures are the protocol's own cost, not
training. Each configuration runs plain and secure rounds alternately (median of 3 each; the
spread is min-max), every round from the same global, so each secure round's mean is also
checked against the plain round's within the quantization bound.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import quiet_env, write_result  # noqa: E402

PAYLOADS = {  # name -> the golden manifest whose shapes the payload has
    "prompt (MiniLM)": "bbc-minilm-prompt",
    "LoRA (SmolLM2)": "bbc-smollm2-lora",
}
CLAIM = 100.0  # every client's example count: equal weights
C = 0.5  # federation.clipping_range; the updates are ~N(0, 0.01), far inside it
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
STAGE_S: dict[str, float] = defaultdict(float)  # seconds inside each of Flower's stage methods


def _time_stages() -> None:
    """Time Flower's four stage methods (the round loop calls them one at a time), so a stage's
    server-side work is its wall time less the time its messages spent at the clients."""
    from flwr.server.workflow import SecAggPlusWorkflow

    def timed(fn):
        @functools.wraps(fn)  # keeps __name__: server/secagg.py names the stage by it
        def wrapper(self, grid, context, state):
            t0 = time.perf_counter()
            try:
                return fn(self, grid, context, state)
            finally:
                STAGE_S[fn.__name__.removesuffix("_stage")] += time.perf_counter() - t0

        return wrapper

    for s in STAGES:
        setattr(SecAggPlusWorkflow, f"{s}_stage", timed(getattr(SecAggPlusWorkflow, f"{s}_stage")))


class TimedGrid:
    """The LocalGrid (which answers at push time), with the seconds spent in it per stage: the
    clients' work and the protobuf round trips."""

    def __init__(self, grid):
        self.grid, self.seconds, self.stage = grid, defaultdict(float), "plain"

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        from fedprompt.client.secagg import stage_of

        msgs = list(messages)
        self.stage = (stage_of(msgs[0]) if msgs else None) or "plain"
        t0 = time.perf_counter()
        try:
            return self.grid.push_messages(msgs)
        finally:
            self.seconds[self.stage] += time.perf_counter() - t0

    def pull_messages(self, ids):
        t0 = time.perf_counter()
        try:
            return self.grid.pull_messages(ids)
        finally:
            self.seconds[self.stage] += time.perf_counter() - t0


def _node(nid: int, update: dict):
    """A client whose training adds its fixed `update` to the global, behind the same secure
    chain as the real ClientApp, every message through a protobuf round trip."""
    from flwr.app import Context, Message, MetricRecord, RecordDict

    from fedprompt.client import secagg as client_secagg
    from fedprompt.protocol import NUM_EXAMPLES
    from fedprompt.server.localgrid import through_wire
    from fedprompt.wire import from_record, to_record

    ctx = Context(run_id=0, node_id=nid, node_config={}, state=RecordDict(), run_config={})

    def train(msg, _ctx):
        g = from_record(msg.content["arrays"])
        local = {k: g[k] + update[k] for k in g}
        return Message(RecordDict({"arrays": to_record(local), "metrics": MetricRecord({NUM_EXAMPLES: CLAIM, "train_loss": 0.5})}), reply_to=msg)

    app = client_secagg.secure_app(lambda m, c: CLAIM, train)

    def respond(msg):
        msg = through_wire(msg)
        return through_wire(app(msg, ctx) if client_secagg.is_secure(msg) else train(msg, ctx))

    return respond


def _cfg(n: int, secure: bool):
    from fedprompt.config import load_config

    return load_config(
        None,
        [
            f"federation.num_clients={n}",
            f"federation.min_clients={n}",
            "federation.fraction_fit=1.0",
            "federation.fraction_evaluate=0",
            f"federation.secure_aggregation={str(secure).lower()}",
            "federation.reject_norm_factor=0",  # screening needs individual updates: refused under secure
            f"federation.clipping_range={C}",
        ],
    )


def refused_three() -> str:
    """What fedprompt says to a secure round of 3 clients."""
    from fedprompt.config import ConfigError

    try:
        _cfg(3, True)
    except ConfigError as e:
        return " ".join(str(e).split())
    return ""


def _shapes(manifest: str) -> dict[str, tuple[int, ...]]:
    golden = json.loads((ROOT / "tests" / "golden" / "manifests.json").read_text())
    return {name: tuple(shape) for name, shape, _ in golden[manifest]}


def measure(payload: str, n: int, repeats: int, seed: int = 0) -> dict:
    """`repeats` plain and `repeats` secure rounds, alternately, over one grid of `n` clients."""
    import numpy as np

    from fedprompt import checkpoint
    from fedprompt import payload as fpayload
    from fedprompt.server import strategies as fs
    from fedprompt.server.localgrid import LocalGrid
    from fedprompt.server.rounds import Watch, train_round
    from fedprompt.server.trust import Patience

    rng = np.random.default_rng(seed)
    shapes = _shapes(PAYLOADS[payload])
    glob = {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in shapes.items()}
    updates = {100 + i: {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()} for i in range(n)}
    grid = TimedGrid(LocalGrid({nid: _node(nid, u) for nid, u in updates.items()}))
    manifest = fpayload.manifest_from(glob)
    modes = {secure: (_cfg(n, secure), Watch(Patience(120.0))) for secure in (False, True)}
    strategies = {secure: fs.make_strategy(cfg) for secure, (cfg, _) in modes.items()}
    state = checkpoint.ServerState(round=0, tensors=glob, rows=[{"round": 0}])
    got = {False: [], True: []}
    results = {}
    rnd = 0
    for _ in range(repeats):
        for secure in (False, True):
            rnd += 1
            cfg, watch = modes[secure]
            grid.seconds.clear()
            STAGE_S.clear()
            t0 = time.perf_counter()
            tensors, row = train_round(grid, cfg, strategies[secure], state, rnd, manifest, centralized=False, watch=watch)
            wall = time.perf_counter() - t0
            if not row["released"] or row["clients"] != n:
                why = row.get("released_why")
                raise SystemExit(f"{payload}, {n} clients, round {rnd} (secure {secure}): released {row['released']}, {row['clients']} clients: {why}")
            got[secure].append(
                {
                    "s": wall,
                    "down": row["bytes_down"],
                    "up": row["bytes_up"],
                    "stages": row.get("bytes_stages"),
                    "unmask_server_s": STAGE_S["unmask"] - grid.seconds["unmask"] if secure else None,
                    "server_s": sum(STAGE_S[s] - grid.seconds[s] for s in STAGES) if secure else None,
                    "bound": row.get("secagg_error_bound"),
                }
            )
            results[secure] = tensors
            state.round, state.rows = rnd, [*state.rows, row]  # the global stays: every round starts from it
    flat = {s: np.concatenate([np.asarray(results[s][k], np.float64).ravel() for k in glob]) for s in results}
    p, s = got[False], got[True]

    def med(xs):
        return statistics.median(xs)

    return {
        "payload": payload,
        "clients": n,
        "floats": int(sum(np.prod(x) for x in shapes.values())),
        "tensors": len(shapes),
        "plain_s": med([r["s"] for r in p]),
        "plain_spread": (min(r["s"] for r in p), max(r["s"] for r in p)),
        "secure_s": med([r["s"] for r in s]),
        "secure_spread": (min(r["s"] for r in s), max(r["s"] for r in s)),
        "unmask_server_s": med([r["unmask_server_s"] for r in s]),
        "server_s": med([r["server_s"] for r in s]),
        "plain_down": p[-1]["down"],
        "plain_up": p[-1]["up"],
        "secure_down": s[-1]["down"],
        "secure_up": s[-1]["up"],
        "stages": s[-1]["stages"],
        "max_diff": float(np.abs(flat[True] - flat[False]).max()),
        "bound": s[-1]["bound"],
        "bound_ok": bool(np.abs(flat[True] - flat[False]).max() < s[-1]["bound"]),
    }


def _kb(b: int) -> str:
    return f"{b / 1e3:,.1f} KB" if b < 1e6 else f"{b / 1e6:,.2f} MB"


def _s(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def main() -> int:
    quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="5 rounds of each kind, and 20 clients too")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "secagg"))
    args = ap.parse_args()
    clients = [4, 5, 10, 20] if args.long else [4, 5, 10]
    repeats = 5 if args.long else 3
    _time_stages()
    t_start = time.perf_counter()
    measure(next(iter(PAYLOADS)), 4, 1)  # warm-up (imports, first allocations); not reported
    res = []
    for payload in PAYLOADS:
        for n in clients:
            r = measure(payload, n, repeats)
            res.append(r)
            print(
                f"[secagg] {payload}, {n} clients: plain {r['plain_s']:.3f} s, secure {r['secure_s']:.3f} s "
                f"(x{r['secure_s'] / r['plain_s']:.1f}), up {r['plain_up']:,} -> {r['secure_up']:,} B, "
                f"max |secure - plain| {r['max_diff']:.2e} < {r['bound']:.2e}: {r['bound_ok']}",
                flush=True,
            )
    took = time.perf_counter() - t_start
    why3 = refused_three()
    lines = [
        f"One plain and one secure (SecAgg+) training round of fedprompt's round loop (`server.rounds.train_round`) over the "
        f"in-process grid, {repeats} of each alternately per configuration, every round from the same global. The clients "
        "are numpy clients behind the real secure chain (fedprompt's mods around Flower's `secaggplus_mod`) whose training "
        "is a fixed update of the payload's real shapes (tests/golden/manifests.json), so the time is the protocol's own: "
        "the clients' masking and key work, the server's stages, and every message's protobuf round trip, with no "
        "training and no network latency. Equal weights, `clipping_range` 0.5, `quantization_range` 2^22, num_shares = "
        "all clients, threshold a strict majority (4 clients: 3; 5: 3; 10: 6).",
        "",
        "| payload | clients | plain round s | secure round s | secure / plain | server unmasking s | server, all stages s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res:
        lo, hi = r["plain_spread"]
        slo, shi = r["secure_spread"]
        lines.append(
            f"| {r['payload']}, {r['floats']:,} floats ({_kb(4 * r['floats'])}) | {r['clients']} | "
            f"{_s(r['plain_s'])} ({_s(lo)}-{_s(hi)}) | {_s(r['secure_s'])} ({_s(slo)}-{_s(shi)}) | "
            f"{r['secure_s'] / r['plain_s']:.1f}x | {_s(r['unmask_server_s'])} | {_s(r['server_s'])} |"
        )
    lines += [
        "",
        "Bytes per client per round (the rows' `bytes_down` / `bytes_up`: the largest client's; a secure round's are its sums over the four stages):",
        "",
        "| payload | clients | plain down | plain up | secure down | secure up | down secure / plain | up secure / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        lines.append(
            f"| {r['payload']} | {r['clients']} | {r['plain_down']:,} | {r['plain_up']:,} | {r['secure_down']:,} | "
            f"{r['secure_up']:,} | {r['secure_down'] / r['plain_down']:.2f}x | {r['secure_up'] / r['plain_up']:.2f}x |"
        )
    lines += [
        "",
        "A secure round's bytes per client by stage (the row's `bytes_stages`, largest client, down / up):",
        "",
        "| payload | clients | " + " | ".join(STAGES) + " |",
        "|---|---|" + "---|" * len(STAGES),
    ]
    for r in res:
        cells = [f"{r['stages'][s]['down']:,} / {r['stages'][s]['up']:,}" for s in STAGES]
        lines.append(f"| {r['payload']} | {r['clients']} | " + " | ".join(cells) + " |")
    worst = max(res, key=lambda r: r["max_diff"] / r["bound"])
    lines += [
        "",
        "Times: seconds per round, median of the rounds (min-max in brackets). Server unmasking: the unmask stage's "
        "work on the server (rebuilding the seeds from the shares, regenerating and removing every client's masks, "
        "dequantizing), i.e. the stage's wall time less the time its messages spent at the clients and on the "
        "in-process wire. Server, all stages: the same for the four stages together (building "
        "and counting the messages, summing the masked vectors, unmasking); the rest of a secure round is the clients' work "
        "(keys, masking) and the protobuf round trips. In-process there is no message latency; in deployment each of a secure round's four "
        "exchanges (one for a plain round) also waits for the clients to pull (a SuperNode polls every 3 s).",
        "",
        f"3 clients are not measured: fedprompt refuses a secure round of 3 clients ({why3 or 'refusal not reproduced'}). 4 is the smallest secure round.",
        "",
        f"Every secure round's mean matched the plain round's on the same updates within the quantization bound "
        f"({'yes' if all(r['bound_ok'] for r in res) else 'NO'}; worst: {worst['payload']}, {worst['clients']} clients, "
        f"max |secure - plain| {worst['max_diff']:.2e} < bound {worst['bound']:.2e}). Measured in {took:.0f} s.",
    ]
    summary = {"wall_s": round(took, 1), "all_within_bound": all(r["bound_ok"] for r in res)}
    for r in res:
        key = f"{'prompt' if 'prompt' in r['payload'] else 'lora'}_{r['clients']}"
        summary[f"{key}_plain_s"] = round(r["plain_s"], 4)
        summary[f"{key}_secure_s"] = round(r["secure_s"], 4)
        summary[f"{key}_time_ratio"] = round(r["secure_s"] / r["plain_s"], 2)
        summary[f"{key}_unmask_server_s"] = round(r["unmask_server_s"], 4)
        summary[f"{key}_server_stages_s"] = round(r["server_s"], 4)
        summary[f"{key}_up_ratio"] = round(r["secure_up"] / r["plain_up"], 3)
        summary[f"{key}_down_ratio"] = round(r["secure_down"] / r["plain_down"], 3)
    write_result(Path(args.out), title="Secure aggregation: cost per round", markdown="\n".join(lines), summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
