"""The ServerApp: fedprompt's round loop around a Flower strategy.

Each round (server/rounds.py): sample and message clients (the strategy), check every reply
(payload manifest, metrics), weigh, aggregate (the strategy), evaluate (server/evaluation.py:
federated, and centralized in simulation); then checkpoint and append the metrics row. The
server never loads a backbone: round 0's tensors are a quorum of clients' seeded initial
payloads or a trusted adapter file (server/initial.py), and it only ever holds the payload.
It reads everything from the run directory (`output` in the run config): config.yaml in,
checkpoint, metrics.jsonl, adapter/, curves.png, summary.json and status.json out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedprompt import checkpoint, payload
from fedprompt.config import Config, load_config
from fedprompt.protocol import Kind
from fedprompt.report import append_jsonl, plot_curves
from fedprompt.server.aggregate import log
from fedprompt.server.evaluation import evaluate
from fedprompt.server.initial import initial_state
from fedprompt.server.messages import FederationError  # noqa: F401  (the round loop's error, raised here for callers)
from fedprompt.server.rounds import Watch, train_round
from fedprompt.server.strategies import client_dp, make_strategy, restore_strategy, strategy_state
from fedprompt.server.trust import Patience

app = ServerApp()
STATUS = "status.json"


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


def serve(grid: Grid, cfg: Config, out: Path, *, centralized: bool) -> None:
    """Run (or resume) the federation described by `cfg`, writing the run directory `out`."""
    f = cfg.federation
    strategy = make_strategy(cfg)
    if client_dp(cfg):
        # Flower's DP wrappers draw their noise from numpy's global generator: make sure it is
        # seeded from the OS entropy pool, never from anything an observer could know.
        np.random.seed(None)
    state, notes = checkpoint.load_latest(out)
    watch = Watch(_patience(cfg, state.rows if state else []))
    for note in notes:
        log(f"checkpoint not usable, falling back: {note}")
    if state is None:
        t0 = time.perf_counter()
        state = initial_state(grid, cfg, watch.patience)
        row = {"round": 0, "step": 0, "digest": payload.digest(state.tensors)}
        row.update(evaluate(grid, cfg, strategy, 0, state.tensors, centralized=centralized, patience=watch.patience))
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
        restore_strategy(strategy, state.strategy, list(state.tensors))
        log(f"resuming after round {state.round} of {f.rounds} (global payload {payload.digest(state.tensors)})")
    # metrics.jsonl is rewritten from the checkpoint: a row appended after the last checkpoint
    # by a server that then died is dropped here and produced again, so each round is there once.
    tmp = out / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in state.rows), encoding="utf-8")
    tmp.replace(out / "metrics.jsonl")
    manifest = payload.manifest_from(state.tensors)
    for rnd in range(state.round + 1, f.rounds + 1):
        tensors, row = train_round(grid, cfg, strategy, state, rnd, manifest, centralized=centralized, watch=watch)
        row["wall_s"] = round(state.rows[-1]["wall_s"] + row["round_s"], 3)
        row["digest"] = payload.digest(tensors)
        state.round, state.tensors, state.rows = rnd, tensors, state.rows + [row]
        state.strategy = strategy_state(strategy)
        checkpoint.save(out, state)  # first the checkpoint, then the row: see above
        append_jsonl(out / "metrics.jsonl", row)
    _finish(cfg, out, state, manifest)


def _patience(cfg: Config, rows: list[dict]) -> Patience:
    """How long rounds wait (trust.Patience); a resumed run remembers the rounds it ran, from
    their rows (a round with a failure may have waited its whole timeout: not counted)."""
    patience = Patience(cfg.federation.round_timeout)
    for r in rows[1:]:
        if not r.get("failures"):
            patience.took(Kind.FIT, float(r.get("train_s") or 0.0))
            patience.took(Kind.EVALUATE, float(r.get("eval_s") or 0.0))
    return patience


def _finish(cfg: Config, out: Path, state: checkpoint.ServerState, manifest: payload.Manifest) -> None:
    from fedprompt.export import make_portable

    checkpoint.export_adapter(out / "adapter", {**state.tensors, **state.fixed}, state.adapter_config)
    rows = state.rows
    make_portable(out / "adapter", cfg, state.labels, {**rows[-1], "kind": "federated"})
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
