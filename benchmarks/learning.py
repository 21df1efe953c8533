"""Learning: centralized vs federated IID vs Dirichlet label skew, for each method, on BBC.

    python benchmarks/learning.py [--long] [--out runs/bench/learning] [--methods prompt,prefix,lora]

For each method: `fedprompt train` (centralized, all the data, the same total number of local
steps as the federation) and the federation with IID partitions and Dirichlet alpha 1.0, 0.5 and
0.1. Each federation is the server's real round loop (`server_app.serve`: configure, send,
validate, screen, aggregate with Flower's FedAvg, evaluate, checkpoint) with the real client
request handler and LocalClient behind each node, on an in-process grid: no SuperLink or Ray,
which do not change what is learnt but cost ~30 s of start-up per run (their cost is measured by
the overhead benchmarks). Quick mode: MiniLM; long mode: MiniLM and SmolLM2 (4-bit).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import plot, rows, write_result  # noqa: E402
from fedprompt.config import load_config  # noqa: E402

SETTINGS = [("centralized", None), ("iid", None), ("dirichlet", 1.0), ("dirichlet", 0.5), ("dirichlet", 0.1)]
# Per-method learning rates (the shipped configs' choices): a soft prompt moves in embedding
# units, LoRA's B matrices start at zero and need a smaller step.
LR = {"prompt": 0.03, "prefix": 0.01, "lora": 0.003}


def federation_sets(long: bool, model: str) -> list[str]:
    """The federation every setting shares: 8 clients, 4 sampled per round, FedAvg."""
    if model == "smollm2-135m":
        rounds, steps = (8, 5)
        base = ["model.name=smollm2-135m", "model.quantization=4bit", "train.batch_size=8", "model.max_length=48", "train.max_eval_examples=200"]
    else:
        rounds, steps = (20, 10) if long else (8, 10)
        base = ["model.max_length=32"]
    return base + [
        "federation.num_clients=8",
        "federation.fraction_fit=0.5",
        "federation.min_clients=2",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "federation.fraction_evaluate=0",
        "federation.strategy=fedavg",
        "federation.centralized_eval=true",
        "train.warmup_steps=5",
        "output.plots=false",
    ]


def run_federated(cfg, out: Path) -> list[dict]:
    """The round loop of `fedprompt simulate`, against one LocalClient serving every node."""
    from fedprompt.local import LocalClient
    from fedprompt.server.app import serve
    from fedprompt.server.localgrid import LocalGrid, client_responder

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    client = LocalClient(cfg, num_partitions=cfg.federation.num_clients, state_dir=out / "clients")
    grid = LocalGrid({i: client_responder(client, i) for i in range(cfg.federation.num_clients)})
    serve(grid, cfg, out, centralized=True)
    return rows(out)


def run_centralized(cfg, out: Path, total_steps: int, every: int) -> list[dict]:
    from fedprompt.run import run_train

    cfg.train.local_steps, cfg.train.eval_every = total_steps, every
    run_train(cfg, out, quiet=True)
    return rows(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "learning"))
    ap.add_argument("--methods", default="prompt,prefix,lora")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = ["minilm-l6", "smollm2-135m"] if args.long else ["minilm-l6"]
    results: dict[str, dict] = {}
    curves: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for method in args.methods.split(","):
                key = f"{model} {method}"
                sets = federation_sets(args.long, model) + [f"peft.method={method}", f"train.lr={LR[method]}"]
                results[key], curves[key] = {}, {}
                for partition, alpha in SETTINGS:
                    name = partition if alpha is None else f"dirichlet {alpha}"
                    cfg = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", sets)
                    f = cfg.federation
                    per_round = max(int(f.num_clients * f.fraction_fit), 1) * cfg.round_steps
                    t0 = time.perf_counter()
                    d = Path(tmp) / f"{model}-{method}-{name.replace(' ', '')}"
                    if partition == "centralized":
                        hist = run_centralized(cfg, d, per_round * f.rounds, per_round)
                        xs = [r["step"] / per_round for r in hist]
                    else:
                        cfg.data.partition = partition
                        if alpha is not None:
                            cfg.data.alpha = alpha
                        hist = run_federated(cfg, d)
                        xs = [r["round"] for r in hist]
                    acc = [r["accuracy"] for r in hist]
                    results[key][name] = {"final": acc[-1], "start": acc[0], "best": max(acc), "s": time.perf_counter() - t0}
                    curves[key][name] = (xs, acc)
                    print(f"{key} {name}: {acc[0]:.3f} -> {acc[-1]:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    f = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", federation_sets(args.long, "minilm-l6")).federation
    names = [n if a is None else f"dirichlet {a}" for n, a in SETTINGS]
    lines = [
        f"{f.num_clients} clients, {int(f.num_clients * f.fraction_fit)} sampled per round, {f.rounds} rounds x "
        f"{f.local_steps} local steps (MiniLM: max_length 32, batch 16), FedAvg; centralized = `fedprompt train` "
        "on all the data for the same total number of steps. Accuracy on the whole held-out test split after the "
        "last round (SmolLM2 rows: its first 200 examples). Federations run the server's real round loop on an "
        "in-process grid (see the script's docstring).",
        "",
        "| model, method | " + " | ".join(names) + " | alpha 0.5 / centralized |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    summary: dict[str, float] = {}
    for key, r in results.items():
        ratio = r["dirichlet 0.5"]["final"] / r["centralized"]["final"]
        summary[f"{key.replace(' ', '_')}_alpha0.5_ratio"] = round(ratio, 3)
        for n in names:
            summary[f"{key.replace(' ', '_')}_{n.replace(' ', '')}"] = round(r[n]["final"], 4)
        lines.append(f"| {key} | " + " | ".join(f"{r[n]['final']:.3f}" for n in names) + f" | {ratio:.3f} |")
    summary["min_alpha0.5_ratio"] = min(v for k, v in summary.items() if k.endswith("_ratio"))
    plots = []
    for key, c in curves.items():
        png = f"learning-{key.replace(' ', '-')}.png"
        plot({n: c[n] for n in names}, out / png, xlabel="round (centralized: same steps)", ylabel="test accuracy", title=f"BBC, {key}: accuracy per round")
        plots.append(png)
    write_result(out, title="Learning: centralized vs federated (IID, Dirichlet)", markdown="\n".join(lines), summary=summary, plots=plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
