"""Watching a federated run from `fedprompt simulate` / `fedprompt server`: the per-round table
as the ServerApp appends metrics rows, how the run ended, and the final summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from fedprompt import processes
from fedprompt.config import Config
from fedprompt.report import Table, summary, where
from fedprompt.rundir import RunError
from fedprompt.server.app import STATUS


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


class _Notes:
    """The round loop's own lines in the run's log ("fedprompt server: round 2: rejected: node
    ..."), shown as they appear: who was rejected, capped, named or waited for."""

    PREFIX = "fedprompt server: "
    QUIET = ("waiting for", "done:")  # the runner says these itself

    def __init__(self, log: Path):
        self.log, self.offset = log, 0

    def new(self) -> list[str]:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        lines = chunk[:end].decode("utf-8", errors="replace").splitlines()
        notes = [processes.one_line(x[len(self.PREFIX) :], 400) for x in lines if x.startswith(self.PREFIX)]
        return [n for n in notes if not n.startswith(self.QUIET)]


def _kb(n) -> str:
    return "-" if not n else f"{n / 1024:.1f}"


def _secure(row: dict) -> str:
    """A secure round in the table: clients in the unmasked mean / sampled, or "none" released."""
    if "secagg_sampled" not in row:
        return "-"  # round 0
    return f"{row['secagg_in_sum']}/{row['secagg_sampled']}" if row.get("released") else "none"


def follow(out: Path, run: "processes.subprocess.Popen", cfg: Config, log: Path, *, quiet: bool = False, tick=None, stopped=None, on_row=None) -> list[dict]:
    """Print each metrics row as the ServerApp appends it (and pass it to `on_row`: trackers,
    the Prometheus exporter); return all rows once the run ended well, or raise RunError with
    the reason it did not. `tick()` is called every ~2 s; `stopped()` says whether a run that
    ended without a result was stopped by `flwr stop`."""
    private = cfg.privacy.mode != "none"
    secure = cfg.federation.secure_aggregation
    table = Table(
        [
            ("round", 5),
            ("clients", 7),
            ("train_loss", 10),
            ("accuracy", 8),
            ("fed_acc", 8),
            ("personal", 8),
            ("up_KiB", 8),
            ("down_KiB", 8),
            ("round_s", 8),
            *([("epsilon", 8)] if private else []),
            *([("secure", 7)] if secure else []),
        ]
    )
    printed: set[int] = set()
    notes = _Notes(log)
    next_tick = time.monotonic() + 2.0
    bar = tqdm(total=cfg.federation.rounds, desc="rounds", unit="round", disable=quiet, leave=False, dynamic_ncols=True)
    if not quiet:
        table.header()
    while True:
        done = run.poll() is not None
        if not quiet:
            for note in notes.new():
                tqdm.write(f"  note: {note}")
        rows = _rows(out / "metrics.jsonl")
        for row in rows:
            if row["round"] in printed:
                continue
            printed.add(row["round"])
            if on_row is not None:
                on_row(row)
            if row["round"] > 0:
                bar.update(row["round"] - bar.n)
            if not quiet:
                table.row(
                    [
                        row["round"],
                        row["clients"],
                        row.get("train_loss"),
                        row.get("accuracy"),
                        row.get("fed_accuracy"),
                        row.get("fed_personal_accuracy"),
                        _kb(row["bytes_up"]),
                        _kb(row["bytes_down"]),
                        f"{row['round_s']:.1f}",
                        *([row.get("epsilon")] if private else []),
                        *([_secure(row)] if secure else []),
                    ]
                )
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
            raise RunError(
                "federated run stopped: someone on the server host stopped it with `flwr stop` (Flower's "
                "Control API listens on loopback only); its last checkpoint is kept: start the server "
                f"again on {out} to resume (full log: {log})"
            )
        why = status.get("error") or f"the run ended without a result ({processes.tail(log, 3)})"
        raise RunError(f"federated run failed: {why} (full log: {log})")
    return rows


def summarise(cfg: Config, out: Path, s: dict, t0: float) -> None:
    ratio = s["bytes_up_max"] / s["payload_bytes"] if s["payload_bytes"] else 0.0
    acc = s.get("accuracy")
    summary(
        "Summary",
        [
            ("test accuracy", "-" if acc is None else f"{acc:.4f} (start {s['start_accuracy']:.4f})"),
            ("rounds", s["rounds"]),
            ("local steps", f"{s['total_local_steps']} in all ({cfg.round_steps} per client per round)"),
            ("bytes up per client", f"{s['bytes_up_max']:,} max (payload {s['payload_bytes']:,} raw: x{ratio:.3f})"),
            ("wall time", f"{time.perf_counter() - t0:.1f} s"),
            *_privacy_lines(cfg, s),
            *where(out),
        ],
    )


def _privacy_lines(cfg: Config, s: dict) -> list[tuple[str, str]]:
    p, lines = cfg.privacy, []
    if p.mode in ("sample", "both"):
        lines.append(
            (
                "epsilon (example)",
                f"{s.get('epsilon', 0.0):.3f} at delta {p.delta:g}, the largest of any client (DP-SGD, clip {p.max_grad_norm}, {p.accountant.upper()})",
            )
        )
    if p.mode in ("client", "both"):
        lines.append(
            (
                "epsilon (client)",
                f"{s.get('client_epsilon', 0.0):.3f} at delta {p.delta:g} after {s.get('dp_releases', 0)} "
                f"noised aggregates (sigma {p.client_noise_multiplier}, {p.clipping}-side "
                f"{'adaptive' if p.adaptive_clipping else 'fixed'} clipping)",
            )
        )
    if "audit" in s:
        a = s["audit"]
        lines.append(
            (
                "audit",
                f"membership-inference AUC {a['mia_auc']:.3f}"
                + (f", canary exposure {a['canary_exposure']:.2f} bits" if a.get("canary_exposure") is not None else "")
                + (
                    f", server names the majority label of {a['server_view']['plain']['majority_hit']:.0%} of clients "
                    f"from plain updates, {a['server_view']['secure']['majority_hit']:.0%} from the secure mean"
                    if a.get("server_view")
                    else ""
                )
                + " (audit.json)",
            )
        )
    return lines
