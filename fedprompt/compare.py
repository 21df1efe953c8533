"""`fedprompt compare RUN_DIR...`: finished (or running) runs side by side, for the researcher
comparing methods or settings: one table (final and best accuracy, rounds, wall time, bytes,
epsilon) and one PNG overlaying their accuracy curves. Reads only the run directories."""

from __future__ import annotations

import json
from pathlib import Path

from fedprompt.report import Table, read_jsonl
from fedprompt.rundir import RunError

COLUMNS = [
    ("run", 24),
    ("kind", 11),
    ("method", 6),
    ("strategy", 11),
    ("rounds", 6),
    ("final_acc", 9),
    ("best_acc", 8),
    ("wall_s", 8),
    ("up_MiB", 8),
    ("epsilon", 8),
]


def describe(run: Path) -> dict:
    """One run's comparison figures, from its config.yaml and metrics.jsonl."""
    try:
        return _describe(run)
    except (KeyError, TypeError, AttributeError) as e:  # files of another shape than fedprompt writes
        raise RunError(f"{run}: its config.yaml or metrics.jsonl is not what fedprompt writes ({type(e).__name__}: {e}); pass run directories") from None


def _describe(run: Path) -> dict:
    import yaml

    try:
        rows = read_jsonl(run / "metrics.jsonl")
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError) as e:  # json and yaml errors are ValueErrors
        raise RunError(f"{run}: not a readable fedprompt run directory ({type(e).__name__}: {str(e).splitlines()[0][:120]}); pass run directories") from None
    if not rows:
        raise RunError(f"{run}: no metrics rows yet; pass run directories of started runs")
    cfg = cfg if isinstance(cfg, dict) else {}
    federated = "clients" in rows[-1]
    acc = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    eps = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
    return {
        "run": run.name or str(run),
        "kind": "federated" if federated else "centralized",
        "method": cfg.get("peft", {}).get("method", "?"),
        "strategy": cfg.get("federation", {}).get("strategy", "?") if federated else "-",
        "rounds": rows[-1]["round"],
        "final_accuracy": acc[-1] if acc else None,
        "best_accuracy": max(acc) if acc else None,
        "wall_s": rows[-1].get("wall_s"),
        "bytes_up": sum(r.get("bytes_up_total", 0) or 0 for r in rows),
        "epsilon": eps[-1] if eps else None,
        "curve": [(r["round"], r["accuracy"]) for r in rows if r.get("accuracy") is not None],
    }


def compare(runs: list[Path], png: Path, *, quiet: bool = False) -> list[dict]:
    """Print the comparison table of `runs`, write the overlaid accuracy curves to `png`."""
    found = [describe(Path(r)) for r in runs]
    if not quiet:
        table = Table(COLUMNS)
        table.header()
        for d in found:
            table.row(
                [
                    d["run"][-24:],
                    d["kind"],
                    d["method"],
                    d["strategy"],
                    d["rounds"],
                    d["final_accuracy"],
                    d["best_accuracy"],
                    d["wall_s"],
                    d["bytes_up"] / 2**20,
                    d["epsilon"],
                ]
            )
    _plot(found, png)
    if not quiet:
        print(f"\ncurves: {png}")
    (png.with_suffix(".json")).write_text(json.dumps([{k: v for k, v in d.items() if k != "curve"} for d in found], indent=2) + "\n", encoding="utf-8")
    return found


def _plot(found: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for d in found:
        if d["curve"]:
            ax.plot(
                *zip(*d["curve"]), marker="o", markersize=3, label=f"{d['run']} ({d['method']}, {d['strategy'] if d['kind'] == 'federated' else 'centralized'})"
            )
    ax.set_xlabel("round (centralized runs: evaluation)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
