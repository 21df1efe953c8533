"""LoRA aggregation: factors vs ffa vs svd under label skew, with and without DP-SGD, on BBC.

    python benchmarks/lora_aggregation.py [--long] [--out runs/bench/lora_aggregation]

MiniLM LoRA (r 8) in the learning benchmark's federation (8 clients, 4 sampled per round,
FedAvg, the server's real round loop on an in-process grid: see learning.py), once per
`federation.lora_aggregation`, at Dirichlet alpha 0.5 and 0.1, and at alpha 0.5 with DP-SGD at
epsilon 8 (privacy.mode sample, delta 1e-5). Accuracy on the whole held-out test split after
the last round, and the bytes a sampled client sends and receives per round. Two more svd rows:
every client at rank 16, and mixed ranks (virtual clients at 4, 8 and 16 in turn, the global at
16), against which the uniform rows are the bounds.
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
from benchmarks.learning import LR, federation_sets, run_federated  # noqa: E402
from fedprompt.config import load_config  # noqa: E402
from fedprompt.lora_aggregation import LORA_AGGREGATIONS  # noqa: E402

SETTINGS = [
    ("dirichlet 0.5", ["data.alpha=0.5"]),
    ("dirichlet 0.1", ["data.alpha=0.1"]),
    ("dirichlet 0.5, DP-SGD eps 8", ["data.alpha=0.5", "privacy.mode=sample", "privacy.target_epsilon=8"]),
]
# (row, settings): each aggregation at r 8, then svd at r 16 and at mixed ranks up to 16.
ROWS = [(agg, [f"federation.lora_aggregation={agg}"]) for agg in LORA_AGGREGATIONS] + [
    ("svd, r 16", ["federation.lora_aggregation=svd", "peft.lora_r=16"]),
    ("svd, ranks 4 / 8 / 16", ["federation.lora_aggregation=svd", "peft.lora_r=16", "federation.lora_ranks=[4, 8, 16]"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "lora_aggregation"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = federation_sets(args.long, "minilm-l6") + ["peft.method=lora", "peft.lora_r=8", f"train.lr={LR['lora']}", "data.partition=dirichlet"]
    results: dict[str, dict[str, dict]] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (agg, row_sets) in enumerate(ROWS):
            results[agg] = {}
            for name, sets in SETTINGS:
                cfg = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", base + sets + row_sets)
                t0 = time.perf_counter()
                hist = run_federated(cfg, Path(tmp) / f"{i}-{len(results[agg])}")
                trained = [r for r in hist if r["round"] > 0]
                results[agg][name] = {
                    "final": hist[-1]["accuracy"],
                    "up": (min(r["bytes_up_min"] for r in trained), max(r["bytes_up"] for r in trained)),
                    "down": max(r["bytes_down"] for r in trained),
                    "epsilon": hist[-1].get("epsilon"),
                    "s": time.perf_counter() - t0,
                }
                print(f"{agg} {name}: {hist[0]['accuracy']:.3f} -> {hist[-1]['accuracy']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    f = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", base).federation
    names = [n for n, _ in SETTINGS]
    lines = [
        f"MiniLM LoRA r 8 unless said (query/value), {f.num_clients} clients, {int(f.num_clients * f.fraction_fit)} sampled per round, "
        f"{f.rounds} rounds x {f.local_steps} local steps, FedAvg, lr {LR['lora']}; accuracy on the whole held-out test split "
        f"after the last round. Bytes: a client's upload (smallest-largest, where ranks differ) and the largest download of a round "
        f"(payload + Flower's framing). "
        f"Measured in one run ({time.perf_counter() - t_all:.0f} s).",
        "",
        "| lora_aggregation | " + " | ".join(names) + " | up / down per client-round |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    summary: dict[str, float] = {}
    for agg, r in results.items():
        eps = r[names[-1]]["epsilon"]
        cells = [f"{r[n]['final']:.3f}" + (f" (eps {eps:.2f})" if n == names[-1] and eps is not None else "") for n in names]
        lo, hi = (x / 1024 for x in r[names[0]]["up"])
        up = f"{hi:.1f}" if hi - lo < 0.5 else f"{lo:.1f}-{hi:.1f}"
        lines.append(f"| {agg} | " + " | ".join(cells) + f" | {up} / {r[names[0]]['down'] / 1024:.1f} KiB |")
        key = agg.replace(", ", "_").replace(" / ", "_").replace(" ", "")
        for n in names:
            summary[f"{key}_{n.split(',')[0].replace(' ', '')}{'_dp' if 'DP' in n else ''}"] = round(r[n]["final"], 4)
        summary[f"{key}_bytes_up"] = r[names[0]]["up"][1]
    lines += ["", "What each costs on the wire and on the server: " + "; ".join(f"`{k}`: {v.note}" for k, v in LORA_AGGREGATIONS.items()) + "."]
    write_result(out, title="LoRA aggregation: factors vs FFA-LoRA vs FlexLoRA's SVD", markdown="\n".join(lines), summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
