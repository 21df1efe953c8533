"""User-facing output: live tables, metrics.jsonl, plots and the final summary."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any


class Table:
    """A fixed-width table printed row by row (plays well with a tqdm bar on stderr)."""

    def __init__(self, columns: list[tuple[str, int]], out=None):
        self.columns = columns
        self.out = out or sys.stdout

    def _line(self, cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, (_, w) in zip(cells, self.columns))

    def header(self) -> None:
        self._emit(self._line([name for name, _ in self.columns]))

    def row(self, values: list[Any]) -> None:
        self._emit(self._line([_fmt(v) for v in values]))

    def _emit(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=self.out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MiB), or peak CUDA memory when on a GPU."""
    torch = sys.modules.get("torch")  # a process without torch (the server) has no GPU memory to report
    if torch is not None and torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def plot_curves(rows: list[dict], path: Path, *, x: str, title: str) -> None:
    """accuracy and loss against `x` (step or round), one PNG with two panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r[x] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(xs, [r["accuracy"] for r in rows], marker="o")
    a.set_xlabel(x)
    a.set_ylabel("test accuracy")
    a.grid(alpha=0.3)
    b.plot(xs, [r["loss"] for r in rows], marker="o", label="test loss")
    train = [(r[x], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        b.plot(*zip(*train), marker=".", label="train loss")
    b.set_xlabel(x)
    b.set_ylabel("loss")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def where(out: Path) -> list[tuple[str, str]]:
    """The summary's last lines: where a run's results, adapter and metrics were written (and
    the trackers' logs, when on)."""
    lines = [("results", str(out)), ("adapter", str(out / "adapter")), ("metrics", str(out / "metrics.jsonl"))]
    if (out / "tensorboard").is_dir():
        lines.append(("tensorboard", f"tensorboard --logdir {out / 'tensorboard'}"))
    if (out / "mlruns").is_dir():
        lines.append(("mlflow", str(out / "mlruns")))
    return lines


def summary(title: str, items: list[tuple[str, Any]], out=None) -> None:
    out = out or sys.stdout
    width = max(len(k) for k, _ in items)
    print(f"\n{title}", file=out)
    for k, v in items:
        print(f"  {k.ljust(width)}  {_fmt(v)}", file=out)
