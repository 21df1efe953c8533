"""Audits that can fail: both attack surfaces, each in a setting where the undefended federation
leaks, beside the defended one, measured in one run.

    python benchmarks/audit_strength.py [--out runs/bench/audit_strength] [--rounds 3] [--steps 25] [--canaries 4] [--repeats 8]

1. What the released model leaks. SmolLM2-135M (4-bit) LoRA r 8 learns BBC News topics as
   generation (prompt: the article's tail then "Topic:", response: the topic word; exact match
   is the accuracy), 800 articles. 4 clients, all in every round. Client 0's training text also holds
   `--canaries` secrets ("Note for the record: my secret access code is" -> " 381204."), each
   repeated `--repeats` times; the audit ranks each code by the final adapter's likelihood of its
   digits against 255 unplanted codes (exposure, bits of 8). Without DP and with DP-SGD at
   epsilon 8 (delta 1e-5, the same optimizer).
2. What the server sees. MiniLM prompt tuning at Dirichlet 0.1, 8 clients: the audit replays a
   round from the final adapter and infers each client's label distribution from what the server
   holds: every update (plain round) or only their mean (secure round); without DP and with
   DP-SGD at epsilon 8 (the DP config's SGD with momentum).

Each run is the server's real round loop against in-process clients (learning.py's harness).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import quiet_env, write_result  # noqa: E402
from benchmarks.learning import run_federated  # noqa: E402
from fedprompt.audit import run_audit  # noqa: E402
from fedprompt.config import load_config  # noqa: E402

DP = ["privacy.mode=sample", "privacy.target_epsilon=8", "privacy.delta=1e-5"]


def fresh(d: Path) -> Path:
    """An empty run directory (the round loop would resume an earlier run's checkpoint)."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def audited_pair(config: str, base: list[str], dp: list[str], prefix: Path) -> list[tuple[str, list[dict], dict, float]]:
    """The federation of configs/`config` + `base`, without DP and with `dp`, each run in a fresh
    PREFIX-plain / PREFIX-dp folder and audited: (name, metrics rows, audit, seconds) each."""
    out = []
    for name, sets in (("no DP", []), ("DP-SGD eps 8", dp)):
        cfg = load_config(ROOT / "configs" / config, base + sets)
        d = fresh(prefix.with_name(f"{prefix.name}-{'dp' if sets else 'plain'}"))
        t0 = time.perf_counter()
        hist = run_federated(cfg, d)
        out.append((name, hist, run_audit(cfg, d, quiet=True), time.perf_counter() - t0))
    return out


def topic_file(path: Path) -> Path:
    """BBC News as prompt -> topic pairs (JSONL), from the built-in dataset's texts."""
    from fedprompt.config.schema import DataConfig
    from fedprompt.data import load_task_data

    td = load_task_data(DataConfig(dataset="bbc"))
    with path.open("w", encoding="utf-8") as fh:
        for split in (td.train, td.test):
            for text, label in zip(split["text"], split["label"]):
                fh.write(json.dumps({"prompt": f"{text}\nTopic:", "response": f" {td.labels[label]}"}) + "\n")
    return path


def released(out: Path, rounds: int, steps: int, canaries: int, repeats: int) -> list[dict]:
    data = topic_file(out / "bbc-topics.jsonl")
    base = [
        "model.name=smollm2-135m",
        "model.quantization=4bit",
        "model.max_length=48",
        "peft.method=lora",
        "peft.lora_r=8",
        "peft.lora_target_modules=[q_proj, v_proj]",
        "data.dataset=file",
        f"data.path={data}",
        "data.task=generation",
        "data.partition=iid",
        "data.max_examples=800",  # 160 training texts per client: the canaries are a visible share of client 0's
        "train.batch_size=8",
        "train.lr=0.003",
        "train.warmup_steps=5",
        "train.max_eval_examples=50",
        "federation.num_clients=4",
        "federation.min_clients=4",
        "federation.fraction_fit=1.0",
        "federation.fraction_evaluate=0",
        "federation.centralized_eval=true",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "audit.client=0",
        f"audit.canaries={canaries}",
        f"audit.canary_repeats={repeats}",
        "audit.references=255",
        "output.plots=false",
    ]
    rows = []
    for name, hist, a, s in audited_pair("bbc-smollm2-lora.yaml", base, DP, out / "released"):
        last = hist[-1]
        rows.append({"run": name, "exact_match": last.get("exact_match", last.get("accuracy")), "s": s, **a})
        print(f"released, {name}: exposure {a['canary_exposure']:.2f} bits mean, AUC {a['mia_auc']:.3f}", flush=True)
    return rows


def server_seen(out: Path, rounds: int) -> list[dict]:
    base = [
        "model.max_length=32",
        "data.partition=dirichlet",
        "data.alpha=0.1",
        "federation.num_clients=8",
        "federation.min_clients=2",
        "federation.fraction_fit=0.5",
        f"federation.rounds={rounds}",
        "federation.local_steps=10",
        "federation.fraction_evaluate=0",
        "federation.centralized_eval=true",
        "audit.canaries=0",
        "output.plots=false",
    ]
    # The DP config's SGD with momentum. Under Dirichlet 0.1 the head's bias grows past 10x the
    # initial payload's norm, which client.max_global_norm_factor (a defence against a crafted
    # global) would refuse in this honest run: off here.
    dp = [*DP, "train.optimizer=sgd", "train.lr=2.0", "train.batch_size=16", "train.warmup_steps=5", "client.max_global_norm_factor=0"]
    rows = []
    for name, hist, a, s in audited_pair("bbc-minilm-prompt.yaml", base, dp, out / "server"):
        rows.append({"run": name, "accuracy": hist[-1]["accuracy"], "s": s, **a["server_view"]})
        v = a["server_view"]
        print(f"server view, {name}: majority hit plain {v['plain']['majority_hit']:.2f} vs secure {v['secure']['majority_hit']:.2f}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "audit_strength"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25, help="local steps per round of the released-model runs")
    ap.add_argument("--server-rounds", type=int, default=8, help="rounds of the server-view runs")
    ap.add_argument("--canaries", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--only", default="released,server", help="released, server or both (a part not run is read from its last run's JSON under --out)")
    args = ap.parse_args()
    quiet_env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts, summary = [], {}
    if "released" in args.only or (out / "released.json").is_file():
        rel = (
            released(out, args.rounds, args.steps, args.canaries, args.repeats) if "released" in args.only else json.loads((out / "released.json").read_text())
        )
        (out / "released.json").write_text(json.dumps(rel, indent=1))
        ceiling = rel[0]["exposure_ceiling"]
        lines = [
            f"| run | exact match | canary exposure, bits of {ceiling:.0f} (mean / max) | MIA AUC | s |",
            "|---|---|---|---|---|",
            *(
                f"| {r['run']} | {r['exact_match']:.3f} | {r['canary_exposure']:.2f} / {r['canary_exposure_max']:.2f} | {r['mia_auc']:.3f} | {r['s']:.0f} |"
                for r in rel
            ),
        ]
        parts.append(
            f"What the released adapter leaks: SmolLM2-135M 4-bit LoRA, BBC topics as generation, 4 clients x {args.rounds} rounds x "
            f"{args.steps} steps; {args.canaries} canaries x {args.repeats} copies in client 0's text, each ranked against 255 codes.\n\n" + "\n".join(lines)
        )
        summary.update(
            exposure_plain=rel[0]["canary_exposure"],
            exposure_dp=rel[1]["canary_exposure"],
            exact_match_plain=rel[0]["exact_match"],
            exact_match_dp=rel[1]["exact_match"],
        )
    if "server" in args.only or (out / "server.json").is_file():
        srv = server_seen(out, args.server_rounds) if "server" in args.only else json.loads((out / "server.json").read_text())
        (out / "server.json").write_text(json.dumps(srv, indent=1))
        lines = [
            "| run | accuracy | plain round: majority hit / TV | secure round: majority hit / TV | no update: majority hit / TV |",
            "|---|---|---|---|---|",
            *(
                f"| {r['run']} | {r['accuracy']:.3f} | "
                + " | ".join(f"{r[k]['majority_hit']:.2f} / {r[k]['tv']:.2f}" for k in ("plain", "secure", "no_update"))
                + " |"
                for r in srv
            ),
        ]
        parts.append(
            "What the server sees: MiniLM prompt tuning, Dirichlet 0.1, 8 clients; label inference on one replayed round "
            f"({srv[0]['probes']} probe texts; majority hit: share of the {srv[0]['clients']} clients whose most frequent label the "
            "server names, higher leaks more; TV: distance to the true label distribution, lower leaks more).\n\n" + "\n".join(lines)
        )
        summary.update(
            label_hit_plain=srv[0]["plain"]["majority_hit"],
            label_hit_secure=srv[0]["secure"]["majority_hit"],
            label_hit_plain_dp=srv[1]["plain"]["majority_hit"],
            label_hit_secure_dp=srv[1]["secure"]["majority_hit"],
        )
    write_result(out, title="Audits that can fail", markdown="\n\n".join(parts), summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
