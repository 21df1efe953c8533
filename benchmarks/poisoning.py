"""Poisoned clients against FedAvg and the robust modes: each a real `fedprompt simulate` run of
the same federation (8 IID clients, all sampled every round), then one table.

    python benchmarks/poisoning.py [--config configs/bbc-minilm-prompt.yaml] [--rounds 10]
        [--attackers 2] [--scale -10] [--out runs/poisoning] [--runs clean,fedavg,...] [--reuse]
        [--set key=value ...]

Runs: `clean` (FedAvg, no attack), then with the last ATTACKERS clients replying global +
SCALE x their honest update: `fedavg` (no defence at all: screening off), `screened` (FedAvg with
the default screening, federation.reject_norm_factor 10), `median`, `trimmed` (trim_fraction
ATTACKERS/8), `krum`, `multikrum` (num_malicious ATTACKERS) and `normbound` (FedAvg, every update
bounded to the median honest update norm of the clean run, or --norm-bound). Each robust run has
screening off, so it is measured alone. Prints a Markdown table (final accuracy, delta to clean,
updates screened out and bounded) and writes it to OUT/table.md. ~4 min per run for MiniLM on
2 CPU cores (8 clients x 10 steps x 10 rounds at max_length 32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The federation every run shares (the fast MiniLM config made IID, all 8 clients every round).
BASE = [
    "federation.num_clients=8",
    "federation.fraction_fit=1.0",
    "federation.min_clients=8",
    "data.partition=iid",
    "model.max_length=32",
    "federation.fraction_evaluate=0",
    "federation.strategy=fedavg",
    "federation.reject_norm_factor=0",
    "output.plots=false",
]
RUNS = ["clean", "fedavg", "screened", "median", "trimmed", "krum", "multikrum", "normbound"]
LABELS = {
    "clean": "FedAvg, no attack",
    "fedavg": "FedAvg, no defence",
    "screened": "FedAvg + screening (x10, default)",
    "median": "FedMedian",
    "trimmed": "trimmed mean",
    "krum": "Krum",
    "multikrum": "Multi-Krum",
    "normbound": "FedAvg + norm bounding",
}


def run(config: str, out: Path, sets: list[str], reuse: bool = False) -> dict:
    if reuse and (out / "summary.json").is_file():  # a finished run of an earlier invocation
        return json.loads((out / "summary.json").read_text())
    args = [sys.executable, "-m", "fedprompt", "simulate", "--config", config, "--output", str(out), "--overwrite"]
    for s in sets:
        args += ["--set", s]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def defence(name: str, k: int, bound: float | None) -> list[str]:
    """The `--set`s of run `name` on top of the attack."""
    return {
        "fedavg": [],
        "screened": ["federation.reject_norm_factor=10"],
        "median": ["federation.strategy=fedmedian"],
        "trimmed": ["federation.strategy=trimmedmean", f"federation.trim_fraction={k / 8}", f"federation.num_malicious={k}"],
        "krum": ["federation.strategy=krum", f"federation.num_malicious={k}"],
        "multikrum": ["federation.strategy=multikrum", f"federation.num_malicious={k}"],
        "normbound": [f"federation.norm_bound={bound}"],
    }[name]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "bbc-minilm-prompt.yaml"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--attackers", type=int, default=2, help="attacking clients of the 8 (the last ones)")
    ap.add_argument("--scale", type=float, default=-10.0, help="an attacker sends global + SCALE x its honest update")
    ap.add_argument("--norm-bound", type=float, default=0.0, help="normbound's L2 bound (default: the clean run's median update norm)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)} (clean always runs)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "poisoning"))
    ap.add_argument("--reuse", action="store_true", help="keep runs already finished under OUT (same settings only!)")
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run, e.g. model.name=FOLDER (repeatable)"
    )
    args = ap.parse_args()
    wanted = [r for r in args.runs.split(",") if r and r != "clean"]
    unknown = sorted(set(wanted) - set(RUNS))
    if unknown:
        ap.error(f"--runs: unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    out, k = Path(args.out), args.attackers
    base = [*BASE, f"federation.rounds={args.rounds}", *args.sets]
    attack = [f"attack.clients={k}", "attack.kind=scale", f"attack.scale={args.scale}"]
    results = {"clean": run(args.config, out / "clean", base, args.reuse)}
    print(f"clean: accuracy {results['clean']['accuracy']:.4f}", flush=True)
    # Honest updates' typical length: the median over rounds of each round's median update norm.
    bound = args.norm_bound or statistics.median(r["update_norm_median"] for r in rows(out / "clean")[1:])
    for name in wanted:
        results[name] = run(args.config, out / name, [*base, *attack, *defence(name, k, bound)], args.reuse)
        print(f"{name}: accuracy {results[name]['accuracy']:.4f}", flush=True)
    clean = results["clean"]["accuracy"]
    lines = ["| run | final accuracy | vs clean | updates screened out | updates bounded | wall (s) |", "|---|---|---|---|---|---|"]
    for name, s in results.items():
        rs = rows(out / name)[1:]
        lines.append(
            f"| {LABELS[name]} | {s['accuracy']:.4f} | {s['accuracy'] - clean:+.4f} | "
            f"{sum(r.get('screened_out', 0) for r in rs)} | {sum(r.get('bounded', 0) for r in rs)} | {s['wall_s']:.0f} |"
        )
    table = "\n".join(lines)
    head = (
        f"config: {args.config} with {' '.join(base)}\n"
        f"attack: the last {k} of 8 clients send global + ({args.scale:g}) x their update; norm bound {bound:.4g}\n"
    )
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{head}\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
