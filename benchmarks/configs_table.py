"""Train every shipped config (each in its own process, so peak memory is its own) and write
benchmarks/CONFIGS.md: the results table README quotes.

    python benchmarks/configs_table.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = [
    ("bbc-minilm-prompt", []),
    ("bbc-minilm-prompt", ["model.quantization=4bit"]),
    ("tweets-minilm-prompt", []),
    ("bbc-smollm2-prompt", []),
    ("bbc-smollm2-prefix", []),
    ("bbc-smollm2-lora", []),
]


def _tag(name: str, sets: list[str]) -> str:
    return name + "".join("-" + s.split("=")[1] for s in sets)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="config names to run")
    ap.add_argument("--out", default=str(ROOT / "runs" / "configs-table"))
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "CONFIGS.md"))
    args = ap.parse_args()
    for name, sets in RUNS:
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / _tag(name, sets)
        cmd = [sys.executable, "-m", "fedprompt", "train", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--output", str(out), "--overwrite"] + [
            x for s in sets for x in ("--set", s)
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        r = json.loads((out / "summary.json").read_text())
        print(f"  accuracy {r['accuracy']:.4f} (start {r['start_accuracy']:.4f}) in {time.time() - t:.0f} s", flush=True)
    # The table holds every run present, so `--only` refreshes some rows and keeps the rest.
    rows = []
    for name, sets in RUNS:
        f = Path(args.out) / _tag(name, sets) / "summary.json"
        if f.is_file():
            r = json.loads(f.read_text())
            r["config"] = f"`{name}`" + "".join(f" `{s}`" for s in sets)
            rows.append(r)
    lines = [
        "# Results of every shipped config (`fedprompt train`, centralized)",
        "",
        f"Measured by `python benchmarks/configs_table.py` on {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores, {time.strftime('%Y-%m-%d')}. Test accuracy on the held-out split "
        "(SmolLM2 configs evaluate the first 200 test examples); wall time includes loading and evaluation.",
        "",
        "| config | start acc | final acc | steps | wall time (s) | peak memory (MiB) | trainable params | payload bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['start_accuracy']:.3f} | {r['accuracy']:.3f} | {r['steps']} | {r['total_s']:.0f} | "
            f"{r['peak_mem_mb']:.0f} | {r['trainable_params']:,} | {r['payload_bytes']:,} |"
        )
    Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
