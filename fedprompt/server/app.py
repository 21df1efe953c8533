"""The ServerApp: fedprompt's round loop around a Flower strategy.

Each round: sample and message clients (the strategy), validate every reply against the
payload manifest (ours), aggregate (the strategy), evaluate (federated, and centralized in
simulation), checkpoint, then append the metrics row. The server never loads a backbone: the
initial tensors come from one client (a "query" message) and it only ever holds the payload.
It reads everything from the run directory (`output` in the run config): config.yaml in,
checkpoint, metrics.jsonl, adapter/, curves.png, summary.json and status.json out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedprompt import checkpoint, payload
from fedprompt.config import Config, load_config
from fedprompt.protocol import MESSAGE_TYPE, Kind
from fedprompt.report import append_jsonl, plot_curves
from fedprompt.server.aggregate import aggregate, log, screen_and_bound
from fedprompt.server.strategies import WEIGHT_KEY, WORKER_KEYS, client_dp, make_strategy, restore_strategy, sampled_clients, strategy_state, weighted_mean
from fedprompt.wire import error_reason, from_record, to_record, wire_bytes

app = ServerApp()
STATUS = "status.json"


class FederationError(RuntimeError):
    """The federation cannot go on (no usable update in a round, no client ever connected)."""


def _die_with(pid: int) -> None:
    """Exit this process as soon as process `pid` (our SuperLink) is gone. Flower starts the
    ServerApp in a session of its own, so a killed `fedprompt server` would otherwise leave it
    running, and a restarted server would find it still writing to the run directory."""
    import os
    import threading

    import psutil

    try:
        link = psutil.Process(pid)
    except psutil.NoSuchProcess:
        os._exit(3)

    def watch() -> None:
        while link.is_running() and link.status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _lock(out: Path):
    """An exclusive lock on the run directory for this ServerApp's lifetime (a stale one from
    a killed server is waited for, never raced)."""
    import fcntl

    f = open(out / ".server.lock", "w")
    t0 = time.monotonic()
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() - t0 > 60:
                raise FederationError(f"{out} is in use by another fedprompt server process") from None
            time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output"]))
    simulation = str(context.run_config["mode"]) == "simulation"
    if int(context.run_config.get("superlink-pid", 0)):
        _die_with(int(context.run_config["superlink-pid"]))
    lock = _lock(out)
    try:
        cfg = load_config(out / "config.yaml")
        serve(grid, cfg, out, centralized=simulation and cfg.federation.centralized_eval)
    except BaseException as e:
        # The CLI follows the run from outside this process: leave it the reason in one line.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        (out / STATUS).write_text(json.dumps({"state": "failed", "error": f"{type(e).__name__}: {reason}"}))
        raise
    (out / STATUS).write_text(json.dumps({"state": "done"}))
    lock.close()


def exchange(grid: Grid, messages: list[Message], timeout: float | None, poll: float = 0.1) -> list[Message]:
    """Push `messages`, then pull replies until all are in or `timeout` seconds passed.
    Flower's HTTP Grid.send_and_receive sleeps 3 s between pulls, which adds up to 3 s to
    every exchange of a deployment round; this polls every `poll` seconds instead."""
    pending = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending and (end is None or time.monotonic() < end):
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(poll)
    return replies


def _wait_for_nodes(grid: Grid, n: int) -> list[int]:
    said = False
    while len(nodes := sorted(grid.get_node_ids())) < n:
        if not said:
            log(f"waiting for {n} client(s) to connect ({len(nodes)} connected)")
            said = True
        time.sleep(0.5)
    return nodes


def _ask(grid: Grid, node: int, kind: Kind, content: RecordDict, timeout: float | None) -> Message:
    """One message to one node, its reply or a FederationError saying why there is none."""
    msg = Message(content=content, dst_node_id=node, message_type=MESSAGE_TYPE[kind])
    replies = exchange(grid, [msg], timeout)
    if not replies:
        raise FederationError(f"node {node} did not answer the {kind} request within {timeout} s")
    if replies[0].has_error():
        raise FederationError(f"node {node} failed the {kind} request: {error_reason(replies[0])}")
    return replies[0]


def _start(grid: Grid, cfg: Config, timeout: float | None) -> checkpoint.ServerState:
    """Round 0: the initial payload from one client (clients seed it identically)."""
    node = _wait_for_nodes(grid, 1)[0]
    rep = _ask(grid, node, Kind.INIT, RecordDict({"config": ConfigRecord({"server-round": 0})}), timeout)
    tensors = from_record(rep.content["arrays"])
    payload.validate(tensors, payload.manifest_from(tensors), source=f"node {node} (initial payload)")
    log(f"initial payload from node {node}: {len(tensors)} tensors, {sum(v.nbytes for v in tensors.values()):,} bytes")
    return checkpoint.ServerState(round=0, tensors=tensors, adapter_config=str(rep.content["adapter"]["config"]), config_yaml=cfg.to_yaml())


def _check_reply(rep: Message, manifest: payload.Manifest) -> dict:
    """The reply's metrics once its payload matches the manifest exactly; else PayloadError."""
    node = rep.metadata.src_node_id
    if "arrays" not in rep.content or "metrics" not in rep.content:
        raise payload.PayloadError(f"payload from node {node}: the reply has no tensors or no metrics")
    payload.validate(from_record(rep.content["arrays"]), manifest, source=f"node {node}")
    metrics = dict(rep.content["metrics"])
    if not float(metrics.get(WEIGHT_KEY, 0)) > 0:
        raise payload.PayloadError(f"payload from node {node}: {WEIGHT_KEY} must be > 0, got {metrics.get(WEIGHT_KEY)}")
    return metrics


def _evaluate(grid: Grid, strategy, rnd: int, tensors: dict, *, centralized: bool, timeout: float | None) -> dict:
    """accuracy/loss of the global payload: federated (clients' local test splits, weighted by
    examples) and, in simulation, centralized (the whole held-out test split, by one worker)."""
    row: dict = {}
    msgs = list(strategy.configure_evaluate(rnd, to_record(tensors), ConfigRecord({}), grid))
    if msgs:
        replies = [m for m in exchange(grid, msgs, timeout) if not m.has_error()]
        agg = strategy.aggregate_evaluate(rnd, replies) if replies else None
        if agg is not None:
            row.update({f"fed_{k}": float(v) for k, v in agg.items() if k != WEIGHT_KEY})
            row["fed_examples"] = int(agg[WEIGHT_KEY])
    if centralized:
        node = sorted(grid.get_node_ids())[0]
        content = RecordDict({"arrays": to_record(tensors), "config": ConfigRecord({"scope": "centralized", "server-round": rnd})})
        m = dict(_ask(grid, node, Kind.EVALUATE, content, timeout).content["metrics"])
        row.update({k: float(v) for k, v in m.items() if k not in (WEIGHT_KEY, *WORKER_KEYS)})
    else:  # deployment: the server holds no data; the federated figures are the figures
        row.update({k[4:]: v for k, v in list(row.items()) if k.startswith("fed_") and k != "fed_examples"})
    row.setdefault("accuracy", None)
    row.setdefault("loss", None)
    return row


def _round(
    grid: Grid, cfg: Config, strategy, state: checkpoint.ServerState, rnd: int, manifest: payload.Manifest, *, centralized: bool, timeout: float | None
) -> tuple[dict, dict]:
    """One round: (new global tensors, metrics row)."""
    t0 = time.perf_counter()
    pr = cfg.privacy
    msgs = list(strategy.configure_train(rnd, to_record(state.tensors), ConfigRecord({}), grid))
    down = wire_bytes(msgs[0]) if msgs else 0
    # Replies arrive in any order; aggregating in node order makes a round's result a function
    # of who took part, not of who answered first (so a resumed run repeats it bit for bit).
    replies = sorted(exchange(grid, msgs, timeout), key=lambda m: m.metadata.src_node_id)
    good, ups, workers, problems = [], [], {}, []
    for rep in replies:
        node = rep.metadata.src_node_id
        if rep.has_error():
            problems.append(f"node {node} failed: {error_reason(rep)}")
            continue
        try:
            metrics = _check_reply(rep, manifest)
        except payload.PayloadError as e:
            problems.append(f"rejected: {e}")
            continue
        good.append(rep)
        ups.append(wire_bytes(rep))
        if "pid" in metrics:
            workers[str(int(metrics["pid"]))] = int(metrics.get("backbone_loads", 0))
    if len(replies) < len(msgs):
        problems.append(f"{len(msgs) - len(replies)} of {len(msgs)} sampled clients did not reply within {timeout} s")
    # Every client that trained spent its privacy, kept or not: its epsilon counts.
    privacy_row = _privacy_row(cfg, state.rows[-1], good)
    good, robust_row = screen_and_bound(cfg, rnd, state.tensors, good, problems)
    for p in problems:
        log(f"round {rnd}: {p}")
    if not good:
        why = problems[0] if problems else "no client was sampled"
        raise FederationError(f"round {rnd}: no usable update from {len(msgs)} sampled clients ({why})")
    if client_dp(cfg) and not len(good) == len(msgs) == sampled_clients(cfg):
        # The noise is sized for m = sampled_clients updates; a mean over any other number
        # would leak more than accounted. The round releases nothing: the global state stays.
        log(f"round {rnd}: client-level DP needs exactly {sampled_clients(cfg)} sampled updates, got {len(good)} of {len(msgs)} sampled; nothing aggregated")
        tensors, train, released = state.tensors, weighted_mean([r.content for r in good], WEIGHT_KEY), False
    else:
        tensors, train, released = aggregate(cfg, strategy, rnd, state, good, manifest)
        if client_dp(cfg):  # a noised aggregate was computed: kept or not, it counts as a release
            privacy_row.update(_client_epsilon(cfg, privacy_row["dp_releases"] + 1), dp_releases=privacy_row["dp_releases"] + 1)
    if client_dp(cfg):
        privacy_row["clip_norm"] = float(strategy.clipping_norm)
        if pr.mode == "client":
            privacy_row["epsilon"] = privacy_row["client_epsilon"]
    t_train = time.perf_counter() - t0
    row = {"round": rnd, "step": rnd * cfg.round_steps}
    t1 = time.perf_counter()
    row.update(_evaluate(grid, strategy, rnd, tensors, centralized=centralized, timeout=timeout))
    t_eval = time.perf_counter() - t1
    row.update(
        {
            "train_loss": float(train["train_loss"]) if train and "train_loss" in train else None,
            "clients": len(good),
            "failures": len(msgs) - len(good),
            "examples": int(train[WEIGHT_KEY]),  # our aggregator sums the weights
            "bytes_up": max(ups),
            "bytes_up_total": sum(ups),
            "bytes_down": down,
            "bytes_down_total": down * len(msgs),
            "train_s": round(t_train, 3),
            "eval_s": round(t_eval, 3),
            "round_s": round(time.perf_counter() - t0, 3),
            "client_train_s": float(train["train_s"]) if train and "train_s" in train else None,
            "backbone_loads": workers,
            "released": released,
            **robust_row,
            **privacy_row,
        }
    )
    return tensors, row


def _privacy_row(cfg: Config, prev: dict, replies: list[Message]) -> dict:
    """Privacy figures of a round, before this round's client-level release: the largest
    sample-level epsilon any client has reported so far (each client's only grows) and the
    client-level releases so far."""
    out: dict = {}
    if cfg.privacy.mode in ("sample", "both"):
        eps = [float(r.content["metrics"]["epsilon"]) for r in replies if "epsilon" in r.content["metrics"]]
        out["epsilon"] = max([prev.get("epsilon") or 0.0, *eps])
    if client_dp(cfg):
        releases = int(prev.get("dp_releases", 0))
        out.update(_client_epsilon(cfg, releases), dp_releases=releases)
    return out


def _client_epsilon(cfg: Config, releases: int) -> dict:
    """Client-level epsilon after `releases` noised aggregates (Gaussian mechanism, no
    sampling amplification claimed: Flower samples a fixed-size subset)."""
    from fedprompt.privacy import gaussian_epsilon

    p = cfg.privacy
    return {"client_epsilon": gaussian_epsilon(p.client_noise_multiplier, releases, p.delta)}


def serve(grid: Grid, cfg: Config, out: Path, *, centralized: bool) -> None:
    """Run (or resume) the federation described by `cfg`, writing the run directory `out`."""
    f = cfg.federation
    timeout = f.round_timeout or None
    strategy = make_strategy(cfg)
    if client_dp(cfg):
        # Flower's DP wrappers draw their noise from numpy's global generator: make sure it is
        # seeded from the OS entropy pool, never from anything an observer could know.
        np.random.seed(None)
    state, notes = checkpoint.load_latest(out)
    for note in notes:
        log(f"checkpoint not usable, falling back: {note}")
    if state is None:
        t0 = time.perf_counter()
        state = _start(grid, cfg, timeout)
        row = {"round": 0, "step": 0}
        row.update(_evaluate(grid, strategy, 0, state.tensors, centralized=centralized, timeout=timeout))
        row.update(
            {
                "train_loss": None,
                "clients": 0,
                "failures": 0,
                "examples": 0,
                "bytes_up": 0,
                "bytes_up_total": 0,
                "bytes_down": 0,
                "bytes_down_total": 0,
                "train_s": 0.0,
                "eval_s": 0.0,
                "client_train_s": None,
                "round_s": round(time.perf_counter() - t0, 3),
                "backbone_loads": {},
                "wall_s": round(time.perf_counter() - t0, 3),
            }
        )
        state.rows = [row]
        checkpoint.save(out, state)
    else:
        restore_strategy(strategy, state.strategy)
        log(f"resuming after round {state.round} of {f.rounds} (global payload {payload.digest(state.tensors)})")
    # metrics.jsonl is rewritten from the checkpoint: a row appended after the last checkpoint
    # by a server that then died is dropped here and produced again, so each round is there once.
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in state.rows), encoding="utf-8")
    tmp.replace(out / "metrics.jsonl")
    manifest = payload.manifest_from(state.tensors)
    for rnd in range(state.round + 1, f.rounds + 1):
        tensors, row = _round(grid, cfg, strategy, state, rnd, manifest, centralized=centralized, timeout=timeout)
        row["wall_s"] = round(state.rows[-1]["wall_s"] + row["round_s"], 3)
        row["digest"] = payload.digest(tensors)
        state.round, state.tensors, state.rows = rnd, tensors, state.rows + [row]
        state.strategy = strategy_state(strategy)
        checkpoint.save(out, state)  # first the checkpoint, then the row: see above
        append_jsonl(out / "metrics.jsonl", row)
    _finish(cfg, out, state, manifest)


def _finish(cfg: Config, out: Path, state: checkpoint.ServerState, manifest: payload.Manifest) -> None:
    checkpoint.export_adapter(out / "adapter", state.tensors, state.adapter_config)
    rows = state.rows
    if cfg.output.plots and all(r.get("accuracy") is not None for r in rows):
        plot_curves(
            rows,
            out / "curves.png",
            x="round",
            title=f"{cfg.data.dataset}: {cfg.model.name} + {cfg.peft.method}, {cfg.federation.strategy}, {cfg.federation.num_clients} clients",
        )
    last = rows[-1]
    summary = {
        **last,
        "start_accuracy": rows[0].get("accuracy"),
        "rounds": state.round,
        "total_local_steps": sum(r["clients"] for r in rows) * cfg.round_steps,
        "payload_bytes": payload.raw_bytes(manifest),
        "trainable_params": int(sum(np.prod(s.shape) for s in manifest)),
        "bytes_up_max": max(r["bytes_up"] for r in rows),
        "bytes_up_sum": sum(r["bytes_up_total"] for r in rows),
        "bytes_down_sum": sum(r["bytes_down_total"] for r in rows),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log(f"done: {state.round} rounds, accuracy {last.get('accuracy')}")
