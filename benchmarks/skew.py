"""Strong label skew: FedAvg, logit adjustment, server momentum, for each method, on BBC.

    python benchmarks/skew.py [--long] [--out runs/bench/skew] [--methods prompt,prefix,lora] [--alpha 0.1]

The learning benchmark's federation (8 clients, 4 sampled per round, the server's real round
loop on an in-process grid: see learning.py) at Dirichlet alpha 0.1: plain FedAvg; with
`train.logit_adjustment` 1 (each client's loss sees the class logits plus log of its own label
frequencies: balanced softmax, absent classes out of its softmax); with server momentum
(`federation.strategy` fedavgm, momentum 0.5); and both; against `fedprompt train` on all the
data for the same total number of local steps, all in one run. Accuracy on the whole held-out
test split after the last round. Neither remedy sends anything extra.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import write_result  # noqa: E402
from benchmarks.learning import LR, federation_sets, run_centralized, run_federated  # noqa: E402
from fedprompt.config import load_config  # noqa: E402

REMEDIES = [
    ("FedAvg", []),
    ("logit adjustment 1", ["train.logit_adjustment=1"]),
    ("FedAvgM 0.5", ["federation.strategy=fedavgm", "federation.server_momentum=0.5"]),
    ("both", ["train.logit_adjustment=1", "federation.strategy=fedavgm", "federation.server_momentum=0.5"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "skew"))
    ap.add_argument("--methods", default="prompt,prefix,lora")
    ap.add_argument("--alpha", type=float, default=0.1)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            sets = federation_sets(args.long, "minilm-l6") + [f"peft.method={method}", f"train.lr={LR[method]}"]
            sets += ["data.partition=dirichlet", f"data.alpha={args.alpha}"]
            results[method] = {}
            cfg = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", sets)
            f = cfg.federation
            per_round = max(int(f.num_clients * f.fraction_fit), 1) * cfg.round_steps
            hist = run_centralized(cfg, Path(tmp) / f"{method}-central", per_round * f.rounds, per_round * f.rounds)
            results[method]["centralized"] = hist[-1]["accuracy"]
            for name, extra in REMEDIES:
                t0 = time.perf_counter()
                hist = run_federated(load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", sets + extra), Path(tmp) / f"{method}-{len(results[method])}")
                results[method][name] = hist[-1]["accuracy"]
                print(f"{method} {name}: {hist[-1]['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    names = ["centralized"] + [n for n, _ in REMEDIES]
    lines = [
        f"MiniLM on BBC, Dirichlet alpha {args.alpha}, {f.num_clients} clients, {int(f.num_clients * f.fraction_fit)} sampled per round, "
        f"{f.rounds} rounds x {f.local_steps} local steps, FedAvg; centralized = `fedprompt train` on all the data for the same "
        f"total number of steps. Accuracy on the whole held-out test split after the last round; in brackets, / centralized. "
        f"Measured in one run ({time.perf_counter() - t_all:.0f} s).",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    summary: dict[str, float] = {}
    for method, r in results.items():
        c = r["centralized"]
        lines.append(f"| {method} | {c:.3f} | " + " | ".join(f"{r[n]:.3f} ({r[n] / c:.3f}x)" for n, _ in REMEDIES) + " |")
        for n in names:
            summary[f"{method}_{n.replace(' ', '_')}"] = round(r[n], 4)
    summary["min_ratio_logit_adjustment"] = round(min(r["logit adjustment 1"] / r["centralized"] for r in results.values()), 3)
    summary["min_ratio_best"] = round(min(max(r[n] for n, _ in REMEDIES) / r["centralized"] for r in results.values()), 3)
    write_result(out, title=f"Strong label skew (Dirichlet {args.alpha}): remedies", markdown="\n".join(lines), summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
