"""Deployment round overhead: real `fedprompt server` + 2 `fedprompt client` processes over TLS
vs the same local steps in one plain loop.

    python benchmarks/deploy_overhead.py [--long] [--out DIR]     # DIR default: runs/bench/deploy_overhead

1. A `fedprompt server` with TLS and client authentication (a CA, server certificate and two
   registered client keys made with fedprompt.certs) on a free loopback port, and two
   `fedprompt client` processes (partitions 0 and 1 of 2, OMP_NUM_THREADS=1 each: the two share
   this machine's cores) run R rounds of both clients x S local steps, evaluation off. The rounds'
   time is the sum of the server's per-round `round_s` over rounds 1..R (start-up, the clients'
   backbone loads and round 0 excluded).
2. After those processes are stopped, the same 2*R*S steps on the same two partitions run in one
   plain loop in this process (one engine, no Flower, no messages; torch's default threads).
The report is their ratio (target <= 1.25) and the backbone loads of each client process over
its lifetime (target: 1), from the metrics rows' `backbone_loads`.
3. Before/after, with --baseline REV (default: the last commit before the perimeter, whose
   clients ran a new ClientApp process per message behind a Unix-socket bridge, and whose
   SuperLink faced the network itself): two workloads, each run with REV's code (`git archive`
   into a temporary folder, first on PYTHONPATH) and with this tree's, back to back: the
   training rounds of step 1, and a latency-bound round (1 local step, federated evaluation on:
   two message exchanges per round, where per-message costs show).
Writes DIR/result.json (title, markdown, summary, plots) and DIR/rounds.png; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import quiet_env, set_args, stop_group  # noqa: E402

quiet_env()

from fedprompt.config import Config, load_config
from fedprompt.processes import free_port
from fedprompt.report import read_jsonl

NAME = "deploy_overhead"
CONFIG = ROOT / "configs" / "bbc-minilm-prompt.yaml"
CLIENTS = 2
TARGET_RATIO = 1.25
# The last commit before "The server's port is a perimeter": per-message ClientApp processes.
BASELINE_REV = "d410ce2"


def _start(args: list[str], log: Path, *, threads: int | None = None, code: Path = ROOT) -> subprocess.Popen:
    """`python -m fedprompt ARGS` (the fedprompt in `code`, first on PYTHONPATH for every process
    it starts) in its own session, so that it and everything it starts can be killed as one
    process group."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if code != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")])
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "fedprompt", *args], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True, cwd=code
        )


def checkout(rev: str, into: Path) -> Path | None:
    """The tree of `rev` in `into` (git archive: no worktree, .git untouched); None if this
    clone does not hold `rev`."""
    r = subprocess.run(f"git -C {ROOT} archive --format=tar {rev} | tar -x -C {into}", shell=True, capture_output=True)
    return into if r.returncode == 0 and (into / "fedprompt").is_dir() else None


def _tail(log: Path, n: int = 2000) -> str:
    try:
        return log.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def make_certs(d: Path, names: list[str]) -> Path:
    """The default deployment's certificate folder: a CA, the server certificate (localhost and
    127.0.0.1 are always in it) and one registered key per client."""
    from fedprompt import certs

    certs.init_ca(d)
    certs.issue_server_cert(d, names=[])
    for name in names:
        certs.new_client_key(d, name=name)
        certs.register(d, name=name)
    return d


def run_deployment(sets: list[str], work: Path, timeout: float, code: Path = ROOT) -> tuple[list[dict], float]:
    """Server + clients (of the fedprompt in `code`) until the server finishes; (metrics rows,
    wall seconds of the run)."""
    port, out = free_port(), work / "run"
    certs = make_certs(work / "certs", [f"client-{i}" for i in range(CLIENTS)])
    common = ["--config", str(CONFIG), *set_args(sets)]
    server_log = work / "server.log"
    t0 = time.perf_counter()
    server = _start(
        ["server", *common, *set_args([f"server.address=127.0.0.1:{port}", f"server.certs_dir={certs}"]), "--output", str(out)], server_log, code=code
    )
    clients = [
        _start(
            [
                "client",
                *common,
                *set_args([f"client.root_certificates={certs / 'ca.crt'}", f"client.auth_key={certs / 'clients' / f'client-{i}'}"]),
                "--server",
                f"127.0.0.1:{port}",
                "--partition-id",
                str(i),
                "--num-partitions",
                str(CLIENTS),
            ],
            work / f"client{i}.log",
            threads=1,
            code=code,
        )
        for i in range(CLIENTS)
    ]
    try:
        deadline = time.monotonic() + timeout
        while server.poll() is None:
            dead = [i for i, c in enumerate(clients) if c.poll() is not None]
            if dead:
                raise RuntimeError(f"fedprompt client {dead[0]} exited early: {_tail(work / f'client{dead[0]}.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not finish within {timeout:.0f} s: {_tail(server_log)}")
            time.sleep(0.5)
        wall = time.perf_counter() - t0
        if server.returncode != 0:
            raise RuntimeError(f"fedprompt server exited with status {server.returncode}: {_tail(server_log)}")
    finally:
        stop_group(*clients, server, timeout=30)
    return read_jsonl(out / "metrics.jsonl"), wall


def plain_loop(cfg: Config, client_rounds: int) -> tuple[float, int]:
    """The same steps as the federation in one loop: one engine over all of them, client-rounds
    alternating between the two partitions (as benchmarks/round_overhead.py does); (seconds,
    torch threads)."""
    import torch

    from fedprompt.engine import batches, make_engine, train_steps
    from fedprompt.local import LocalClient

    lc = LocalClient(cfg, num_partitions=CLIENTS)
    s = lc.state
    shards = [lc.shard(i).train for i in range(CLIENTS)]
    engine = make_engine(s.model, cfg, client_rounds * cfg.round_steps)
    t0 = time.perf_counter()
    for i in range(client_rounds):
        data = shards[i % CLIENTS]
        train_steps(
            engine, s.task, data, cfg, steps=cfg.round_steps, stream=batches(len(data), cfg.train.batch_size, i), pad_id=s.pad_id, device=s.backbone.device
        )
    return time.perf_counter() - t0, torch.get_num_threads()


def plot(rows: list[dict], plain_per_round: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    train = [r.get("client_train_s") or 0.0 for r in rows]
    rest = [r["round_s"] - t for r, t in zip(rows, train, strict=True)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(rounds, train, label="client training (mean of clients' train_s)")
    ax.bar(rounds, rest, bottom=train, label="the rest of round_s (Flower, messages, engine build)")
    ax.axhline(plain_per_round, color="k", ls="--", label="plain loop, same steps, per round")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_xticks(rounds)
    ax.set_title(f"Deployment: {CLIENTS} clients over TLS, per round")
    ax.set_ylim(0, 1.5 * max(plain_per_round, *(r["round_s"] for r in rows)))  # room for the legend
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_round(rows: list[dict]) -> float:
    rows = [r for r in rows if r["round"] > 0]
    return sum(r["round_s"] for r in rows) / len(rows)


def before_after(rev: str, workloads: list[tuple[str, list[str]]], rounds: int, steps: int) -> dict | None:
    """Step 3: {"rows": [(workload, s per round before, after)], "markdown": text}, or None when
    skipped."""
    if not rev:
        return None
    out = []
    with tempfile.TemporaryDirectory(prefix="fedprompt-bench-baseline-") as d:
        (Path(d) / "code").mkdir()
        code = checkout(rev, Path(d) / "code")
        if code is None:
            return {"rows": [], "markdown": f"Before/after: revision {rev} is not in this clone; not measured."}
        for i, (what, sets) in enumerate(workloads):
            timed = []
            for tree in (code, ROOT):
                work = Path(d) / f"w{i}-{'before' if tree == code else 'after'}"
                rows, _ = run_deployment(sets, work, timeout=900 + 6 * rounds * steps, code=tree)
                timed.append(_per_round(rows))
            out.append((what, *timed))
    table = ["| workload | before (s per round) | after (s per round) | after / before |", "|---|---|---|---|"]
    table += [f"| {w} | {b:.2f} | {a:.2f} | {a / b:.3f} |" for w, b, a in out]
    return {
        "rows": out,
        "markdown": "\n".join(
            [
                f"Before/after the perimeter, each workload run with revision `{rev}`'s code (its SuperLink on the port itself, a "
                "new ClientApp process per message forwarding to the client over a Unix socket) and with this tree's (the front; "
                "the client serves the SuperNode's tasks in its own process), back to back on this machine, "
                f"{rounds} rounds each, 2 clients over TLS:",
                "",
                *table,
            ]
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="5 rounds x 50 local steps (default: 3 x 20)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / NAME), help="result folder")
    ap.add_argument(
        "--baseline",
        default=BASELINE_REV,
        metavar="REV",
        help=f"also time the rounds with this revision's code (default {BASELINE_REV}: before the perimeter; '' skips)",
    )
    args = ap.parse_args()
    rounds, steps = (5, 50) if args.long else (3, 20)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s: no process left behind

    # Evaluation off: the ratio is about training rounds. IID so both clients hold the same amount.
    sets = [
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        f"federation.num_clients={CLIENTS}",
        f"federation.min_clients={CLIENTS}",
        "federation.fraction_fit=1.0",
        "federation.fraction_evaluate=0",
        "data.partition=iid",
        "model.max_length=32",
    ]
    cfg = load_config(CONFIG, sets)  # fails here, before any process starts, on a bad override
    t_start, load1 = time.perf_counter(), os.getloadavg()[0]  # other work inflates the multi-threaded loop most
    with tempfile.TemporaryDirectory(prefix="fedprompt-bench-deploy-") as d:
        rows, fed_wall = run_deployment(sets, Path(d), timeout=900 + 6 * rounds * steps)
    rows = [r for r in rows if r["round"] > 0]
    if [r["round"] for r in rows] != list(range(1, rounds + 1)) or any(r["clients"] != CLIENTS for r in rows):
        raise SystemExit(f"unexpected metrics rows: {[(r['round'], r['clients']) for r in rows]}")
    fed_s = sum(r["round_s"] for r in rows)
    # pid -> the largest load count any row saw for it: the loads over the process's lifetime.
    loads: dict[str, int] = {}
    for r in rows:
        for pid, n in r["backbone_loads"].items():
            loads[pid] = max(loads.get(pid, 0), int(n))

    latency = [x for x in sets if not x.startswith(("federation.local_steps=", "federation.fraction_evaluate="))]
    before = before_after(
        args.baseline,
        [
            (f"training: {steps} local steps, evaluation off", sets),
            ("latency: 1 local step, federated evaluation on", [*latency, "federation.local_steps=1", "federation.fraction_evaluate=1.0"]),
        ],
        rounds,
        steps,
    )
    client_rounds = sum(r["clients"] for r in rows)
    plain_s, threads = plain_loop(cfg, client_rounds)
    ratio = fed_s / plain_s
    total_steps = client_rounds * steps
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    plot(rows, plain_s / rounds, out / "rounds.png")

    loads_ok = len(loads) == CLIENTS and set(loads.values()) == {1}
    table = ["| round | clients | round_s | client train_s (mean) | rest of the round (s) |", "|---|---|---|---|---|"]
    for r in rows:
        t = r.get("client_train_s") or 0.0
        table.append(f"| {r['round']} | {r['clients']} | {r['round_s']:.2f} | {t:.2f} | {r['round_s'] - t:.2f} |")
    mean_train = sum(r.get("client_train_s") or 0.0 for r in rows) / rounds
    table.append(f"| rounds 1..{rounds}, sum | | **{fed_s:.2f}** | {mean_train * rounds:.2f} | {fed_s - mean_train * rounds:.2f} |")
    table.append(f"| plain loop, same {total_steps} steps | | **{plain_s:.2f}** | | |")
    why = ""
    if ratio > TARGET_RATIO:
        per_round_rest = (fed_s - mean_train * rounds) / rounds
        why = (
            f" — why: of the {fed_s / rounds:.1f} s of a round, the clients' own training (1 thread each, in parallel) "
            f"took {mean_train:.1f} s and {per_round_rest:.1f} s were outside it (Flower's per-message latency — an idle "
            f"SuperNode polls every 3 s, hard-coded in Flower — plus the per-round "
            f"engine build), against {plain_s / rounds:.1f} s of plain compute per round on {threads} threads; more "
            f"local steps per round amortise the fixed part"
        )
    loads_txt = ", ".join(f"pid {p}: {n}" for p, n in sorted(loads.items()))
    md = "\n".join(
        [
            (
                f"A real `fedprompt server` (TLS + client authentication, certificates from `fedprompt.certs`) and {CLIENTS} real "
                f"`fedprompt client` processes over loopback ran {rounds} rounds of {CLIENTS} clients x {steps} local steps of "
                f"`configs/bbc-minilm-prompt.yaml` (MiniLM prompt tuning, `model.max_length=32`, batch {cfg.train.batch_size}, IID "
                f"partitions, evaluation off). Each client process had `OMP_NUM_THREADS=1` (the two share this machine's {ncpu} cores "
                f"and train in parallel). Measured: the sum of the server's `round_s` over rounds 1..{rounds} (start-up, backbone "
                f"loads and round 0 excluded; the whole deployment took {fed_wall:.1f} s wall), against the same {total_steps} local "
                f"steps on the same two partitions in one plain loop in the benchmark process afterwards (one DeepSpeed engine, no "
                f"Flower, torch threads = {threads}). Backbone loads per client process are the rows' `backbone_loads`. "
                f"1-minute load average when the benchmark started: {load1:.1f} on {ncpu} cores."
            ),
            "",
            *table,
            "",
            f"Seconds per round: {fed_s / rounds:.2f} (plain compute of the same steps: {plain_s / rounds:.2f} per round).",
            *([] if before is None else ["", before["markdown"]]),
            "",
            f"- Round overhead ratio: **{ratio:.3f}** (target <= {TARGET_RATIO}): {'met' if ratio <= TARGET_RATIO else 'MISSED'}{why}.",
            (
                f"- Backbone loads per client process over its lifetime: {loads_txt} (target: 1 per client, {CLIENTS} clients): "
                f"{'met' if loads_ok else 'MISSED — a client reloaded its backbone (or a client process did not report)'}."
            ),
        ]
    )
    summary = {
        "ratio": round(ratio, 4),
        "federated_rounds_s": round(fed_s, 3),
        "plain_loop_s": round(plain_s, 3),
        "seconds_per_round": round(fed_s / rounds, 3),
        "plain_seconds_per_round": round(plain_s / rounds, 3),
        "client_train_s_per_round": round(mean_train, 3),
        "rounds": rounds,
        "local_steps": steps,
        "clients": CLIENTS,
        "total_steps": total_steps,
        "client_threads": 1,
        "plain_loop_threads": threads,
        "backbone_loads_max": max(loads.values()) if loads else 0,
        "client_processes": len(loads),
        "ratio_target": TARGET_RATIO,
        "ratio_met": ratio <= TARGET_RATIO,
        "loads_met": loads_ok,
        **(
            {}
            if not before or not before["rows"]
            else {"baseline_rev": args.baseline, "before_after_s_per_round": {w: [round(b, 3), round(a, 3)] for w, b, a in before["rows"]}}
        ),
        "deployment_wall_s": round(fed_wall, 1),
        "load_average_at_start": round(load1, 2),
        "benchmark_wall_s": round(time.perf_counter() - t_start, 1),
    }
    result = {"title": "Deployment round overhead (server + 2 clients over TLS)", "markdown": md, "summary": summary, "plots": ["rounds.png"]}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
