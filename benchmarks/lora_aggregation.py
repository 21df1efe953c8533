"""LoRA aggregation: factors vs ffa vs svd under label skew, with and without DP-SGD, on BBC.

    python benchmarks/lora_aggregation.py [--long] [--out runs/bench/lora_aggregation]

MiniLM LoRA (r 8) in the learning benchmark's federation (8 clients, 4 sampled per round,
FedAvg, the server's real round loop on an in-process grid: see learning.py), once per
`federation.lora_aggregation`, at Dirichlet alpha 0.5 and 0.1, and at alpha 0.5 with DP-SGD at
epsilon 8 (privacy.mode sample, delta 1e-5). Accuracy on the whole held-out test split after
the last round, and the bytes a sampled client sends and receives per round. Two more svd rows:
every client at rank 16, and mixed ranks (virtual clients at 4, 8 and 16 in turn, the global at
16), against which the uniform rows are the bounds.

    python benchmarks/lora_aggregation.py --dp [--dp-lrs 0.1,0.3,1] [--out runs/bench/lora_aggregation_dp]

--dp: the DP-SGD column alone (Dirichlet 0.5, epsilon 8), with the optimizer DP-SGD needs
(SGD with momentum 0.9, expected Poisson batch 32, as configs/bbc-minilm-prompt-dp.yaml; Adam
moves coordinates that only noise reaches a full step). Its learning rate is picked in the same
invocation: `factors` at each of --dp-lrs, the best then used for every row; one more row adds
the skew remedy that DP-SGD admits, FedAvgM (logit adjustment reads the client's label counts,
outside the accountant, and is refused under DP-SGD).
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


# client.max_global_norm_factor off: the guard compares the global with the seeded initial
# payload, whose LoRA B is zero, and a fast DP learning rate grows B past 10x that honestly.
DP_SETS = [
    "data.alpha=0.5",
    "privacy.mode=sample",
    "privacy.target_epsilon=8",
    "train.optimizer=sgd",
    "train.momentum=0.9",
    "train.batch_size=32",
    "client.max_global_norm_factor=0",
]
DP_ROWS = ["factors", "ffa", "svd"]  # at r 8; rank 16 and mixed ranks are the non-private table's
DP_REMEDY = ("factors + FedAvgM 0.5", ["federation.lora_aggregation=factors", "federation.strategy=fedavgm", "federation.server_momentum=0.5"])


def _final(cfg, out: Path) -> tuple[dict, float]:
    """One federation: (its result row for the table, seconds)."""
    t0 = time.perf_counter()
    hist = run_federated(cfg, out)
    trained = [r for r in hist if r["round"] > 0]
    s = time.perf_counter() - t0
    return {
        "final": hist[-1]["accuracy"],
        "up": (min(r["bytes_up_min"] for r in trained), max(r["bytes_up"] for r in trained)),
        "down": max(r["bytes_down"] for r in trained),
        "epsilon": hist[-1].get("epsilon"),
        "s": s,
    }, s


def dp_column(base: list[str], lrs: list[float], out: Path) -> int:
    """The DP-SGD column with a tuned SGD learning rate (see the module docstring)."""
    t_all = time.perf_counter()
    probe: dict[float, float] = {}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in lrs:
            cfg = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", [*base, *DP_SETS, f"train.lr={lr}", "federation.lora_aggregation=factors"])
            r, s = _final(cfg, Path(tmp) / f"probe-{lr}")
            probe[lr] = r["final"]
            results.setdefault(f"factors@{lr}", r)
            print(f"probe lr {lr}: {r['final']:.3f} (eps {r['epsilon']:.2f}, {s:.0f} s)", flush=True)
        best = max(probe, key=lambda x: probe[x])
        for i, (agg, row_sets) in enumerate([r for r in ROWS if r[0] in DP_ROWS] + [DP_REMEDY]):
            if agg == "factors":
                results[agg] = results[f"factors@{best}"]
                continue
            cfg = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", [*base, *DP_SETS, f"train.lr={best}", *row_sets])
            results[agg], s = _final(cfg, Path(tmp) / f"row-{i}")
            print(f"{agg}: {results[agg]['final']:.3f} ({s:.0f} s)", flush=True)
    f = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", base).federation
    lines = [
        f"MiniLM LoRA r 8 unless said (query/value), Dirichlet 0.5, {f.num_clients} clients, {int(f.num_clients * f.fraction_fit)} sampled "
        f"per round, {f.rounds} rounds x {f.local_steps} local steps, FedAvg unless said; DP-SGD at epsilon 8 (delta 1e-5, clip 1), "
        "SGD with momentum 0.9, expected Poisson batch 32. Learning rate probed on `factors` in this run: "
        + ", ".join(f"{lr:g}: {a:.3f}" for lr, a in probe.items())
        + f"; {best:g} used for every row. Accuracy on the whole held-out test split after the last round. Measured in one "
        f"run ({time.perf_counter() - t_all:.0f} s).",
        "",
        "| lora_aggregation | accuracy, DP-SGD eps 8 | epsilon spent | up / down per client-round |",
        "|---|---|---|---|",
    ]
    summary: dict[str, float] = {"lr": best}
    for agg, _ in [r for r in ROWS if r[0] in DP_ROWS] + [DP_REMEDY]:
        r = results[agg]
        lo, hi = (x / 1024 for x in r["up"])
        up = f"{hi:.1f}" if hi - lo < 0.5 else f"{lo:.1f}-{hi:.1f}"
        lines.append(f"| {agg} | {r['final']:.3f} | {r['epsilon']:.2f} | {up} / {r['down'] / 1024:.1f} KiB |")
        summary[agg.replace(", ", "_").replace(" / ", "_").replace(" + ", "_").replace(" ", "")] = round(r["final"], 4)
    write_result(out, title="LoRA aggregation under DP-SGD (epsilon 8), tuned", markdown="\n".join(lines), summary=summary)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--dp", action="store_true", help="the DP-SGD column alone, with a tuned SGD learning rate")
    ap.add_argument("--dp-lrs", default="0.1,0.3,1", help="--dp: the learning rates probed on factors")
    args = ap.parse_args()
    if args.dp:
        base = federation_sets(args.long, "minilm-l6") + ["peft.method=lora", "peft.lora_r=8", "data.partition=dirichlet"]
        out = Path(args.out or ROOT / "runs" / "bench" / "lora_aggregation_dp")
        out.mkdir(parents=True, exist_ok=True)
        return dp_column(base, [float(x) for x in args.dp_lrs.split(",")], out)
    args.out = args.out or str(ROOT / "runs" / "bench" / "lora_aggregation")
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
