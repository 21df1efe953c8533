"""`fedprompt simulate` and `fedprompt server`: start Flower, follow the run, summarise.

Both start a SuperLink of their own (simulation or deployment), submit the fedprompt Flower
App with `flwr run`, then follow the run directory the ServerApp writes: each new metrics row
is printed as it lands, and status.json says how the run ended. Restarted on a run directory
that holds a checkpoint, they resume from its last completed round.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from fedprompt import checkpoint, processes
from fedprompt.config import Config
from fedprompt.report import Table, summary
from fedprompt.rundir import RunError, prepare_output
from fedprompt.server.app import STATUS

# Keys a resumed run may change: how long it runs, where it listens, where it writes.
RESUMABLE_CHANGES = ("federation.rounds", "federation.round_timeout", "server.", "client.", "output.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(saved_yaml: str, cfg: Config, out: Path) -> None:
    import yaml

    old, new = _flat(yaml.safe_load(saved_yaml) or {}), _flat(cfg.to_dict())
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        k = changed[0]
        raise RunError(f"{out} holds a checkpoint of a different configuration ({k}: {old.get(k)!r} there, {new.get(k)!r} now"
                       f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); resume with the same config, "
                       "or pass a new --output (or --overwrite to start over)")


def prepare(cfg: Config, out: Path, overwrite: bool) -> int:
    """Create (or reopen, to resume) the run directory; the round to resume after (0: new)."""
    state = None
    if out.is_dir() and not overwrite and any((out / f).exists() for f in (checkpoint.FILE, checkpoint.PREVIOUS)):
        state, notes = checkpoint.load_latest(out)
        if state is None:
            raise RunError(f"{out}: no usable checkpoint ({'; '.join(notes)}); pass --overwrite to start over")
        _check_resumable(state.config_yaml, cfg, out)
        if state.round >= cfg.federation.rounds and (out / "summary.json").exists():
            raise RunError(f"{out} already holds a finished run of {state.round} rounds; raise federation.rounds to "
                           "continue it, or pass a new --output")
        (out / STATUS).unlink(missing_ok=True)
    else:
        prepare_output(out, overwrite)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    (out / "logs").mkdir(exist_ok=True)
    return state.round if state else 0


def _rows(path: Path) -> list[dict]:
    """metrics.jsonl as written so far (a line being written is skipped, read next time)."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _kb(n) -> str:
    return "-" if not n else f"{n / 1024:.1f}"


def follow(out: Path, run: "processes.subprocess.Popen", cfg: Config, log: Path, *, quiet: bool = False,
           tick=None, stopped=None) -> list[dict]:
    """Print each metrics row as the ServerApp appends it; return all rows once the run ended
    well, or raise RunError with the reason it did not. `tick()` is called every ~2 s;
    `stopped()` says whether a run that ended without a result was stopped by `flwr stop`."""
    private = cfg.privacy.mode != "none"
    table = Table([("round", 5), ("clients", 7), ("train_loss", 10), ("accuracy", 8), ("fed_acc", 8),
                   ("up_KiB", 8), ("down_KiB", 8), ("round_s", 8), *([("epsilon", 8)] if private else [])])
    printed: set[int] = set()
    next_tick = time.monotonic() + 2.0
    bar = tqdm(total=cfg.federation.rounds, desc="rounds", unit="round", disable=quiet, leave=False, dynamic_ncols=True)
    if not quiet:
        table.header()
    while True:
        done = run.poll() is not None
        rows = _rows(out / "metrics.jsonl")
        for row in rows:
            if row["round"] in printed:
                continue
            printed.add(row["round"])
            if row["round"] > 0:
                bar.update(row["round"] - bar.n)
            if not quiet:
                table.row([row["round"], row["clients"], row.get("train_loss"), row.get("accuracy"), row.get("fed_accuracy"),
                           _kb(row["bytes_up"]), _kb(row["bytes_down"]), f"{row['round_s']:.1f}",
                           *([row.get("epsilon")] if private else [])])
        if done:
            break
        time.sleep(0.5)
        if tick is not None and time.monotonic() >= next_tick:
            tick()
            next_tick = time.monotonic() + 2.0
    bar.close()
    status = {}
    if (out / STATUS).is_file():
        status = json.loads((out / STATUS).read_text(encoding="utf-8"))
    if status.get("state") != "done":
        if not status and stopped is not None and stopped():
            raise RunError("federated run stopped: someone on the server host stopped it with `flwr stop` (Flower's "
                           "Control API listens on loopback only); its last checkpoint is kept: start the server "
                           f"again on {out} to resume (full log: {log})")
        why = status.get("error") or f"the run ended without a result ({processes.tail(log, 3)})"
        raise RunError(f"federated run failed: {why} (full log: {log})")
    return rows


def _summarise(cfg: Config, out: Path, s: dict, t0: float) -> None:
    ratio = s["bytes_up_max"] / s["payload_bytes"] if s["payload_bytes"] else 0.0
    acc = s.get("accuracy")
    summary("Summary", [
        ("test accuracy", "-" if acc is None else f"{acc:.4f} (start {s['start_accuracy']:.4f})"),
        ("rounds", s["rounds"]), ("local steps", f"{s['total_local_steps']} in all ({cfg.round_steps} per client per round)"),
        ("bytes up per client", f"{s['bytes_up_max']:,} max (payload {s['payload_bytes']:,} raw: x{ratio:.3f})"),
        ("wall time", f"{time.perf_counter() - t0:.1f} s"),
        *_privacy_lines(cfg, s),
        ("results", str(out)), ("adapter", str(out / "adapter")), ("metrics", str(out / "metrics.jsonl")),
    ])


def _privacy_lines(cfg: Config, s: dict) -> list[tuple[str, str]]:
    p, lines = cfg.privacy, []
    if p.mode in ("sample", "both"):
        lines.append(("epsilon (example)", f"{s.get('epsilon', 0.0):.3f} at delta {p.delta:g}, the largest of any client "
                                           f"(DP-SGD, clip {p.max_grad_norm}, {p.accountant.upper()})"))
    if p.mode in ("client", "both"):
        lines.append(("epsilon (client)", f"{s.get('client_epsilon', 0.0):.3f} at delta {p.delta:g} after {s.get('dp_releases', 0)} "
                                          f"noised aggregates (sigma {p.client_noise_multiplier}, {p.clipping}-side "
                                          f"{'adaptive' if p.adaptive_clipping else 'fixed'} clipping)"))
    if "audit" in s:
        a = s["audit"]
        lines.append(("audit", f"membership-inference AUC {a['mia_auc']:.3f}"
                               + (f", canary exposure {a['canary_exposure']:.2f} bits" if a.get("canary_exposure") is not None else "")
                               + " (audit.json)"))
    return lines


def _preflight(cfg: Config) -> None:
    """Fail on data or model problems now, before any process starts (simulation: the
    workers would otherwise hit them one by one)."""
    from fedprompt.backbone import resolve
    from fedprompt.data import load_task_data, partition

    data = load_task_data(cfg.data)
    n = cfg.federation.num_clients
    if n > 1:
        partition(data.train, cfg.data, n, 0)
        partition(data.test, cfg.data, n, 0)
    if cfg.privacy.mode in ("sample", "both"):
        # Every client's sampling rate and noise must be sound before any process starts.
        from fedprompt.privacy import plan

        for i in range(n):
            size = len(partition(data.train, cfg.data, n, i)) if n > 1 else len(data.train)
            try:
                plan(cfg, n=size, planned_steps=cfg.federation.rounds * cfg.round_steps)
            except ValueError as e:
                raise RunError(f"client {i}: {e}") from None
    resolve(cfg.model.name)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run(cfg: Config, out: Path, *, simulation: bool, host: str, port: int, quiet: bool,
         tls: dict[str, Path] | None = None) -> dict:
    """Start the SuperLink (on loopback), the front (a deployment's only listener on
    `host:port`, unless server.front is external), submit the app and follow the run."""
    t0 = time.perf_counter()
    home = Path(tempfile.mkdtemp(prefix="fedprompt-flwr-"))
    link = run = front = None
    logs = out / "logs"
    say = (lambda m: None) if quiet else (lambda m: tqdm.write(f"fedprompt server: {m}", file=sys.stdout))
    try:
        # The SuperLink's Control API has no login: it listens on loopback only, where this
        # process's own `flwr run`, key registration and revocation reach it.
        link_port = port if simulation else (cfg.server.superlink_port or processes.free_port())
        link = processes.start_superlink("127.0.0.1", link_port, simulation=simulation, flwr_home=home,
                                         log=logs / "superlink.log", tls=tls)
        processes.write_connection(home, f"127.0.0.1:{link_port}", root_certificates=tls["ca"] if tls else None)
        if not simulation and cfg.server.front == "builtin":
            from fedprompt.server.front import Front

            front = Front(host, port, f"{'https' if tls else 'http'}://127.0.0.1:{link_port}", say=say,
                          certfile=tls and tls["cert"], keyfile=tls and tls["key"], cafile=tls and tls["ca"])
            front.start()
        tick = None
        if tls:  # admit exactly the clients in authorized/, now and as it changes
            from fedprompt.security import Registry

            registry = Registry(cfg.server.certs_dir, home)
            registry.sync(say)
            tick = lambda: registry.sync(say)  # noqa: E731
        fed = None
        if simulation:
            per_worker = max(1, _cpus() // cfg.federation.workers)
            fed = {"num-supernodes": cfg.federation.num_clients, "client-resources-num-cpus": per_worker,
                   "init-args-logging-level": "ERROR", "verbose": False}
        run = processes.submit(home, {"output": str(out.resolve()), "mode": "simulation" if simulation else "deployment",
                                      "superlink-pid": link.pid},
                               log=logs / "run.log", federation_config=fed)
        rows = follow(out, run, cfg, logs / "run.log", quiet=quiet, tick=tick,
                      stopped=lambda: processes.was_stopped(home, logs / "run.log"))
    finally:
        processes.stop(run)
        if front is not None:
            front.stop()
        processes.stop(link)
        processes.reap()
        shutil.rmtree(home, ignore_errors=True)
    result = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    if simulation and (cfg.privacy.mode != "none" or cfg.audit.canaries):
        # Every private simulation reports what an attacker holding its adapter learns.
        from fedprompt.audit import run_audit

        result["audit"] = run_audit(cfg, out, quiet=True)
        (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not quiet:
        _summarise(cfg, out, result, t0)
    return result | {"rows": rows}


def run_simulate(cfg: Config, output: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """`federation.num_clients` virtual clients on Flower's simulation engine."""
    out = Path(output)
    f = cfg.federation
    _preflight(cfg)
    after = prepare(cfg, out, overwrite)
    if not quiet:
        per_round = max(int(f.num_clients * f.fraction_fit), 1)
        print(f"fedprompt simulate: {f.num_clients} virtual clients ({cfg.data.partition} partitions) on "
              f"{f.workers} worker(s), {per_round} per round, {f.rounds} rounds x {cfg.round_steps} local steps; "
              f"{cfg.model.name} ({cfg.model.quantization}) + {cfg.peft.method}, {f.strategy}"
              + (f"; resuming after round {after}" if after else ""))
    return _run(cfg, out, simulation=True, host="127.0.0.1", port=processes.free_port(), quiet=quiet)


def run_server(cfg: Config, output: str | Path, *, overwrite: bool = False, quiet: bool = False,
               insecure: bool = False, keep_alive: bool = False) -> dict:
    """The front on `server.address`, the SuperLink behind it on loopback and the ServerApp;
    waits for `federation.min_clients`.
    TLS with the files of `server.certs_dir` and only registered clients, unless `insecure`.
    `keep_alive`: once the run is finished (now or before), stay up idle until stopped (a
    Kubernetes Deployment restarts a server that exits)."""
    from fedprompt import security

    out = Path(output)
    if keep_alive and _finished(cfg, out):
        print(f"fedprompt server: {out} holds this run, finished; results in {out}. Idle until stopped", flush=True)
        _idle()
    host, port = processes.split_address(cfg.server.address, "server.address")
    tls = None
    if insecure:
        print("fedprompt server: " + security.INSECURE_WARNING.format(where=cfg.server.address), file=sys.stderr, flush=True)
    else:
        tls = security.server_files(cfg.server.certs_dir)
        security.authorized_keys(cfg.server.certs_dir)  # unreadable keys fail now
    s = cfg.server
    for what, h, p in ([("server.address", host, port)] if s.front == "builtin" else []) + (
            [("server.superlink_port", "127.0.0.1", s.superlink_port)] if s.superlink_port else []):
        if processes.port_in_use(h, p):
            fix = f"server.address={host}:PORT" if what == "server.address" else "server.superlink_port=PORT"
            raise RunError(f"{what} {h}:{p}: port {p} is already in use; pick another with --set {fix}")
    after = prepare(cfg, out, overwrite)
    if not quiet:
        where = (f"listening on {host}:{port} (the Fleet API only)" if s.front == "builtin" else
                 f"SuperLink on 127.0.0.1:{s.superlink_port} behind your proxy (server.front: external)")
        print(f"fedprompt server: {where}; waiting for {cfg.federation.min_clients} clients; "
              f"{cfg.federation.rounds} rounds, {cfg.federation.strategy}" + (f"; resuming after round {after}" if after else ""))
    result = _run(cfg, out, simulation=False, host=host, port=port, quiet=quiet, tls=tls)
    if keep_alive:
        print("fedprompt server: run finished; idle until stopped (--keep-alive)", flush=True)
        _idle()
    return result


def _finished(cfg: Config, out: Path) -> bool:
    """`out` holds a finished run of this config (a restarted pod after the last round)."""
    if not (out / "summary.json").is_file():
        return False
    state, _ = checkpoint.load_latest(out)
    if state is None:
        return False
    _check_resumable(state.config_yaml, cfg, out)
    return state.round >= cfg.federation.rounds


def _idle() -> None:
    """Sleep until SIGTERM/SIGINT (the CLI turns both into KeyboardInterrupt)."""
    while True:
        time.sleep(3600)
