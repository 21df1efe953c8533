"""Strong label skew: FedAvg, logit adjustment, server momentum, for each method, on BBC.

    python benchmarks/skew.py [--long] [--out runs/bench/skew] [--methods prompt,prefix,lora] [--alpha 0.1]
                              [--rounds N] [--remedies fedavg,logit,fedavgm,both]

The learning benchmark's federation (8 clients, 4 sampled per round, the server's real round
loop on an in-process grid: see learning.py) at Dirichlet alpha 0.1: plain FedAvg; with
`train.logit_adjustment` 1 (each client's loss sees the class logits plus log of its own label
frequencies: balanced softmax, absent classes out of its softmax); with server momentum
(`federation.strategy` fedavgm, momentum 0.5); and both; against `fedprompt train` on all the
data for the same total number of local steps, all in one run. Accuracy on the whole held-out
test split after the last round, and beside it the personal accuracy: every client's own test
split under its own label prior (the median over the 8 clients; `personal_accuracy` in
engine.evaluate). Neither remedy sends anything extra. `--rounds` runs longer federations (the
converged figures), `--remedies` a subset.
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

REMEDIES = [  # (column, --remedies key, settings)
    ("FedAvg", "fedavg", []),
    ("logit adjustment 1", "logit", ["train.logit_adjustment=1"]),
    ("FedAvgM 0.5", "fedavgm", ["federation.strategy=fedavgm", "federation.server_momentum=0.5"]),
    ("both", "both", ["train.logit_adjustment=1", "federation.strategy=fedavgm", "federation.server_momentum=0.5"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "skew"))
    ap.add_argument("--methods", default="prompt,prefix,lora")
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=0, help="federation rounds (0: the learning benchmark's)")
    ap.add_argument("--remedies", default=",".join(k for _, k, _ in REMEDIES), help="a subset of " + ",".join(k for _, k, _ in REMEDIES))
    args = ap.parse_args()
    remedies = [(n, extra) for n, k, extra in REMEDIES if k in args.remedies.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            sets = federation_sets(args.long, "minilm-l6") + [f"peft.method={method}", f"train.lr={LR[method]}"]
            sets += ["data.partition=dirichlet", f"data.alpha={args.alpha}", "federation.fraction_evaluate=1.0"]
            sets += [f"federation.rounds={args.rounds}"] if args.rounds else []
            results[method] = {}
            cfg = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", sets)
            f = cfg.federation
            per_round = max(int(f.num_clients * f.fraction_fit), 1) * cfg.round_steps
            hist = run_centralized(cfg, Path(tmp) / f"{method}-central", per_round * f.rounds, per_round * f.rounds)
            results[method]["centralized"] = hist[-1]["accuracy"]
            for name, extra in remedies:
                t0 = time.perf_counter()
                hist = run_federated(load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", sets + extra), Path(tmp) / f"{method}-{len(results[method])}")
                results[method][name] = hist[-1]["accuracy"]
                results[method][f"{name} personal"] = hist[-1]["fed_personal_accuracy"]
                print(
                    f"{method} {name}: {hist[-1]['accuracy']:.3f}, personal {hist[-1]['fed_personal_accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    names = ["centralized"] + [n for n, _ in remedies]
    lines = [
        f"MiniLM on BBC, Dirichlet alpha {args.alpha}, {f.num_clients} clients, {int(f.num_clients * f.fraction_fit)} sampled per round, "
        f"{f.rounds} rounds x {f.local_steps} local steps, FedAvg; centralized = `fedprompt train` on all the data for the same "
        f"total number of steps. Accuracy on the whole held-out test split after the last round; in brackets, / centralized; "
        f"after the slash, the personal accuracy (each client's own test split under its own label prior, the median of 8). "
        f"Measured in one run ({time.perf_counter() - t_all:.0f} s).",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    summary: dict[str, float] = {}
    for method, r in results.items():
        c = r["centralized"]
        lines.append(f"| {method} | {c:.3f} | " + " | ".join(f"{r[n]:.3f} ({r[n] / c:.3f}x) / {r[n + ' personal']:.3f}" for n, _ in remedies) + " |")
        for n in r:
            summary[f"{method}_{n.replace(' ', '_')}"] = round(r[n], 4)
    if "logit" in args.remedies.split(","):
        summary["min_ratio_logit_adjustment"] = round(min(r["logit adjustment 1"] / r["centralized"] for r in results.values()), 3)
    summary["min_ratio_best"] = round(min(max(r[n] for n, _ in remedies) / r["centralized"] for r in results.values()), 3)
    title = f"{'Strong label' if args.alpha <= 0.1 else 'Label'} skew (Dirichlet {args.alpha}{f', {f.rounds} rounds' if args.rounds else ''}): remedies"
    write_result(out, title=title, markdown="\n".join(lines), summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
