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
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from fedprompt import checkpoint, processes
from fedprompt.config import Config
from fedprompt.rundir import RunError, prepare_output
from fedprompt.server.app import STATUS
from fedprompt.server.progress import follow, summarise

# Keys a resumed run may change: how long it runs, where it listens, where it writes, which
# simulation engine carries its messages (both compute the same rounds).
RESUMABLE_CHANGES = ("federation.rounds", "federation.round_timeout", "federation.engine", "server.", "client.", "output.")


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
        raise RunError(
            f"{out} holds a checkpoint of a different configuration ({k}: {old.get(k)!r} there, {new.get(k)!r} now"
            f"{f', and {len(changed) - 1} more' if len(changed) > 1 else ''}); resume with the same config, "
            "or pass a new --output (or --overwrite to start over)"
        )


def prepare(cfg: Config, out: Path, overwrite: bool) -> int:
    """Create (or reopen, to resume) the run directory; the round to resume after (0: new)."""
    if cfg.federation.initial_adapter:  # the ServerApp reads it from another working directory
        cfg.federation.initial_adapter = str(Path(cfg.federation.initial_adapter).expanduser().resolve())
    state = None
    if out.is_dir() and not overwrite and any((out / f).exists() for f in (checkpoint.FILE, checkpoint.PREVIOUS)):
        state, notes = checkpoint.load_latest(out)
        if state is None:
            raise RunError(f"{out}: no usable checkpoint ({'; '.join(notes)}); pass --overwrite to start over")
        _check_resumable(state.config_yaml, cfg, out)
        if state.round >= cfg.federation.rounds and (out / "summary.json").exists():
            raise RunError(f"{out} already holds a finished run of {state.round} rounds; raise federation.rounds to continue it, or pass a new --output")
        (out / STATUS).unlink(missing_ok=True)
    else:
        prepare_output(out, overwrite)
    (out / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    (out / "logs").mkdir(exist_ok=True)
    return state.round if state else 0


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


def sampling_warnings(cfg: Config, clients: int) -> list[str]:
    """What the sampling fractions mean with `clients` connected, when that is one client per
    round: Flower samples int(clients x fraction) clients, at least 1."""
    f, out = cfg.federation, []
    if clients > 1 and max(int(clients * f.fraction_fit), 1) == 1:
        out.append(
            f"federation.fraction_fit {f.fraction_fit:g} with {clients} clients trains a single client per round "
            f"(Flower samples int({clients} x {f.fraction_fit:g}), at least 1); raise fraction_fit to train more"
        )
    if clients > 1 and f.fraction_evaluate > 0 and max(int(clients * f.fraction_evaluate), 1) == 1:
        out.append(
            f"federation.fraction_evaluate {f.fraction_evaluate:g} with {clients} clients evaluates on a single client's "
            "local test split per round: the reported accuracy is that one client's; raise fraction_evaluate"
        )
    return out


class _Watchers:
    """Who watches a run besides the table: the trackers (output.trackers) and, with
    server.metrics_address, the Prometheus exporter."""

    def __init__(self, cfg: Config, out: Path):
        from fedprompt.tracking import Trackers

        self.exporter = None
        if cfg.server.metrics_address:
            from fedprompt.server.metrics import Exporter

            self.exporter = Exporter(cfg.server.metrics_address, cfg.federation.rounds)
        self.trackers = Trackers(cfg, out, out.resolve().name)

    def row(self, row: dict) -> None:
        self.trackers.row(row, "round")
        if self.exporter is not None:
            self.exporter.row(row)

    def finish(self, ok: bool) -> None:
        """End the trackers. The exporter of a finished run stays up as long as this process
        (a --keep-alive server's last figures remain scrapable); a failed run's closes now."""
        self.trackers.finish(ok)
        if self.exporter is not None and not ok:
            self.exporter.close()
            self.exporter = None


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without torch (the server never imports it):
    CUDA_VISIBLE_DEVICES when set, else the driver's /proc entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return len([d for d in env.split(",") if d.strip() and not d.strip().startswith("-")])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


@dataclass(frozen=True)
class Placement:
    """Each simulation worker's share of the machine (Ray resources): `cpus` cores (its torch
    threads), `gpus` GPUs (1: one GPU per worker; a fraction when workers share them)."""

    workers: int
    cpus: int
    gpus: float

    def __str__(self) -> str:
        gpu = "" if not self.gpus else f"{self.gpus:g} GPU + " if self.gpus >= 1 else f"{self.gpus:.2g} of a GPU + "
        return f"{self.workers} worker(s), each {gpu}{self.cpus} CPU core(s)"


def placement(cfg: Config, cpus: int | None = None, gpus: int | None = None) -> Placement:
    """One worker per GPU where GPUs are visible (and the model may use them), sharing them
    when there are more workers than GPUs; the cores divided between the workers."""
    w = cfg.federation.workers
    cpus = _cpus() if cpus is None else cpus
    gpus = (0 if cfg.model.device == "cpu" else visible_gpus()) if gpus is None else gpus
    return Placement(w, max(1, cpus // w), min(1.0, gpus / w) if gpus else 0.0)


def _run(cfg: Config, out: Path, *, simulation: bool, host: str, port: int, quiet: bool, tls: dict[str, Path] | None = None) -> dict:
    """Start the SuperLink (on loopback), the front (a deployment's only listener on
    `host:port`, unless server.front is external), submit the app and follow the run."""
    t0 = time.perf_counter()
    watch = _Watchers(cfg, out)  # a metrics port in use fails here, before anything starts
    home = Path(tempfile.mkdtemp(prefix="fedprompt-flwr-"))
    link = run = front = None
    ok = False
    logs = out / "logs"
    say = (lambda m: None) if quiet else (lambda m: tqdm.write(f"fedprompt server: {m}", file=sys.stdout))
    try:
        # The SuperLink's Control API has no login: it listens on loopback only, where this
        # process's own `flwr run`, key registration and revocation reach it.
        link_port = port if simulation else (cfg.server.superlink_port or processes.free_port())
        link = processes.start_superlink("127.0.0.1", link_port, simulation=simulation, flwr_home=home, log=logs / "superlink.log", tls=tls)
        processes.write_connection(home, f"127.0.0.1:{link_port}", root_certificates=tls["ca"] if tls else None)
        if not simulation and cfg.server.front == "builtin":
            from fedprompt.server.front import Front

            front = Front(
                host,
                port,
                f"{'https' if tls else 'http'}://127.0.0.1:{link_port}",
                say=say,
                certfile=tls and tls["cert"],
                keyfile=tls and tls["key"],
                cafile=tls and tls["ca"],
            )
            front.start()
        tick = None
        if tls:  # admit exactly the clients in authorized/, now and as it changes
            from fedprompt.security import Registry

            registry = Registry(cfg.server.certs_dir, home)
            registry.sync(say)
            tick = lambda: registry.sync(say)  # noqa: E731
        fed = None
        if simulation:
            place = placement(cfg)
            fed = {"num-supernodes": cfg.federation.num_clients, "client-resources-num-cpus": place.cpus, "init-args-logging-level": "ERROR", "verbose": False}
            if place.gpus:
                fed["client-resources-num-gpus"] = place.gpus
        run = processes.submit(
            home,
            {"output": str(out.resolve()), "mode": "simulation" if simulation else "deployment", "superlink-pid": link.pid},
            log=logs / "run.log",
            federation_config=fed,
        )
        rows = follow(out, run, cfg, logs / "run.log", quiet=quiet, tick=tick, stopped=lambda: processes.was_stopped(home, logs / "run.log"), on_row=watch.row)
        ok = True
    finally:
        if not ok:
            watch.finish(ok=False)
        processes.stop(run)
        if front is not None:
            front.stop()
        processes.stop(link)
        processes.reap()
        shutil.rmtree(home, ignore_errors=True)
    return _finish_run(cfg, out, rows, watch, simulation=simulation, quiet=quiet, t0=t0)


def _run_inprocess(cfg: Config, out: Path, *, quiet: bool) -> dict:
    """The simulation in this process (federation.engine inprocess, server/inprocess.py)."""
    from fedprompt.server import inprocess

    t0 = time.perf_counter()
    watch = _Watchers(cfg, out)
    ok = False
    log = out / "logs" / "run.log"
    try:
        with inprocess.running(out, log) as run:
            try:
                rows = follow(out, run, cfg, log, quiet=quiet, on_row=watch.row)
            except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into this)
                if run.poll() is not None:  # the rounds had ended: the CLI's usual way out
                    raise
                watch.finish(ok=False)
                inprocess.exit_interrupted()
        ok = True
    finally:
        if not ok:
            watch.finish(ok=False)
    return _finish_run(cfg, out, rows, watch, simulation=True, quiet=quiet, t0=t0)


def _finish_run(cfg: Config, out: Path, rows: list[dict], watch: _Watchers, *, simulation: bool, quiet: bool, t0: float) -> dict:
    """The run's summary (a private simulation's audit added), the trackers ended, printed."""
    result = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    if simulation and (cfg.privacy.mode != "none" or cfg.audit.canaries):
        # Every private simulation reports what an attacker holding its adapter learns.
        from fedprompt.audit import run_audit

        result["audit"] = run_audit(cfg, out, quiet=True)
        (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    watch.finish(ok=True)
    if not quiet:
        summarise(cfg, out, result, t0)
    return result | {"rows": rows}


def run_simulate(cfg: Config, output: str | Path, *, overwrite: bool = False, quiet: bool = False) -> dict:
    """`federation.num_clients` virtual clients on Flower's simulation engine."""
    out = Path(output)
    f = cfg.federation
    _preflight(cfg)
    after = prepare(cfg, out, overwrite)
    if not quiet:
        per_round = max(int(f.num_clients * f.fraction_fit), 1)
        print(
            f"fedprompt simulate: {f.num_clients} virtual clients ({cfg.data.partition} partitions) on "
            f"{'this process (federation.engine inprocess)' if f.engine == 'inprocess' else placement(cfg)}, "
            f"{per_round} per round, {f.rounds} rounds x {cfg.round_steps} local steps; "
            f"{cfg.model.name} ({cfg.model.quantization}) + {cfg.peft.method}{_lora(cfg)}, {f.strategy}{_secure(cfg)}"
            + (f"; resuming after round {after}" if after else "")
        )
    for line in sampling_warnings(cfg, f.num_clients):
        print(f"fedprompt simulate: warning: {line}", file=sys.stderr, flush=True)
    if f.engine == "inprocess":
        return _run_inprocess(cfg, out, quiet=quiet)
    return _run(cfg, out, simulation=True, host="127.0.0.1", port=processes.free_port(), quiet=quiet)


def _lora(cfg: Config) -> str:
    """ " r 4/8/16, svd": LoRA's rank(s) and aggregation, for the start line ("" for other methods)."""
    f = cfg.federation
    return f" r {'/'.join(map(str, f.lora_ranks or [cfg.peft.lora_r]))}, {f.lora_aggregation}" if cfg.peft.method == "lora" else ""


def _secure(cfg: Config) -> str:
    """ " with secure aggregation" for the start line when it is on."""
    return " with secure aggregation (the server unmasks only each round's mean)" if cfg.federation.secure_aggregation else ""


def run_server(cfg: Config, output: str | Path, *, overwrite: bool = False, quiet: bool = False, insecure: bool = False, keep_alive: bool = False) -> dict:
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
        [("server.superlink_port", "127.0.0.1", s.superlink_port)] if s.superlink_port else []
    ):
        if processes.port_in_use(h, p):
            fix = f"server.address={host}:PORT" if what == "server.address" else "server.superlink_port=PORT"
            raise RunError(f"{what} {h}:{p}: port {p} is already in use; pick another with --set {fix}")
    after = prepare(cfg, out, overwrite)
    if not quiet:
        where = (
            f"listening on {host}:{port} (the Fleet API only)"
            if s.front == "builtin"
            else f"SuperLink on 127.0.0.1:{s.superlink_port} behind your proxy (server.front: external)"
        )
        print(
            f"fedprompt server: {where}; waiting for {cfg.federation.min_clients} clients; "
            f"{cfg.federation.rounds} rounds, {cfg.federation.strategy}{_secure(cfg)}" + (f"; resuming after round {after}" if after else "")
        )
    for line in sampling_warnings(cfg, cfg.federation.min_clients):
        print(f"fedprompt server: warning: {line}", file=sys.stderr, flush=True)
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
