"""Memory: a simulation's whole process tree against its number of virtual clients, and
SmolLM2-135M's weights at none / 8-bit / 4-bit.

    python benchmarks/memory.py [--long] [--out DIR]     # DIR default: runs/bench/memory

(a) `fedprompt simulate` on MiniLM with 2, 16 and 64 virtual clients (long: also 128), all on
    one worker (federation.workers=1), 2 of them sampled per round (fraction_fit = 2 / clients),
    evaluation off. Every ~0.2 s the RSS of every process of the run is summed: the simulate
    process, SuperLink, SuperExec, ServerApp, the simulation driver, Ray's daemons and workers.
    Ray daemonises some of those out of the process tree, so the run's processes are found as
    tests/test_hygiene.py finds them: by a mark in their environment, which every process the
    run starts inherits (plus the psutil descendants of the simulate process). Target: the peak
    with 64 clients <= 1.3x the peak with 2.
(b) SmolLM2-135M loaded with fedprompt.backbone.load_backbone at model.quantization none, 8bit
    and 4bit, each in a fresh subprocess: peak RSS after the load, and the weight bytes (every
    parameter and buffer storage as held in memory, once each; bitsandbytes' packed 4-bit / int8
    data as stored, plus its quantization state: absmax, code, nested state, SCB). Target: 4-bit
    weight bytes <= 0.35x fp32.
Writes DIR/result.json (title, markdown, summary, plots), DIR/memory_sim.png and
DIR/memory_smollm2.png; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import finished_rows, quiet_env, start_simulate, stop_group  # noqa: E402

quiet_env()

NAME = "memory"
CONFIG = ROOT / "configs" / "bbc-minilm-prompt.yaml"
MARK_VAR = "FEDPROMPT_BENCH_MARK"
SAMPLED = 2
TARGET_SIM = 1.3
TARGET_4BIT = 0.35
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# (a) the process tree of a simulation


def _label(p) -> str:
    """A short name for a process of the run (its role), for the peak breakdown."""
    import psutil

    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::"):
        return cmd[0].split()[0].split(".")[0]  # "ray::ClientAppActor.run" while it runs a task
    if "python" in Path(cmd[0]).name:
        if "-m" in cmd[1:]:
            i = cmd.index("-m")
            return " ".join(cmd[i + 1 : i + 3])
        return Path(cmd[1]).name if len(cmd) > 1 else "python"
    return Path(cmd[0]).name


class TreeSampler(threading.Thread):
    """Sums the RSS of every live process that carries `mark` in its environment (or descends
    from `root`) every `interval` s; keeps the peak, the process count then and a timeline."""

    def __init__(self, root_pid: int, mark: str, interval: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.root_pid, self.mark, self.interval = psutil, root_pid, mark, interval
        self.known: dict[int, object] = {}  # pid -> psutil.Process of the run
        self.others: set[int] = set()  # pids seen not to be the run's (environ does not change)
        self.peak, self.peak_procs = 0, 0
        self.peak_parts: list[tuple[str, int]] = []
        self.timeline: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def _scan(self) -> None:
        ps = self.psutil
        try:
            root = ps.Process(self.root_pid)
            for c in [root, *root.children(recursive=True)]:
                self.known.setdefault(c.pid, c)
        except ps.NoSuchProcess:
            pass
        for pid in ps.pids():
            if pid in self.known or pid in self.others:
                continue
            try:
                p = ps.Process(pid)
                if p.environ().get(MARK_VAR) == self.mark:
                    self.known[pid] = p
                else:
                    self.others.add(pid)
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue

    def sample(self) -> None:
        ps = self.psutil
        self._scan()
        total, parts, gone = 0, {}, []
        for pid, p in self.known.items():
            try:
                if p.status() == ps.STATUS_ZOMBIE:
                    continue
                rss = p.memory_info().rss
            except (ps.NoSuchProcess, ps.AccessDenied):
                gone.append(pid)
                continue
            total += rss
            parts[pid] = rss
        for pid in gone:
            del self.known[pid]
        self.timeline.append((time.monotonic() - self.t0, total))
        if total > self.peak:
            self.peak, self.peak_procs = total, len(parts)
            # Names now, while the processes live (a Ray worker renames itself once started).
            self.peak_parts = [(_label(self.known[pid]), rss) for pid, rss in parts.items()]

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def breakdown(self) -> list[tuple[str, int]]:
        """(role, RSS) of the processes at the peak, largest first, same roles summed."""
        roles: dict[str, int] = {}
        for name, rss in self.peak_parts:
            roles[name] = roles.get(name, 0) + rss
        return sorted(roles.items(), key=lambda x: -x[1])


def simulate_peak(n: int, rounds: int, steps: int, work: Path) -> dict:
    """One `fedprompt simulate` of `n` virtual clients; its process tree's peak RSS."""
    from fedprompt.config import load_config

    frac = SAMPLED / n  # exact in binary for the powers of two used here
    sets = [
        f"federation.num_clients={n}",
        f"federation.fraction_fit={frac}",
        "federation.workers=1",
        f"federation.min_clients={SAMPLED}",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "federation.fraction_evaluate=0",
        "federation.centralized_eval=false",
        "data.partition=iid",
        "model.max_length=32",
    ]
    load_config(CONFIG, sets)  # a bad override fails here, not in a subprocess
    mark = f"{NAME}-{n}-{uuid.uuid4().hex}"
    out, log = work / f"run{n}", work / f"sim{n}.log"
    env = dict(os.environ, **{MARK_VAR: mark})
    t0 = time.perf_counter()
    p = start_simulate(CONFIG, sets, out, log, env=env)
    sampler = TreeSampler(p.pid, mark)
    sampler.start()
    try:
        rc = p.wait(timeout=900)
    finally:
        sampler.stop_event.set()
        sampler.join()
        stop_group(p)
        _reap_marked(mark)
    wall = time.perf_counter() - t0
    finished_rows(rc, log, out, what=f"{n} clients", rounds=rounds, clients=SAMPLED)
    return {"clients": n, "peak": sampler.peak, "procs": sampler.peak_procs, "breakdown": sampler.breakdown(), "timeline": sampler.timeline, "wall": wall}


def _reap_marked(mark: str) -> None:
    """Whatever of the run is still alive after the simulate process exited (a daemonised Ray
    process): killed by its pid (fedprompt reaps them itself; this is only a safety net)."""
    import psutil

    left = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARK_VAR) == mark:
                p.kill()
                left.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    psutil.wait_procs(left, timeout=10)


# ---------------------------------------------------------------------------------------------
# (b) SmolLM2-135M weights, in a fresh process per quantization


def _rss_parts() -> dict[str, int]:
    """This process's resident memory: total, anonymous (private heap) and file-backed (mapped
    files, e.g. a memory-mapped checkpoint), in bytes, from /proc/self/status."""
    f = dict(re.findall(r"(Rss\w+):\s+(\d+) kB", Path("/proc/self/status").read_text()))
    anon, file = int(f.get("RssAnon", 0)) * 1024, int(f.get("RssFile", 0)) * 1024
    return {"rss": anon + file + int(f.get("RssShmem", 0)) * 1024, "anon": anon, "file": file}


def weight_bytes(model) -> tuple[int, dict[str, int], list[tuple[str, int, str]]]:
    """Bytes of every parameter and buffer storage of `model` as held in memory, each storage
    once (tied weights share one), plus bitsandbytes' quantization state (4-bit QuantState:
    absmax, code, offset and the nested state; 8-bit: SCB, CB). (total, bytes per dtype, the
    largest storages as (name, bytes, dtype))."""
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    items: list[tuple[str, int, str]] = []

    def add(name: str, t) -> None:
        import torch

        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or ptr in seen:
            return
        seen.add(ptr)
        dtype = str(t.dtype).replace("torch.", "")
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
        items.append((name, nbytes, dtype))

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        add(name, t)
        qs = getattr(t, "quant_state", None)  # bnb Params4bit
        if qs is not None:
            for attr in ("absmax", "code", "offset"):
                add(f"{name}.quant_state.{attr}", getattr(qs, attr, None))
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                for attr in ("absmax", "code"):
                    add(f"{name}.quant_state.state2.{attr}", getattr(s2, attr, None))
        add(f"{name}.SCB", getattr(t, "SCB", None))  # bnb Int8Params' row scales
    for mname, m in model.named_modules():
        state = getattr(m, "state", None)  # bnb Linear8bitLt's MatmulLtState may hold them instead
        for attr in ("CB", "SCB"):
            add(f"{mname}.state.{attr}", getattr(state, attr, None))
    return sum(by_dtype.values()), by_dtype, sorted(items, key=lambda x: -x[1])[:3]


def child_load(quant: str) -> int:
    """(subprocess) Load SmolLM2-135M at `quant` through fedprompt.backbone; print one JSON line."""
    import torch  # imported before the baseline RSS: it is not the model's

    from fedprompt.backbone import load_backbone, resolve
    from fedprompt.config import load_config

    cfg = load_config(None, ["model.name=smollm2-135m", f"model.quantization={quant}", "model.device=cpu"])
    resolve(cfg.model.name)  # converts the GGUF on the very first use: not part of the load measured
    before = _rss_parts()["rss"]
    t0 = time.perf_counter()
    bb = load_backbone(cfg.model, task="classification")
    load_s = time.perf_counter() - t0
    after, peak = _rss_parts(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss: KiB on Linux
    total, by_dtype, largest = weight_bytes(bb.model)
    # safetensors are memory-mapped: a page is resident (file-backed RSS) once read. Read every
    # storage once, as the first forward would, so that the figures compare like with like.
    with torch.no_grad():
        for t in [*bb.model.parameters(), *bb.model.buffers()]:
            if t.numel():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].float().sum()  # one element per page
    print(
        "RESULT "
        + json.dumps(
            {
                "quant": quant,
                "rss_before": before,
                "rss_after": after,
                "peak_rss": peak,
                "rss_touched": _rss_parts(),
                "weight_bytes": total,
                "by_dtype": by_dtype,
                "largest": largest,
                "load_s": load_s,
                "tied": bool(getattr(bb.model.config, "tie_word_embeddings", False)),
            }
        ),
        flush=True,
    )
    return 0


def load_in_subprocess(quant: str) -> dict:
    p = subprocess.run([sys.executable, __file__, "--_load", quant], check=False, capture_output=True, text=True, timeout=900, cwd=ROOT, start_new_session=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"loading SmolLM2-135M at {quant} failed (status {p.returncode}): {p.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ---------------------------------------------------------------------------------------------


def plots(sims: list[dict], loads: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s in sims:
        t = [x[0] for x in s["timeline"]]
        m = [x[1] / MiB for x in s["timeline"]]
        ax.plot(t, m, label=f"{s['clients']} clients (peak {s['peak'] / MiB:.0f} MiB)")
    ax.set_xlabel("seconds since `fedprompt simulate` started")
    ax.set_ylabel("sum of RSS of the run's processes (MiB)")
    ax.set_title(f"Simulation memory, 1 worker, {SAMPLED} clients per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory_sim.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [x["quant"] for x in loads]
    xs = range(len(loads))
    ax.bar([i - 0.27 for i in xs], [x["weight_bytes"] / MiB for x in loads], width=0.27, label="weight bytes")
    ax.bar(list(xs), [x["peak_rss"] / MiB for x in loads], width=0.27, label="peak RSS after load")
    ax.bar([i + 0.27 for i in xs], [x["rss_touched"]["anon"] / MiB for x in loads], width=0.27, label="private (anon) RSS, weights read")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("MiB")
    ax.set_title("SmolLM2-135M by model.quantization")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory_smollm2.png", dpi=120)
    plt.close(fig)
    return ["memory_sim.png", "memory_smollm2.png"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="also 128 clients; 3 rounds x 5 steps (default: 2 x 2)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / NAME), help="result folder")
    ap.add_argument("--_load", help=argparse.SUPPRESS)  # internal: the fresh process of one SmolLM2 load
    args = ap.parse_args()
    if args._load:
        return child_load(args._load)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally`s: no process left behind
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = (2, 16, 64, 128) if args.long else (2, 16, 64)
    rounds, steps = (3, 5) if args.long else (2, 2)
    t_start, load1 = time.perf_counter(), os.getloadavg()[0]

    sims = []
    with tempfile.TemporaryDirectory(prefix="fedprompt-bench-memory-") as d:
        for n in counts:  # one at a time: each has the machine to itself
            sims.append(simulate_peak(n, rounds, steps, Path(d)))
    loads = [load_in_subprocess(q) for q in ("none", "8bit", "4bit")]
    names = plots(sims, loads, out)

    base = sims[0]
    at64 = next(s for s in sims if s["clients"] == 64)
    sim_ratio = at64["peak"] / base["peak"]
    fp32 = loads[0]["weight_bytes"]
    q4 = next(x for x in loads if x["quant"] == "4bit")
    q4_ratio = q4["weight_bytes"] / fp32

    t1 = [
        ("| virtual clients | peak RSS, all processes (MiB) | vs 2 clients | processes at the peak | largest at the peak (MiB) | run wall (s) |"),
        "|---|---|---|---|---|---|",
    ]
    for s in sims:
        top = ", ".join(f"{name} {rss / MiB:.0f}" for name, rss in s["breakdown"][:2])
        t1.append(f"| {s['clients']} | {s['peak'] / MiB:.0f} | {s['peak'] / base['peak']:.3f}x | {s['procs']} | {top} | {s['wall']:.1f} |")
    t2 = [
        (
            "| model.quantization | weight bytes (MiB) | vs fp32 | by dtype (MiB) | RSS before load | peak RSS after load | "
            "RSS after load: anon + file | weights read once: anon + file | load (s) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in loads:
        dt = ", ".join(f"{k} {v / MiB:.1f}" for k, v in sorted(x["by_dtype"].items(), key=lambda kv: -kv[1]))
        a, t = x["rss_after"], x["rss_touched"]
        t2.append(
            f"| {x['quant']} | {x['weight_bytes'] / MiB:.1f} | {x['weight_bytes'] / fp32:.3f}x | {dt} | "
            f"{x['rss_before'] / MiB:.0f} | **{x['peak_rss'] / MiB:.0f}** | {a['anon'] / MiB:.0f} + {a['file'] / MiB:.0f} | "
            f"{t['anon'] / MiB:.0f} + {t['file'] / MiB:.0f} | {x['load_s']:.1f} |"
        )

    sim_why = ""
    if sim_ratio > TARGET_SIM:
        grew = sorted(((name, rss - dict(base["breakdown"]).get(name, 0)) for name, rss in at64["breakdown"]), key=lambda x: -x[1])[:2]
        sim_why = " — why: the largest growth at the peak is in " + ", ".join(f"{k} (+{v / MiB:.0f} MiB)" for k, v in grew)
    q4_why = ""
    f32_left = q4["by_dtype"].get("float32", 0)
    if q4_ratio > TARGET_4BIT:
        big = q4["largest"][0]
        q4_why = (
            f" — why: {f32_left / MiB:.0f} MiB of the 4-bit model stays float32, mostly `{big[0]}` ({big[1] / MiB:.0f} MiB, "
            f"{big[2]}){' — the word embeddings, tied to lm_head, which is kept in full precision' if q4['tied'] else ''}; "
            "bitsandbytes quantizes only the Linear layers"
        )
    else:
        q4_why = (
            f" ({f32_left / MiB:.0f} MiB of it is still float32, mostly `{q4['largest'][0][0]}`: the embeddings"
            f"{', tied to lm_head' if q4['tied'] else ''}, which bitsandbytes does not quantize)"
        )
    md = "\n".join(
        [
            (
                f"(a) `fedprompt simulate` of `configs/bbc-minilm-prompt.yaml` (MiniLM, `model.max_length=32`, IID) with "
                f"{', '.join(str(c) for c in counts)} virtual clients on one worker (`federation.workers=1`), {SAMPLED} sampled per round "
                f"(`fraction_fit` = {SAMPLED} / clients), {rounds} rounds x {steps} local steps, evaluation off. Every 0.2 s the RSS of "
                f"every process of the run (the simulate process, SuperLink, SuperExec, ServerApp, the simulation driver, Ray's daemons "
                f"and worker) was summed; processes are found by a mark in their environment that each inherits (Ray daemonises some "
                f"out of the process tree), plus the simulate process's descendants. A sum of RSS counts pages shared between "
                f"processes once per process, so it overstates the absolute total; the ratio between runs is what is compared. "
                f"(b) SmolLM2-135M loaded through `fedprompt.backbone.load_backbone` at each `model.quantization`, each in a fresh "
                f"subprocess: weight bytes are every parameter and buffer storage once (tied weights share one), bitsandbytes' packed "
                f"4-bit / int8 data as stored plus its quantization state (absmax, code, nested state; SCB). RSS columns (MiB): before "
                f"the load (torch/transformers imported), the peak right after it, and the anonymous (private) and file-backed "
                f"(memory-mapped checkpoint pages) parts right after it and after every weight page was read once. 1-minute load "
                f"average when the benchmark started: {load1:.1f}."
            ),
            "",
            *t1,
            "",
            *t2,
            "",
            (
                f"- Simulation memory, 64 vs 2 virtual clients: **{sim_ratio:.3f}x** (target <= {TARGET_SIM}x): "
                f"{'met' if sim_ratio <= TARGET_SIM else 'MISSED'}{sim_why}."
            ),
            (
                f"- SmolLM2-135M 4-bit weight bytes vs fp32: **{q4_ratio:.3f}x** ({q4['weight_bytes'] / MiB:.1f} of {fp32 / MiB:.1f} MiB; "
                f"target <= {TARGET_4BIT}x): {'met' if q4_ratio <= TARGET_4BIT else 'MISSED'}{q4_why}."
            ),
            "",
            f"Peak RSS right after the load, 4-bit vs fp32: {q4['peak_rss'] / loads[0]['peak_rss']:.2f}x "
            f"({q4['peak_rss'] / MiB:.0f} vs {loads[0]['peak_rss'] / MiB:.0f} MiB; not a target); private (anonymous) memory "
            f"once every weight was read: {q4['rss_touched']['anon'] / MiB:.0f} vs {loads[0]['rss_touched']['anon'] / MiB:.0f} MiB, "
            f"file-backed {q4['rss_touched']['file'] / MiB:.0f} vs {loads[0]['rss_touched']['file'] / MiB:.0f} MiB"
            + (
                " (the quantizing load reads the whole fp32 checkpoint through a memory map that stays mapped, so its pages "
                "stay in the RSS, as reclaimable page cache)."
                if q4["rss_after"]["file"] > 0.5 * fp32
                else "."
            ),
        ]
    )
    summary: dict = {"sim_ratio_64_vs_2": round(sim_ratio, 4), "sim_target": TARGET_SIM, "sim_met": sim_ratio <= TARGET_SIM}
    for s in sims:
        summary[f"sim_peak_mib_{s['clients']}"] = round(s["peak"] / MiB, 1)
        summary[f"sim_procs_{s['clients']}"] = s["procs"]
    for x in loads:
        summary[f"smollm2_{x['quant']}_weight_mib"] = round(x["weight_bytes"] / MiB, 2)
        summary[f"smollm2_{x['quant']}_peak_rss_mib"] = round(x["peak_rss"] / MiB, 1)
        summary[f"smollm2_{x['quant']}_vs_fp32"] = round(x["weight_bytes"] / fp32, 4)
        summary[f"smollm2_{x['quant']}_anon_rss_mib"] = round(x["rss_touched"]["anon"] / MiB, 1)
    summary.update(
        {
            "smollm2_4bit_ratio": round(q4_ratio, 4),
            "smollm2_4bit_target": TARGET_4BIT,
            "smollm2_4bit_met": q4_ratio <= TARGET_4BIT,
            "rounds": rounds,
            "local_steps": steps,
            "benchmark_wall_s": round(time.perf_counter() - t_start, 1),
            "load_average_at_start": round(load1, 2),
        }
    )
    result = {"title": "Memory: simulation process tree vs clients; SmolLM2-135M by quantization", "markdown": md, "summary": summary, "plots": names}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
