"""Simulation scaling: time per round against the number of clients trained per round.

    python benchmarks/scaling.py [--long] [--out DIR]     # DIR default: runs/bench/scaling

For each k (quick: 1, 4, 16, 64; long: 1, 2, 4, 8, 16, 32, 64) one `fedprompt simulate` of
64 virtual clients (MiniLM, IID, `model.max_length=32`) on one worker (federation.workers=1),
`fraction_fit` = k / 64 so that k clients train per round, 1 round (long: 2) of 2 local steps
each, evaluation off. Reported per k: the mean `round_s` of the metrics rows (start-up excluded),
the seconds per client (round_s / k) and the clients' own mean training time. One worker serves
the sampled clients one after another, so round time should grow about linearly with k and the
per-client time should stay flat: that flatness is the result. Each k is a separate run, one
after the other, so each has the machine to itself.
Writes DIR/result.json (title, markdown, summary, plots) and DIR/scaling.png; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import finished_rows, quiet_env, start_simulate, stop_group  # noqa: E402

quiet_env()

from fedprompt.config import load_config

NAME = "scaling"
CONFIG = ROOT / "configs" / "bbc-minilm-prompt.yaml"
NUM_CLIENTS = 64
STEPS = 2


def simulate(k: int, rounds: int, work: Path) -> dict:
    """One `fedprompt simulate` with k of 64 clients per round; its rounds' figures."""
    sets = [
        f"federation.num_clients={NUM_CLIENTS}",
        f"federation.fraction_fit={k / NUM_CLIENTS}",
        "federation.workers=1",
        f"federation.rounds={rounds}",
        f"federation.local_steps={STEPS}",
        "federation.fraction_evaluate=0",
        "federation.centralized_eval=false",
        "data.partition=iid",
        "model.max_length=32",
    ]
    cfg = load_config(CONFIG, sets)  # a bad override fails here, not in a subprocess
    out, log = work / f"run{k}", work / f"sim{k}.log"
    t0 = time.perf_counter()
    p = start_simulate(CONFIG, sets, out, log)
    try:
        rc = p.wait(timeout=600 + 30 * k * rounds)
    finally:
        stop_group(p)
    wall = time.perf_counter() - t0
    rows = finished_rows(rc, log, out, what=f"k={k}", rounds=rounds, clients=k)
    round_s = sum(r["round_s"] for r in rows) / rounds
    train_s = sum(r.get("client_train_s") or 0.0 for r in rows) / rounds
    return {
        "k": k,
        "round_s": round_s,
        "per_client_s": round_s / k,
        "client_train_s": train_s,
        "rounds_s": [r["round_s"] for r in rows],
        "wall": wall,
        "startup": wall - sum(r["round_s"] for r in rows),
        "batch": cfg.train.batch_size,
    }


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x; (a, b, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1.0
    return a, b, 1.0 - ss_res / ss_tot


def plot(res: list[dict], a: float, b: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in res]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(ks, [r["round_s"] for r in res], "o-", label="measured round_s")
    grid = [ks[0] + (ks[-1] - ks[0]) * i / 100 for i in range(101)]
    ax1.plot(grid, [a + b * k for k in grid], "--", color="gray", label=f"linear fit {a:.1f} + {b:.2f} k")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("clients trained per round (k)")
    ax1.set_ylabel("seconds per round")
    ax1.set_title("round time vs k (1 worker)")
    ax1.legend(fontsize=8)
    ax2.plot(ks, [r["per_client_s"] for r in res], "o-", label="round_s / k")
    ax2.plot(ks, [r["client_train_s"] for r in res], "s--", label="client training (train_s)")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(bottom=0)
    ax2.set_xlabel("clients trained per round (k)")
    ax2.set_ylabel("seconds per client")
    ax2.set_title("per-client time vs k")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="k = 1, 2, 4, ..., 64, 2 rounds each (default: 1, 4, 16, 64, 1 round)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / NAME), help="result folder")
    args = ap.parse_args()
    ks, rounds = ((1, 2, 4, 8, 16, 32, 64), 2) if args.long else ((1, 4, 16, 64), 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s: no process left behind
    t_start, load1 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fedprompt-bench-scaling-") as d:
        res = [simulate(k, rounds, Path(d)) for k in ks]
    a, b, r2 = fit_line([float(r["k"]) for r in res], [r["round_s"] for r in res])
    plot(res, a, b, out / "scaling.png")

    by_k = {r["k"]: r for r in res}
    # The reference is k = 16, not 1 or 4: there the fixed cost of a round is already spread thin, so a
    # change in the ratio is a change in what each client costs.
    ref = by_k.get(16, res[len(res) // 2])
    top = res[-1]
    flat = top["per_client_s"] / ref["per_client_s"]
    table = ["| k (clients per round) | round_s | round_s / k | client train_s (mean) | start-up of the run (s) |", "|---|---|---|---|---|"]
    for r in res:
        table.append(f"| {r['k']} | {r['round_s']:.2f} | **{r['per_client_s']:.3f}** | {r['client_train_s']:.3f} | {r['startup']:.1f} |")
    md = "\n".join(
        [
            (
                f"`fedprompt simulate` of `configs/bbc-minilm-prompt.yaml` with {NUM_CLIENTS} virtual clients (MiniLM prompt tuning, "
                f"IID, `model.max_length=32`, batch {res[0]['batch']}) on one worker (`federation.workers=1`), `fraction_fit` = k / "
                f"{NUM_CLIENTS} so that k clients train per round, {rounds} round(s) of {STEPS} local steps per client, evaluation off "
                f"(`fraction_evaluate=0`, `centralized_eval=false`); one run per k, one after another. Measured: the metrics rows' "
                f"`round_s` (mean over the run's rounds; start-up excluded, shown apart), round_s / k, and the clients' own mean "
                f"training time (`client_train_s`). One worker serves the sampled clients sequentially, so round time should grow "
                f"about linearly with k and the per-client time should stay flat; at small k the fixed cost of a round (sampling, "
                f"messages, aggregation, checkpoint) is shared by few clients. 1-minute load average when the benchmark started: "
                f"{load1:.1f}."
            ),
            "",
            *table,
            "",
            (
                f"Linear fit round_s = a + b·k: a = {a:.2f} s fixed per round, b = {b:.3f} s per client, R² = {r2:.4f}. "
                f"A client's training ({STEPS} steps) is {top['client_train_s']:.3f} s of its {top['per_client_s']:.3f} s at k = {top['k']}."
            ),
            "",
            (
                f"- Per-client time, k = {top['k']} vs k = {ref['k']}: **{flat:.3f}x** (expectation, not a project target: flat, ~1.0; "
                f"round time linear in k, R² {r2:.3f}): {'flat' if 0.75 <= flat <= 1.25 else 'NOT flat'}"
                + ("" if 0.75 <= flat <= 1.25 else " — per-client cost changes with k: see the table's client train_s against round_s / k")
                + "."
            ),
        ]
    )
    summary: dict = {f"round_s_k{r['k']}": round(r["round_s"], 3) for r in res}
    summary.update({f"per_client_s_k{r['k']}": round(r["per_client_s"], 4) for r in res})
    summary.update({f"client_train_s_k{r['k']}": round(r["client_train_s"], 4) for r in res})
    summary.update(
        {
            "fit_fixed_s": round(a, 3),
            "fit_per_client_s": round(b, 4),
            "fit_r2": round(r2, 4),
            "per_client_ratio_max_vs_ref": round(flat, 4),
            "per_client_ref_k": ref["k"],
            "rounds": rounds,
            "local_steps": STEPS,
            "num_clients": NUM_CLIENTS,
            "benchmark_wall_s": round(time.perf_counter() - t_start, 1),
            "load_average_at_start": round(load1, 2),
        }
    )
    result = {"title": "Simulation scaling: round time vs clients per round", "markdown": md, "summary": summary, "plots": ["scaling.png"]}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
