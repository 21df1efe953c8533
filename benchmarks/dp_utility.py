"""Utility and audit of DP federated prompt tuning: the same simulation without DP and at
several epsilons, each a real `fedprompt simulate` run, then one table.

    python benchmarks/dp_utility.py [--config configs/bbc-minilm-prompt-dp.yaml] [--epsilons 8,3,1] [--out runs/dp-utility] [--reuse]

Prints a Markdown table (accuracy, ratio to the non-private run, largest client epsilon,
membership-inference AUC, canary exposure) and writes it to OUT/table.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(config: str, out: Path, sets: list[str], reuse: bool = False) -> dict:
    if reuse and (out / "summary.json").is_file():  # a finished run of an earlier invocation
        return json.loads((out / "summary.json").read_text())
    args = [sys.executable, "-m", "fedprompt", "simulate", "--config", config, "--output", str(out), "--overwrite"]
    for s in sets:
        args += ["--set", s]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "bbc-minilm-prompt-dp.yaml"))
    ap.add_argument("--epsilons", default="8,3,1")
    ap.add_argument("--out", default=str(ROOT / "runs" / "dp-utility"))
    ap.add_argument("--reuse", action="store_true", help="keep runs already finished under OUT (same config only!)")
    args = ap.parse_args()
    out = Path(args.out)
    rows = [("no DP", run(args.config, out / "none", ["privacy.mode=none"], args.reuse))]
    print(f"no DP: accuracy {rows[0][1]['accuracy']:.4f}", flush=True)
    for eps in args.epsilons.split(","):
        s = run(args.config, out / f"eps{eps}", ["privacy.mode=sample", f"privacy.target_epsilon={eps}"], args.reuse)
        rows.append((f"epsilon {eps}", s))
        print(f"epsilon {eps}: accuracy {s['accuracy']:.4f}, spent {s['epsilon']:.3f}", flush=True)
    base = rows[0][1]["accuracy"]
    lines = ["| run | accuracy | x non-private | epsilon spent (largest client) | MIA AUC | canary exposure (bits, mean / max) |", "|---|---|---|---|---|---|"]
    for name, s in rows:
        a = s["audit"]
        eps = f"{s['epsilon']:.2f}" if "epsilon" in s else "-"
        lines.append(
            f"| {name} | {s['accuracy']:.4f} | {s['accuracy'] / base:.3f} | {eps} | {a['mia_auc']:.3f} | "
            f"{a['canary_exposure']:.2f} / {a['canary_exposure_max']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "table.md").write_text(f"config: {args.config}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
