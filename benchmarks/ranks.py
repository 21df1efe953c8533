"""A client on 2 data-parallel ranks vs 1 rank: the same global batches, one run.

    python benchmarks/ranks.py [--long] [--out DIR] [--rounds R] [--repeats K]

Each block is one federated round's `fit` (engine build, train.local_steps steps, payload
out) on the same global payload; blocks of the 1-rank and the 2-rank client alternate K times
so that drift on a shared machine hits both alike, and medians are compared. (One process
belongs to one training group: between blocks the 2-rank client's group is closed, and it is
formed again, with an untimed warm-up round, before the next 2-rank block.) On CPU one rank
gets all the cores' threads and each of 2 ranks half of them (what `fedprompt client --ranks 2`
does), so the figure is what a user gets by asking for 2 ranks on the same machine. (That
the two give the same update is a test: tests/test_ranks.py, on a backbone without dropout.)
Quick: MiniLM fp32 prompt tuning (the default config); --long adds SmolLM2 4-bit LoRA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import quiet_env, write_result  # noqa: E402

quiet_env()

from fedprompt import payload  # noqa: E402
from fedprompt.config import load_config  # noqa: E402
from fedprompt.local import LocalClient  # noqa: E402
from fedprompt.ranks import RankedClient, cpu_threads  # noqa: E402


def measure(config: str, overrides: list[str], repeats: int) -> dict:
    cfg = load_config(config, overrides)
    two_cfg = load_config(config, [*overrides, "client.ranks=2"])
    cores = cpu_threads(1)
    two = RankedClient(two_cfg, ranks=2, say=lambda _: None)  # sets this process's threads to cores / 2
    two.close()
    one = LocalClient(cfg)
    start = payload.extract(one.state.model)
    on_gpu = one.state.backbone.device.type == "cuda"

    def block(client, threads: int) -> float:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        client.fit(start, round_num=1)
        return time.perf_counter() - t

    block(one, cores)  # warm-up
    t1, t2 = [], []
    try:
        for _ in range(repeats):
            t1.append(block(one, cores))
            block(two, max(cores // 2, 1))  # forms the group again (untimed)
            t2.append(block(two, max(cores // 2, 1)))
            two.close()  # this process back to one rank alone
    finally:
        two.close()
    one_s, two_s = statistics.median(t1), statistics.median(t2)
    return {
        "model": f"{cfg.model.name}, {cfg.model.quantization}",
        "method": cfg.peft.method,
        "batch": f"{cfg.train.batch_size} x {cfg.model.max_length} tokens, {cfg.round_steps} steps",
        "device": "GPU" if on_gpu else f"CPU, {cores} cores",
        "one_s": one_s,
        "two_s": two_s,
        "speedup": one_s / two_s,
        "spread": f"{min(t1):.2f}-{max(t1):.2f} / {min(t2):.2f}-{max(t2):.2f}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "ranks"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    plan = [(str(ROOT / "configs" / "bbc-minilm-prompt.yaml"), ["federation.local_steps=10"])]
    if args.long:
        plan.append((str(ROOT / "configs" / "bbc-smollm2-lora.yaml"), ["federation.local_steps=5", "peft.lora_dropout=0"]))
    res = [measure(c, o, args.repeats) for c, o in plan]
    lines = [
        "One federated round's local training (engine build, the steps, the payload out) of a client on 1 rank and "
        "on 2 data-parallel ranks (`fedprompt client --ranks 2`), the same global batches; blocks alternate, medians "
        "compared. On CPU the ranks share the machine's cores (each of 2 ranks gets half the threads), so this is "
        "what asking for 2 ranks on the same machine buys; on a multi-GPU node each rank has its own GPU.",
        "",
        "| model | method | round | device | 1 rank (s/round) | 2 ranks (s/round) | speedup | min-max (1 / 2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['batch']} | {r['device']} | {r['one_s']:.2f} | {r['two_s']:.2f} | {r['speedup']:.2f}x | {r['spread']} |"
        )
    lines += [
        "",
        "On CPU one rank already uses every core, so 2 ranks can only win what one process leaves idle; the speedup "
        "that matters is one GPU per rank. GPU rows: `make gpu-check` on a machine with 2 GPUs.",
    ]
    write_result(Path(args.out), title="Multi-rank client: 2 ranks vs 1 rank", markdown="\n".join(lines), summary={"speedup": round(res[0]["speedup"], 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
