"""Untrusted participants: each lie of one client among five, undefended vs the defaults vs the
robust strategies, final accuracy measured in one run.

    python benchmarks/untrusted.py [--out runs/bench/untrusted] [--rounds 6]

Every federation is the server's real round loop (`server_app.serve`) on an in-process grid
with the real client handler and LocalClient (MiniLM, BBC, 5 IID clients, all sampled, FedAvg
unless said), as in the learning benchmark; the liar is `localgrid.lying_responder`. Accuracy is
the centralized one (the whole held-out test split) after the last round. "Undefended" turns the
defence off: `federation.max_weight_factor: 0` (claims uncapped), round 0 taken from the liar (as
a server that asks one client does), the example-weighted mean of the clients' own evaluations
with their claims, `client.max_global_norm_factor: 0`. The same lies over the real wire:
tests/test_untrusted_e2e.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import rows, write_result  # noqa: E402
from fedprompt.config import load_config  # noqa: E402

N = 5  # clients; the last one lies
COUNT = 10**6  # the liar's example count, x its true one
LIE = dict(flip=True, count_factor=COUNT)  # a wrong-way update of honest length, a huge claim


def sets(rounds: int) -> list[str]:
    return [
        "model.max_length=32",
        f"federation.num_clients={N}",
        "federation.fraction_fit=1.0",
        f"federation.min_clients={N}",
        f"federation.rounds={rounds}",
        "federation.local_steps=5",
        "federation.fraction_evaluate=0",
        "federation.centralized_eval=true",
        "data.partition=iid",
        "train.warmup_steps=5",
        "output.plots=false",
    ]


def federate(out: Path, rounds: int, extra: list[str], lies: dict | None, *, initial: dict | None = None, client=None):
    """(rows, LocalClient) of one federation whose node N-1 tells `lies` (None: honest)."""
    from fedprompt.local import LocalClient
    from fedprompt.server.app import serve
    from fedprompt.server.localgrid import Lies, LocalGrid, client_responder, lying_responder

    cfg = load_config(ROOT / "configs" / "bbc-minilm-prompt.yaml", sets(rounds) + extra)
    out.mkdir(parents=True, exist_ok=True)
    if initial is not None:  # round 0 from a file: what the liar would have made round 0
        from fedprompt.checkpoint import export_adapter

        export_adapter(out / "initial", initial, client.adapter_config_json())
        cfg.federation.initial_adapter = str(out / "initial")
    (out / "config.yaml").write_text(cfg.to_yaml())
    if client is None:
        client = LocalClient(cfg, num_partitions=N, state_dir=out / "clients")
    client.cfg = cfg
    nodes = {i: client_responder(client, i) for i in range(N - 1)}
    nodes[N - 1] = lying_responder(client, N - 1, Lies(**lies)) if lies else client_responder(client, N - 1)
    try:
        serve(LocalGrid(nodes), cfg, out, centralized=True)
    except Exception as e:  # an undefended run may die: that is its figure
        done = rows(out) if (out / "metrics.jsonl").is_file() else []
        return [*done, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}], client
    return rows(out), client


def final(hist: list[dict]) -> str:
    if "error" in hist[-1]:
        if len(hist) == 1:  # not even round 0's evaluation: every client refused the global
            return "run stopped at round 0: every honest client refuses its global"
        return f"run stopped in round {len(hist) - 1}"
    return f"{hist[-1]['accuracy']:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "untrusted"))
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    out, R = Path(args.out), args.rounds
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, str] = {}
    summary: dict[str, float | str] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def one(name: str, extra: list[str], lies: dict | None, rounds: int = R, **kw) -> list[dict]:
            nonlocal client
            t = time.perf_counter()
            hist, client = federate(tmp / name, rounds, extra, lies, client=client, **kw)
            results[name] = final(hist)
            if "error" not in hist[-1]:
                summary[name] = round(hist[-1]["accuracy"], 4)
            print(f"{name}: {results[name]} ({time.perf_counter() - t:.0f} s)", flush=True)
            return hist

        client = None
        one("clean", [], None)
        one("true_count", [], {"flip": True})
        one("undefended", ["federation.max_weight_factor=0"], LIE)
        one("defaults", [], LIE)
        one("uniform", ["federation.weighting=uniform"], LIE)
        for name, extra in [
            ("fedmedian", ["federation.strategy=fedmedian"]),
            ("trimmedmean", ["federation.strategy=trimmedmean", "federation.trim_fraction=0.2"]),
            ("krum", ["federation.strategy=multikrum", "federation.num_malicious=1"]),
        ]:
            one(name, extra, LIE)

        # Round 0 and the wire contract: a liar whose initial payload has another shape.
        honest0 = {k: v.numpy() for k, v in client.initial_payload().items()}
        import numpy as np

        first = sorted(honest0)[0]
        lying0 = dict(honest0, **{first: np.concatenate([honest0[first], honest0[first][:1]])})
        one("init_undefended", [], None, initial=lying0)
        one("init_defaults", [], {"init_extra_row": True})

        # Evaluation: the liar reports accuracy 1.0 on a billion examples.
        hist = one("eval", ["federation.fraction_evaluate=1.0"], {"eval_metrics": {"accuracy": 1.0, "num-examples": 10**9}})
        nodes = hist[-1]["fed_nodes"]
        liar = max(nodes, key=lambda n: nodes[n]["examples"])
        claimed = sum(v["accuracy"] * v["examples"] for v in nodes.values()) / sum(v["examples"] for v in nodes.values())
        honest = [v["accuracy"] for n, v in nodes.items() if n != liar]
        eval_row = (sum(honest) / len(honest), claimed, hist[-1]["accuracy"], hist[-1]["fed_accuracy_weighted"])
        summary.update(eval_honest=round(eval_row[0], 4), eval_undefended=round(claimed, 4), eval_defaults=round(eval_row[2], 4))

        # A client that hangs from round 2: the defaults bound the round (undefended: no limit).
        hist = one("hang", [], {"hang_from": 2}, rounds=3)
        hang_round = max(r["round_s"] for r in hist[2:])
        normal_round = hist[1]["round_s"]
        summary.update(hang_round_s=round(hang_round, 1), normal_round_s=round(normal_round, 1))

        # A crafted global (x 1000) reaching an honest client: accuracy of what it would train from.
        crafted = {k: v * 1000 for k, v in honest0.items()}
        from fedprompt.client.guard import GlobalRefused, guard_for
        from fedprompt.protocol import Kind, Request

        try:
            guard_for(client, 0).check(Request(Kind.EVALUATE, round=1, tensors=crafted, run=-1))
            refused = "accepted"
        except GlobalRefused:
            refused = "refused (names round and tensor)"
        import torch

        acc_crafted = client.evaluate({k: torch.from_numpy(v) for k, v in crafted.items()})[0]["accuracy"]

    clean = summary["clean"]
    lines = [
        f"MiniLM prompt tuning on BBC, {N} IID clients all sampled, {R} rounds x 5 local steps, FedAvg unless said; "
        f"node {N - 1} lies. Accuracy on the whole held-out test split after the last round (clean run: {clean:.3f}). "
        f"Measured in one run ({time.perf_counter() - t0:.0f} s); the script's docstring says what 'undefended' turns off.",
        "",
        "| attack | undefended | defaults | other settings |",
        "|---|---|---|---|",
        f"| wrong-way update of honest length, claiming {COUNT:,}x its examples | {results['undefended']} (max_weight_factor 0) "
        f"| {results['defaults']} (same update, true count: {results['true_count']}) | uniform {results['uniform']}; "
        f"fedmedian {results['fedmedian']}; trimmedmean 0.2 {results['trimmedmean']}; multikrum f=1 {results['krum']} |",
        f"| initial payload of another shape | {results['init_undefended']} (round 0 from the liar) "
        f"| {results['init_defaults']} (quorum of 3) | federation.initial_adapter |",
        f"| evaluation: accuracy 1.0 on 10^9 examples | reported {eval_row[1]:.3f} | reported {eval_row[2]:.3f} (median; capped mean "
        f"{eval_row[3]:.3f}) | the honest clients' own mean: {eval_row[0]:.3f} |",
        f"| hangs from round 2 | waits for ever (round_timeout 0 before) | longest round {hang_round:.1f} s "
        f"(a normal one {normal_round:.1f} s) | federation.round_timeout |",
        f"| server sends a global x 1000 | accepted: accuracy on it {acc_crafted:.3f} | {refused} | client.max_global_norm_factor |",
    ]
    write_result(out, title="Untrusted participants: attacks vs defences", markdown="\n".join(lines), summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
