"""Federation end to end: real `fedprompt simulate` / `server` / `client` processes, real Flower
SuperLink and SuperNodes on loopback (free ports), real backbones (slow; `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedprompt.config import load_config
from fedprompt.processes import free_port
from fedprompt.report import read_jsonl
from tests.helpers import TINY, metrics_rows, set_args, start_fedprompt, stop_all, wait_for_round
from tests.test_hygiene import assert_nothing_outlives, start_marked, watch_until_exit
from tests.tiny import tiny_folder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _flower_processes_of(port: int) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(port) in cmd and ("flower" in cmd or "flwr" in cmd):
            found.append(cmd)
    return found


# A user elsewhere: transformers + peft and the adapter folder, nothing of fedprompt.
PLAIN_PEFT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

folder, data = sys.argv[1], json.load(open(sys.argv[2]))
meta = json.load(open(folder + "/fedprompt.json"))
base = json.load(open(folder + "/adapter_config.json"))["base_model_name_or_path"]
path = meta["local_base_model"]  # offline here; elsewhere meta["base_model"], the hub id
tok = AutoTokenizer.from_pretrained(path)
id2label = {int(k): v for k, v in meta["id2label"].items()}
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(id2label), id2label=id2label)
model = PeftModel.from_pretrained(model, folder).eval()
right = 0
with torch.no_grad():
    for i in range(0, len(data), 64):
        texts, golds = zip(*data[i : i + 64])
        x = tok(list(texts), truncation=True, max_length=meta["max_length"], padding=True, return_tensors="pt")
        right += sum(model.config.id2label[int(k)] == g for k, g in zip(model(**x).logits.argmax(-1), golds))
print(json.dumps({"accuracy": right / len(data), "fedprompt_imported": any(m.split(".")[0] == "fedprompt" for m in sys.modules), "base": base}))
"""


def _text_label(ds) -> tuple[list[str], list[int]]:
    return list(ds["text"]), [int(y) for y in ds["label"]]


def _scrape(url: str) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return ""  # not up yet, or gone


def _walkthrough() -> list[list[str]]:
    """The README's "A first deployment" commands, one argv each (continuations joined,
    comments dropped), in the order a user types them."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walk-through", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands, line = [], ""
    for raw in block.splitlines():
        part = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        line += " " + part.removesuffix("\\")
        if part and not part.endswith("\\"):
            commands.append(shlex.split(line))
            line = ""
    assert all(c[0] == "fedprompt" for c in commands), commands
    return commands


# What the test changes in the walk-through: fewer rounds and steps (the suite's budget).
FEWER = set_args(["federation.rounds=1", "federation.local_steps=10"])


def test_readme_walkthrough_matches_its_simulation(tmp_path):
    """The README's first deployment, run as written (a free port instead of 9092, fewer
    rounds): a real server and two real TLS clients complete their rounds; each client loads its
    backbone once; the server's Prometheus endpoint says each round as it completes; the
    accuracy is within 0.05 of `fedprompt simulate` on the same config; the final adapter loads
    with peft (and with plain transformers + peft) and gives the last row's accuracy."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    commands = _walkthrough()
    kinds = [c[1] for c in commands]
    assert kinds == ["certs", "certs", "certs", "server", "client", "client"], kinds
    port, out = free_port(), tmp_path / "runs/fed"
    for c in commands[:3]:
        r = subprocess.run([sys.executable, "-m", "fedprompt", *c[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    scrape = f"http://127.0.0.1:{free_port()}/metrics"
    server_args = [*commands[3][1:], *FEWER, *set_args([f"server.address=127.0.0.1:{port}", f"server.metrics_address={scrape[7:-8]}"])]
    server = start_fedprompt(server_args, tmp_path / "server.log", cwd=tmp_path)
    clients = [
        start_fedprompt([a.replace("localhost:9092", f"localhost:{port}") for a in c[1:]] + FEWER, tmp_path / f"client{i}.log", threads=1, cwd=tmp_path)
        for i, c in enumerate(commands[4:])
    ]
    seen: dict[int, str] = {}  # rounds completed -> the scrape that said so, while the server runs
    try:
        t0 = time.monotonic()
        while server.poll() is None and time.monotonic() - t0 < 1200:
            text = _scrape(scrape)
            done = next((int(float(x.split()[-1])) for x in text.splitlines() if x.startswith("fedprompt_rounds_completed ")), None)
            if done is not None and done not in seen:
                seen[done] = text
            time.sleep(0.2)
        assert server.wait(timeout=5) == 0, (tmp_path / "server.log").read_text()[-3000:]
        assert all(c.poll() is None for c in clients)  # clients are services: still up
    finally:
        stop_all(clients + [server])
    assert {0, 1} <= set(seen), sorted(seen)  # Prometheus saw each round as it completed
    assert 'fedprompt_replies_rejected_total{reason="payload"} 0.0' in seen[1] and "fedprompt_clients_aggregated 2.0" in seen[1]
    assert not _flower_processes_of(port), "Flower processes left behind"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    loads = rows[1]["backbone_loads"]  # after the initial payload, round 0's evaluation and round 1
    assert len(loads) == 2 and set(loads.values()) == {1}
    summary = json.loads((out / "summary.json").read_text())
    assert max(r["bytes_up"] for r in rows) <= 1.10 * summary["payload_bytes"]
    assert "Summary" in (tmp_path / "server.log").read_text()

    # The same config simulated: where the walk-through ends is where the simulation ends.
    sim = subprocess.run(
        [sys.executable, "-m", "fedprompt", "simulate", "--config", "configs/deploy-2-clients.yaml", "--output", "runs/sim", *FEWER],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-3000:]
    sim_rows = read_jsonl(tmp_path / "runs/sim/metrics.jsonl")
    assert [r["round"] for r in sim_rows] == [0, 1]
    assert abs(rows[-1]["accuracy"] - sim_rows[-1]["accuracy"]) <= 0.05, (rows[-1]["accuracy"], sim_rows[-1]["accuracy"])
    assert rows[-1]["accuracy"] > 0.5  # trained: 4 labels, 0.25 at round 0

    # Each client's figure of the last round, pooled: what the adapter must reproduce.
    nodes = rows[-1]["fed_nodes"].values()
    pooled = sum(v["accuracy"] * v["examples"] for v in nodes) / sum(v["examples"] for v in nodes)
    assert pooled == pytest.approx(rows[-1]["accuracy"], abs=1e-6)

    # And with plain transformers + peft in a process without fedprompt: the folder names the
    # base model (a hub id; its local copy here, offline) and the labels.
    from fedprompt.data import load_task_data, partition

    cfg = load_config(out / "config.yaml")
    data = load_task_data(cfg.data)
    texts = [(t, data.labels[y]) for i in range(2) for t, y in zip(*_text_label(partition(data.test, cfg.data, 2, i)), strict=True)]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    r = subprocess.run(
        [sys.executable, "-I", "-c", PLAIN_PEFT, str(out / "adapter"), str(tmp_path / "texts.json")], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    plain = json.loads(r.stdout.strip().splitlines()[-1])
    assert plain == {"accuracy": pytest.approx(pooled, abs=1e-6), "fedprompt_imported": False, "base": "sentence-transformers/all-MiniLM-L6-v2"}
    card = (out / "adapter" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and f"test accuracy: {rows[-1]['accuracy']:.4f}" in card


def _rank_children(client: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(client.pid).children() if "fedprompt.ranks" in " ".join(p.cmdline())]


def test_server_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path):
    """The server SIGKILLed after round 2 resumes from its checkpoint; its clients outlive it.
    Client 1 trains on 2 ranks (`--ranks 2`): its backbone is loaded once per rank for its
    whole life, and its rank 1, killed while the server is down, is restarted at the next round."""
    port, out = free_port(), tmp_path / "run"
    common = set_args([f"model.name={tiny_folder('bert')}", *TINY, "federation.rounds=4", "data.partition=iid"])
    server_args = ["server", *common, "--set", f"server.address=127.0.0.1:{port}", "--output", str(out), "--insecure"]
    server = start_fedprompt(server_args, tmp_path / "server1.log")
    clients = [
        start_fedprompt(
            [
                "client",
                *common,
                "--server",
                f"127.0.0.1:{port}",
                "--partition-id",
                str(i),
                "--num-partitions",
                "2",
                "--insecure",
                *(["--ranks", "2"] if i else []),
            ],
            tmp_path / f"client{i}.log",
            threads=1,
        )
        for i in range(2)
    ]
    try:
        wait_for_round(out, 2, [server, *clients], timeout=600)
        os.killpg(server.pid, signal.SIGKILL)  # the whole server side dies at once, like a pod
        server.wait()
        before = {r["round"]: r["digest"] for r in metrics_rows(out) if r["round"] > 0}
        assert 2 in before
        (rank1,) = _rank_children(clients[1])
        rank1.kill()  # a zombie until its parent, the client, reaps it at the next round
        server = start_fedprompt(server_args, tmp_path / "server2.log")
        assert server.wait(timeout=600) == 0, (tmp_path / "server2.log").read_text()[-3000:]
    finally:
        stop_all(clients + [server])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # each round exactly once
    assert {r["round"]: r["digest"] for r in rows if r["round"] in before} == before
    log = (out / "logs" / "run.log").read_text()
    assert f"resuming after round {max(before)} of 4 (global payload {before[max(before)]})" in log
    assert "resuming after round" in (tmp_path / "server2.log").read_text()
    # Per round, each client's backbone loads so far (all its ranks): 1 and 2, then client 1's
    # restarted rank makes 3. (A client that reconnected late after the resume misses a round.)
    one, two = str(clients[0].pid), str(clients[1].pid)
    seen = [(r["round"], r["backbone_loads"][two]) for r in rows[1:] if two in r["backbone_loads"]]
    assert all(n == (2 if rnd in before else 3) for rnd, n in seen), seen
    assert any(rnd in before for rnd, _ in seen) and any(rnd not in before for rnd, _ in seen), seen
    assert all(r["backbone_loads"].get(one, 1) == 1 for r in rows[1:]), rows
    assert "rank 1 of 2 exited (killed by SIGKILL); restarting ranks 1..1" in (tmp_path / "client1.log").read_text()


def test_simulation_one_backbone_per_worker_under_secure_aggregation(tmp_path):
    """6 virtual clients on one worker: one backbone load in all; the run directory is
    complete; the prompt is securely aggregated (all 6 clients, SecAgg+) and the run ends where
    the same federation aggregated in the clear ends. (Federated QLoRA with FFA: test_privacy_e2e;
    prefix on 8-bit: test_hygiene's interrupted simulation, past its round 1.)"""
    out = tmp_path / "run"
    plain_sets = [
        f"model.name={tiny_folder('bert')}",
        *TINY,
        "peft.method=prompt",
        "federation.num_clients=6",
        "federation.rounds=2",
        "federation.fraction_fit=1.0",
        "federation.fraction_evaluate=0.5",
        "data.partition=dirichlet",
        "data.alpha=1.0",
        "train.lr=0.05",
        "output.trackers=tensorboard,mlflow",
    ]
    sets = [*plain_sets, "federation.secure_aggregation=true", "federation.reject_norm_factor=0", "federation.clipping_range=1.0"]
    p, mark = start_marked(["simulate", *set_args(sets), "--output", str(out)], tmp_path / "sim.log")
    try:
        ports = watch_until_exit(p, mark, 900)
        rc = p.wait(timeout=5)
    finally:
        stop_all([p])
    text = (tmp_path / "sim.log").read_text()
    assert rc == 0, text[-4000:]
    assert_nothing_outlives(mark, ports)  # a finished simulation leaves no process and no port behind
    rows = read_jsonl(out / "metrics.jsonl")
    assert [x["round"] for x in rows] == [0, 1, 2]
    assert all(x["clients"] == 6 and x["secure"] and x["released"] for x in rows[1:])
    pids = {pid for x in rows[1:] for pid in x["backbone_loads"]}
    assert len(pids) == 1 and all(list(x["backbone_loads"].values()) == [1] for x in rows[1:])
    assert rows[1]["digest"] != rows[2]["digest"]
    for f in ("config.yaml", "summary.json", "curves.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoint.safetensors"):
        assert (out / f).is_file(), f
    assert "Summary" in text and str(out) in text and "Traceback" not in text
    _trackers_hold(out, rows)
    plain = _in_process(tmp_path / "plain", plain_sets)  # the same round loop in process, in the clear
    assert abs(rows[-1]["accuracy"] - plain[-1]["accuracy"]) <= 0.01 and abs(rows[-1]["loss"] - plain[-1]["loss"]) <= 1e-3, (rows[-1], plain[-1])


def _in_process(out: Path, sets: list[str]) -> list[dict]:
    """The federation of `sets` run by the same round loop against in-process clients."""
    from fedprompt.config import load_config
    from fedprompt.local import LocalClient
    from fedprompt.server.app import serve
    from fedprompt.server.localgrid import LocalGrid, client_responder

    cfg = load_config(None, sets)
    out.mkdir(parents=True)
    client = LocalClient(cfg, num_partitions=cfg.federation.num_clients, state_dir=out / "clients")
    serve(LocalGrid({i: client_responder(client, i) for i in range(cfg.federation.num_clients)}), cfg, out, centralized=True)
    return read_jsonl(out / "metrics.jsonl")


def _trackers_hold(out: Path, rows: list[dict]) -> None:
    """TensorBoard's event files and MLflow's store, read back with their own readers, hold
    every numeric figure of metrics.jsonl at its round."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedprompt.tracking import numbers

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the run's local store (see fedprompt/tracking.py)
    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedprompt").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["peft.method"] == "prompt"
    for key in ("accuracy", "loss", "bytes_up", "round_s", "clients"):
        want = {r["round"]: pytest.approx(numbers(r)[key], rel=1e-6) for r in rows if key in numbers(r)}
        assert {e.step: e.value for e in tb.Scalars(key)} == want, key
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} == want, key
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "adapter"} <= arts


def test_simulation_of_generation_on_a_user_file_at_mixed_lora_ranks(tmp_path):
    """Generation (prompt -> response, exact match) federated, from the user's own JSONL, by
    virtual clients of LoRA ranks 2 and 4 (svd); the exported rank-4 adapter loads with peft."""
    f = tmp_path / "pairs.jsonl"
    words = ["red", "green", "blue"]
    with f.open("w") as fh:
        for i in range(60):
            fh.write(json.dumps({"prompt": f"Item {i} colour:", "response": f" {words[i % 3]}"}) + "\n")
    sets = [
        f"model.name={tiny_folder('llama')}",
        *TINY,
        "peft.method=lora",
        "federation.lora_aggregation=svd",
        "federation.lora_ranks=[2, 4]",
        "data.dataset=file",
        f"data.path={f}",
        "data.task=generation",
        "data.partition=iid",
        "federation.num_clients=3",
        "federation.rounds=2",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "fedprompt", "simulate", *set_args(sets), "--output", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert "exact_match" in rows[-1] and rows[-1]["round"] == 2
    assert rows[1]["clients"] == 3 and not any(rows[1]["rejected"].values())  # ranks 2, 4, 2 all aggregated
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder("llama")), str(tmp_path / "run" / "adapter"))
    assert {tuple(p.shape)[0] for k, p in pm.named_parameters() if ".lora_A." in k} == {4}


def test_bad_input_is_one_line_before_anything_starts(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedprompt",
            "simulate",
            *set_args([f"model.name={tiny_folder('bert')}", *TINY, "data.dataset=file", f"data.path={tmp_path / 'missing.csv'}"]),
            "--output",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.csv" in r.stderr
    assert not (tmp_path / "run").exists()
    r = subprocess.run(
        [sys.executable, "-m", "fedprompt", "client", "--server", "nohost", "--partition-id", "3", "--num-partitions", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "HOST:PORT" in r.stderr and r.stderr.count("\n") == 1
