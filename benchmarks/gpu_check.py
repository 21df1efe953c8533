"""GPU check: every CUDA path of fedprompt, each in isolation, and one table at the end.

    python benchmarks/gpu_check.py [--dry-run] [--json PATH] [--only NAME,...] [--device cpu]

Each path is a registered function, run in a child process of its own: a CUDA fault or a
crashed native library (bitsandbytes) cannot take the next path down, and a hang is cut at
--timeout. The paths run fedprompt's own code (backbone, methods, engine, privacy, LocalClient,
the server's round loop on the in-process grid) on tiny backbones built from configs (random
weights, real tokenizers) and a small synthetic CSV: nothing is downloaded and no built-in corpus
is needed, so a bare GPU machine with the wheelhouse runs it (`make gpu-check`). Without a CUDA
GPU, or with --dry-run, it prints what each path would test and exits 0; `--device cpu` runs the
paths on CPU (to check the check). Seconds: a path's own time, its imports included. Exit 1 if
any path FAILs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"  # benchmarks/gpu_wheels.sh: wheels and tokenizers for a bare GPU machine
# kind -> the built-in backbone whose tokenizer a tiny model of that kind uses (as tests/tiny.py)
TOKENIZERS = {"llama": "smollm2-135m", "bert": "minilm-l6"}
# The overrides of every tiny run (as tests/tiny.py): small batches, a few steps.
TINY = ["model.max_length=32", "peft.num_virtual_tokens=4", "peft.lora_r=4", "train.batch_size=4", "train.eval_batch_size=16"]
TINY += ["train.local_steps=3", "train.warmup_steps=1", "train.max_eval_examples=16", "output.plots=false"]
PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "deepspeed", "opacus", "flwr", "datasets", "flwr-datasets"]


class Skip(Exception):
    """A path that does not apply here; its message is the reason."""


@dataclass
class Env:
    """Where the paths run: the device, a scratch folder shared by the children, the GPU count."""

    device: str  # "cuda" or "cpu"
    work: Path
    gpus: int = 0

    def config(self, kind: str, method: str, quantization: str = "none", *sets: str):
        """A Config on the tiny `kind` backbone and the synthetic CSV, pinned to this device."""
        from fedprompt.config import load_config

        base = [f"model.name={tiny_model(kind)}", f"model.quantization={quantization}", f"model.device={self.device}", f"peft.method={method}"]
        base += ["data.dataset=file", f"data.path={sample_csv(self.work)}", f"client.state_dir={self.work / 'state'}"]
        return load_config(None, [*base, *TINY, *sets])


@dataclass(frozen=True)
class Check:
    name: str
    plan: str  # what it would do, one line (the dry run's detail)
    run: Callable[[Env], str]  # returns the detail of a pass; raises Skip or any error


@dataclass
class Row:
    path: str
    status: str  # pass | FAIL | skip | would test
    seconds: float
    detail: str = ""


REGISTRY: dict[str, Check] = {}


def register(name: str, plan: str) -> Callable[[Callable[[Env], str]], Callable[[Env], str]]:
    """Add a path to REGISTRY under `name` (a name is registered once)."""

    def add(fn: Callable[[Env], str]) -> Callable[[Env], str]:
        if name in REGISTRY:
            raise ValueError(f"GPU check path {name!r} is registered twice")
        REGISTRY[name] = Check(name, plan, fn)
        return fn

    return add


# ---- the tiny backbones and data ----


def tokenizer_source(kind: str) -> str:
    """The carried tokenizer (.gpu-wheels/tokenizers/KIND) or the built-in backbone's."""
    carried = WHEELS / "tokenizers" / kind
    if (carried / "tokenizer_config.json").is_file():
        return str(carried)
    from fedprompt.backbone import resolve

    return str(resolve(TOKENIZERS[kind]))


def save_tokenizers(out: Path) -> None:
    """Write each kind's tokenizer to out/KIND (the wheelhouse carries them, not the weights)."""
    import transformers

    for kind in TOKENIZERS:
        transformers.AutoTokenizer.from_pretrained(tokenizer_source(kind)).save_pretrained(out / kind, legacy_format=False)
        fast = out / kind / "tokenizer.json"  # written indented: a third of its size is spaces
        fast.write_text(json.dumps(json.loads(fast.read_text(encoding="utf-8")), ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def tiny_model(kind: str) -> str:
    """A tiny 'llama' or 'bert' model folder of tests/tiny.py's shapes, seeded, built once into
    a stable folder of fedprompt's cache (the token cache is keyed by the tokenizer's path)."""
    import torch
    import transformers

    from fedprompt.backbone import cache_dir

    target = cache_dir() / "tiny" / f"{kind}-gpu-check-v1"
    if (target / "config.json").is_file():
        return str(target)
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_source(kind))
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, num_key_value_heads=2, tie_word_embeddings=True))
    else:
        model = transformers.BertModel(transformers.BertConfig(**shape))
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)  # atomic: a concurrent run sees all of it or none
    except OSError:  # another run got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def sample_csv(work: Path) -> Path:
    """120 labelled rows of three topics, each with words of its own (learnable in a few steps)."""
    import random

    path, rng = work / "data.csv", random.Random(0)
    words = {"business": "market shares profit bank", "sport": "match goal team coach", "tech": "software phone chip data"}
    if not path.is_file():
        rows = [(label, " ".join(rng.choices(words[label].split() + ["the", "a", "today"], k=12))) for label in list(words) * 40]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("text,label\n" + "".join(f"{text},{label}\n" for label, text in rows), encoding="utf-8")
    return path


# ---- the paths, in the table's order ----


@register("environment", "versions of torch, CUDA and the carried packages; a matmul on the device")
def environment(env: Env) -> str:
    from importlib import metadata

    import torch

    def version(p: str) -> str | None:
        try:
            return metadata.version(p)
        except metadata.PackageNotFoundError:
            return None

    x = torch.randn(64, 64, device=env.device)
    float((x @ x).sum())  # a kernel actually runs
    where = f"{torch.cuda.get_device_name(0)} x{env.gpus}, CUDA {torch.version.cuda}" if env.device == "cuda" else "cpu"
    if missing := [p for p in PACKAGES if version(p) is None]:
        raise AssertionError(f"not installed: {', '.join(missing)} ({where})")
    return f"{where}; " + ", ".join(f"{p} {version(p)}" for p in PACKAGES)


def _forward_backward(env: Env, quantization: str, method: str, layer: str) -> str:
    """One forward and backward of the trainable set on a bitsandbytes-quantized tiny llama."""
    import bitsandbytes as bnb
    import torch

    from fedprompt.run import setup
    from fedprompt.tasks import collate

    s = setup(env.config("llama", method, quantization))
    layers = [m for m in s.model.modules() if isinstance(m, getattr(bnb.nn, layer))]
    if not layers or layers[0].weight.device.type != env.device:
        raise AssertionError(f"expected {layer} layers on {env.device}, found {len(layers)} ({layers[0].weight.device if layers else '-'})")
    batch = collate(s.train, list(range(4)), s.pad_id, s.backbone.device)
    loss = s.task.loss(s.model(batch["input_ids"], batch["attention_mask"]), batch)
    loss.backward()
    grads = {k: p.grad for k, p in s.model.trainable().items()}
    norm = sum(float(g.norm()) for g in grads.values() if g is not None)
    bad = [k for k, g in grads.items() if g is None or not torch.isfinite(g).all()]
    if bad or not norm > 0:
        raise AssertionError(f"no usable gradient: {bad[:3] or 'all zero'}")
    return f"{len(layers)} {layer} layers, {method}: loss {float(loss.detach()):.3f}, grad norm {norm:.3g}"


for _q, _method, _layer in (("4bit", "lora", "Linear4bit"), ("8bit", "prompt", "Linear8bitLt")):
    _plan = f"bitsandbytes {_q} tiny llama + {_method}: forward and backward of the trainable set"
    register(f"bnb-{_q}", _plan)(functools.partial(_forward_backward, quantization=_q, method=_method, layer=_layer))


def _fit(env: Env, cfg) -> tuple[dict, float, float]:
    """One round of LocalClient.fit from the seeded payload: (metrics, |update|, eval accuracy)."""
    import torch

    from fedprompt.local import LocalClient

    client = LocalClient(cfg, state_dir=env.work / "state")
    start = client.initial_payload()
    res = client.fit(start, round_num=1)
    moved = sum(float((res.tensors[k] - start[k]).norm()) for k in start)
    if not all(torch.isfinite(t).all() for t in res.tensors.values()) or not moved > 0:
        raise AssertionError(f"the update is not finite or did not move (norm {moved})")
    return res.metrics, moved, client.evaluate(res.tensors)[0]["accuracy"]


@register("bf16", "LocalClient.fit, one round (3 steps) of tiny llama + LoRA under a DeepSpeed bf16 engine")
def bf16(env: Env) -> str:
    m, moved, acc = _fit(env, env.config("llama", "lora", "none", "deepspeed.precision=bf16"))
    return f"loss {m['train_loss']:.3f}, update norm {moved:.3g}, eval acc {acc:.2f}"


def _zero(env: Env, stage: int) -> str:
    """fedprompt.engine as run_train drives it: make_engine, train_steps, payload read back."""
    from fedprompt import payload
    from fedprompt.engine import batches, full_params, make_engine, train_steps
    from fedprompt.run import setup

    cfg = env.config("bert", "prompt", "none", f"deepspeed.zero_stage={stage}", "train.lr=0.05")
    s = setup(cfg)
    with full_params(s.model):
        before = payload.extract(s.model)
    engine = make_engine(s.model, cfg, 2)
    stream = batches(len(s.train), cfg.train.batch_size, 0)
    loss = train_steps(engine, s.task, s.train, cfg, steps=2, stream=stream, pad_id=s.pad_id, device=s.backbone.device)
    with full_params(s.model):
        after = payload.extract(s.model)
    moved = sum(float((after[k] - before[k]).norm()) for k in before)
    if set(after) != set(before) or not moved > 0 or not math.isfinite(loss):
        raise AssertionError(f"ZeRO-{stage}: payload not trained (loss {loss}, update norm {moved})")
    return f"{type(engine.optimizer).__name__}, loss {loss:.3f}, update norm {moved:.3g}"


for _stage in range(4):
    register(f"zero-{_stage}", f"DeepSpeed ZeRO stage {_stage}: make_engine + 2 train_steps on tiny bert + prompt")(functools.partial(_zero, stage=_stage))


@register("dp-sgd", "LocalClient.fit with privacy.mode=sample (Opacus per-example clipping + noise), tiny llama + LoRA")
def dp_sgd(env: Env) -> str:
    m, moved, acc = _fit(env, env.config("llama", "lora", "none", "privacy.mode=sample", "privacy.noise_multiplier=1.0"))
    return f"epsilon {m['epsilon']:.2f} (sigma {m['noise_multiplier']:.2f}, q {m['sample_rate']:.3f}), update norm {moved:.3g}"


@register("federation", "the server's round loop on the in-process grid: 2 rounds, one LocalClient worker per visible GPU")
def federation(env: Env) -> str:
    import torch

    from fedprompt.local import LocalClient
    from fedprompt.server.app import serve
    from fedprompt.server.localgrid import LocalGrid, client_responder

    workers = max(env.gpus, 1) if env.device == "cuda" else 1
    n = max(3, workers)
    cfg = env.config("bert", "prompt", "none", f"federation.num_clients={n}", "federation.rounds=2", "federation.min_clients=2", "train.lr=0.05")

    def on(w: int):  # worker w's GPU is the current device while it builds and while it serves
        return torch.cuda.device(w) if env.device == "cuda" else contextlib.nullcontext()

    def pinned(w: int, respond):
        def call(msg):
            with on(w):
                return respond(msg)

        return call

    clients = []
    for w in range(workers):
        with on(w):
            clients.append(LocalClient(cfg, num_partitions=n, state_dir=env.work / "state"))
    grid = LocalGrid({100 + i: pinned(i % workers, client_responder(clients[i % workers], i)) for i in range(n)})
    out = Path(tempfile.mkdtemp(dir=env.work, prefix="federation-"))
    (out / "config.yaml").write_text(cfg.to_yaml())
    serve(grid, cfg, out, centralized=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    if [r["round"] for r in rows] != [0, 1, 2] or any(r.get("failures") for r in rows) or rows[0]["digest"] == rows[-1]["digest"]:
        raise AssertionError(f"rounds {[r['round'] for r in rows]}, failures {[r.get('failures') for r in rows]}")
    return f"2 rounds x {n} clients on {workers} worker(s): eval loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"


@register("two-rank", "a 2-rank client (client.ranks=2, one rank per GPU, NCCL) fits one round: the 1-rank update of the same batch")
def two_rank(env: Env) -> str:
    from fedprompt.local import LocalClient
    from fedprompt.ranks import RankedClient

    if env.device == "cuda" and env.gpus < 2:
        raise Skip(f"needs 2 GPUs, {env.gpus} visible")
    sets = ("peft.lora_dropout=0", "train.batch_size=4")  # tiny llama has no dropout: the same update
    two = RankedClient(env.config("llama", "lora", "none", "client.ranks=2", *sets), ranks=2, state_dir=env.work / "state")
    try:
        start = two.initial_payload()
        b = two.fit(start, round_num=1)
    finally:
        two.close()
    a = LocalClient(env.config("llama", "lora", "none", *sets), state_dir=env.work / "state").fit(start, round_num=1)
    diff = sum(float((a.tensors[k].double() - b.tensors[k].double()).norm() ** 2) for k in start) ** 0.5
    moved = sum(float((a.tensors[k].double() - start[k].double()).norm() ** 2) for k in start) ** 0.5
    if not diff <= 1e-4 * moved:
        raise AssertionError(f"2 ranks' update differs from 1 rank's by {diff / moved:.2e} (relative)")
    return f"loss {b.metrics['train_loss']:.3f} (1 rank {a.metrics['train_loss']:.3f}); update difference {diff / moved:.1e} relative"


# ---- the runner ----


def run_one(check: Check, env: Env) -> Row:
    """Run one path in this process: pass, skip (Skip raised) or FAIL (anything else raised)."""
    t0 = time.perf_counter()
    try:
        detail, status = check.run(env), "pass"
    except Skip as e:
        detail, status = str(e), "skip"
    except Exception as e:  # the table reports it; the next path runs
        traceback.print_exc()  # into the path's log, whose tail is printed above the table
        text = str(e).strip().splitlines()
        detail, status = f"{type(e).__name__}: {text[0] if text else ''}", "FAIL"
    return Row(check.name, status, round(time.perf_counter() - t0, 2), detail)


def run_child(name: str, env: Env, timeout: float) -> Row:
    """Run one path in a child process (`--child NAME`); a crash or a hang is a FAIL row."""
    result, log = env.work / f"{name}.json", env.work / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", env.device, "--work", str(env.work)]
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0, rc = time.perf_counter(), None
    with log.open("w") as f, contextlib.suppress(subprocess.TimeoutExpired):
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, env=child_env).returncode
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    if rc is None:
        row = Row(name, "FAIL", round(time.perf_counter() - t0, 2), f"timed out after {timeout:g} s")
    elif result.is_file():
        row = Row(**json.loads(result.read_text()))
    else:
        how = f"killed by signal {-rc}" if rc < 0 else f"exited {rc}"
        row = Row(name, "FAIL", round(time.perf_counter() - t0, 2), f"child {how}: {lines[-1] if lines else 'no output'}")
    if row.status == "FAIL":  # the end of its log: the machine may be gone after the run
        print(f"---- {name}: the end of {log}\n" + "\n".join(lines[-20:]), file=sys.stderr, flush=True)
    return row


def run_checks(registry: dict[str, Check], env: Env, *, dry: bool = False, isolate: bool = True, timeout: float = 300, budget: float = 540) -> list[Row]:
    """Every path of `registry` in order: its Row (dry: 'would test' + its plan). A path that
    would start after `budget` seconds is skipped, so the table always comes out."""
    rows, t0 = [], time.perf_counter()
    for i, check in enumerate(registry.values(), 1):
        if dry:
            rows.append(Row(check.name, "would test", 0.0, check.plan))
            continue
        left = budget - (time.perf_counter() - t0)
        if left <= 0:
            row = Row(check.name, "skip", 0.0, f"out of time (--budget {budget:g} s)")
        else:
            row = run_child(check.name, env, min(timeout, left)) if isolate else run_one(check, env)
        rows.append(row)
        print(f"[{i}/{len(registry)}] {row.path}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row], width: int = 130) -> str:
    """The one table: path | result | seconds | one-line detail (cut at `width`)."""
    cells = [(r.path, r.status, f"{r.seconds:.1f}" if r.seconds else "-", " ".join(r.detail.split())) for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(("path", "result", "seconds"))]
    lines = [f"{p:<{w[0]}}  {s:<{w[1]}}  {sec:>{w[2]}}  {d if len(d) <= width else d[: width - 3] + '...'}" for p, s, sec, d in cells]
    head = f"{'path':<{w[0]}}  {'result':<{w[1]}}  {'seconds':>{w[2]}}  detail"
    return "\n".join([head, "-" * max(map(len, [head, *lines])), *lines])


def main(argv: list[str] | None = None, registry: dict[str, Check] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print what each path would test; run nothing")
    ap.add_argument("--json", help="also write the table as JSON to this file")
    ap.add_argument("--only", default="", help="comma-separated paths (default: all)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: run the paths on CPU (checks the check)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one path may take")
    ap.add_argument("--budget", type=float, default=540, help="seconds after which no path starts")
    ap.add_argument("--in-process", action="store_true", help="no child process per path")
    ap.add_argument("--work", help="scratch folder: each path's log and run folder (default: a new temporary folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--save-tokenizers", metavar="DIR", help="write the tiny models' tokenizers to DIR (gpu_wheels.sh)")
    args = ap.parse_args(argv)
    registry = REGISTRY if registry is None else registry
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.save_tokenizers:
        save_tokenizers(Path(args.save_tokenizers))
        return 0
    only = [n for n in args.only.split(",") if n]
    if unknown := [n for n in only if n not in registry]:
        ap.error(f"--only: unknown path {', '.join(unknown)}; known: {', '.join(registry)}")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    dry = args.dry_run or (args.device == "cuda" and not gpus)
    work = Path(args.work or tempfile.mkdtemp(prefix="fedprompt-gpu-check-")) if not dry else Path(tempfile.gettempdir())
    if not dry:  # the check's own environment: offline, DeepSpeed on the device checked, no
        # telemetry, privacy ledgers and client records in the scratch folder (never the user's)
        os.environ.update(HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", DS_ACCELERATOR=args.device, XDG_STATE_HOME=str(work / "state"))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    env = Env(args.device, work, gpus)
    if args.child:
        (work / f"{args.child}.json").write_text(json.dumps(dataclasses.asdict(run_one(registry[args.child], env))))
        return 0
    where = "dry run" + ("" if args.dry_run else " (no CUDA GPU visible)") if dry else f"{args.device}, {gpus} GPU(s), logs in {work}"
    t0, chosen = time.perf_counter(), {n: c for n, c in registry.items() if not only or n in only}
    rows = run_checks(chosen, env, dry=dry, isolate=not args.in_process, timeout=args.timeout, budget=args.budget)
    print(f"fedprompt GPU check: {where}, torch {torch.__version__}")
    print(table(rows))
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "skip", "would test")}
    print(", ".join(f"{v} {k}" for k, v in counts.items() if v) + ("" if dry else f" in {time.perf_counter() - t0:.0f} s"))
    if args.json:
        doc = {"where": where, "dry_run": dry, "device": args.device, "gpus": gpus, "torch": torch.__version__, "rows": [dataclasses.asdict(r) for r in rows]}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
