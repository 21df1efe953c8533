"""Private federated runs end to end: real Flower simulation, real Opacus, real audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedprompt import privacy
from fedprompt.report import read_jsonl
from tests.helpers import TINY, set_args
from tests.tiny import tiny_folder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _simulate(sets: list[str], out: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedprompt", "simulate", *set_args(sets), "--output", str(out)], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize("kind,method,quant", [("llama", "lora", "4bit")])
def test_sample_and_client_level_dp_simulation_reports_epsilon_and_audit(tmp_path, kind, method, quant):
    out = tmp_path / "run"
    sets = [
        f"model.name={tiny_folder(kind)}",
        *TINY,
        f"peft.method={method}",
        f"model.quantization={quant}",
        "federation.num_clients=3",
        "federation.rounds=2",
        "federation.fraction_fit=1.0",
        "federation.fraction_evaluate=0",
        "data.partition=iid",
        "privacy.mode=both",
        "privacy.target_epsilon=6",
        "privacy.clipping=client",
        "audit.canaries=2",
        "audit.references=15",
        "federation.lora_aggregation=ffa",  # QLoRA with FFA under DP-SGD: A sent once, kept in the export
    ]
    r = _simulate(sets, out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = read_jsonl(out / "metrics.jsonl")
    assert [x["round"] for x in rows] == [0, 1, 2]
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] <= 6.0  # sample level: the plan's target is never passed
    assert 0 < rows[1]["client_epsilon"] < rows[2]["client_epsilon"] and rows[2]["dp_releases"] == 2
    ledgers = list((out / "clients").glob("ledger-*.json"))
    assert len(ledgers) == 3
    assert rows[2]["epsilon"] == pytest.approx(max(privacy.Ledger.open(f).epsilon(1e-5) for f in ledgers), rel=1e-9)
    audit = json.loads((out / "audit.json").read_text())
    assert 0 <= audit["mia_auc"] <= 1 and audit["canaries"] == 2 and audit["canary_exposure"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"] == audit
    assert "epsilon (example)" in r.stdout and "epsilon (client)" in r.stdout and "membership-inference AUC" in r.stdout
    exported = load_file(str(out / "adapter/adapter_model.safetensors"))
    a = {k for k in exported if ".lora_A." in k}
    assert a and {k.replace(".lora_A.", ".lora_B.") for k in a} <= set(exported)
    assert summary["payload_bytes"] < sum(v.size * 4 for v in exported.values())  # what travels each round: B (and no A)


def test_unsound_or_unreachable_dp_is_refused_before_anything_starts(tmp_path):
    base = [f"model.name={tiny_folder('bert')}", *TINY, "federation.num_clients=3", "data.partition=iid"]
    r = _simulate([*base, "privacy.mode=sample", "train.batch_size=20"], tmp_path / "a", timeout=300)
    assert r.returncode == 2 and "too few" in r.stderr and r.stderr.count("\n") == 1
    r = _simulate([*base, "privacy.mode=sample", "privacy.target_epsilon=0.001", "federation.rounds=50"], tmp_path / "b", timeout=300)
    assert r.returncode == 2 and "target_epsilon" in r.stderr and r.stderr.count("\n") == 1
    r = _simulate([*base, "privacy.mode=sample", "deepspeed.zero_stage=3"], tmp_path / "c", timeout=300)
    assert r.returncode == 2 and "zero_stage" in r.stderr
    assert not any((tmp_path / d).exists() for d in "abc")
