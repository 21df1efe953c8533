"""What every benchmark script shares: the result file the harness (bench.py) collects, plots,
and running `fedprompt` as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quiet_env() -> None:
    """Offline, quiet, CPU DeepSpeed, also when no harness or Makefile set them (children inherit)."""
    for k, v in {
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(k, v)


def write_result(out: Path, *, title: str, markdown: str, summary: dict, plots: list[str] | None = None) -> None:
    """out/result.json: a section of RESULTS.md (title, Markdown body, key figures, PNG names
    under `out`); also printed, so a script run alone shows its table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps({"title": title, "markdown": markdown, "summary": summary, "plots": plots or []}, indent=2) + "\n")
    print(f"## {title}\n\n{markdown}\n")


def plot(series: dict[str, tuple[list, list]], path: Path, *, xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
    """One PNG with a line per series (name -> (xs, ys))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def simulate(config: str | Path, out: Path, sets: list[str]) -> dict:
    """A real `fedprompt simulate` run; its summary.json (raises with the log tail on failure)."""
    args = [sys.executable, "-m", "fedprompt", "simulate", "--config", str(config), "--output", str(out), "--overwrite"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise RuntimeError(f"fedprompt simulate failed ({r.returncode}): {r.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def start_simulate(config: str | Path, sets: list[str], out: Path, log: Path, *, env: dict | None = None) -> subprocess.Popen:
    """`fedprompt simulate` in its own session (stop it with `stop_group`), output to `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "fedprompt", "simulate", "--config", str(config), *set_args(sets), "--output", str(out)],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )


def finished_rows(rc: int, log: Path, out: Path, *, what: str, rounds: int, clients: int) -> list[dict]:
    """The metrics rows after round 0 of a `fedprompt simulate` that exited with `rc`; exit the
    benchmark naming `what` unless it succeeded with `rounds` rounds of `clients` clients."""
    if rc != 0:
        raise SystemExit(f"fedprompt simulate ({what}) exited with status {rc}: {log.read_text(errors='replace')[-2000:]}")
    got = [r for r in rows(out) if r["round"] > 0]
    if len(got) != rounds or any(r["clients"] != clients for r in got):
        raise SystemExit(f"{what}: expected {rounds} rounds of {clients} clients, got {[(r['round'], r['clients']) for r in got]}")
    return got


def rows(out: Path) -> list[dict]:
    """metrics.jsonl of a run directory."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def set_args(items: list[str]) -> list[str]:
    """["k=v", ...] -> ["--set", "k=v", ...]."""
    return [a for s in items for a in ("--set", s)]


def stop_group(*procs: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM each process's group (fedprompt stops its Flower and Ray processes on it), then
    SIGKILL a group that is still there after `timeout` seconds."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
