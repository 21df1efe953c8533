"""benchmarks/gpu_check.py: the dry run lists every path, the table and its JSON, and a path
that raises, crashes or hangs is a FAIL row while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import REGISTRY, Check, Env, Skip, run_checks, run_child

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_without_a_gpu_lists_every_registered_path(tmp_path):
    out = tmp_path / "table.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever the machine
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dry run (no CUDA GPU visible)" in r.stdout
    lines = r.stdout.splitlines()
    for name, check in REGISTRY.items():
        (line,) = [x for x in lines if x.startswith(f"{name} ")]
        assert "would test" in line and check.plan[:40] in line
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is True
    assert [row["path"] for row in doc["rows"]] == list(REGISTRY)
    assert {row["status"] for row in doc["rows"]} == {"would test"}
    # every CUDA path the issue names has a row
    assert {"bnb-4bit", "bnb-8bit", "bf16", "zero-0", "zero-1", "zero-2", "zero-3", "dp-sgd", "federation", "two-rank"} <= set(REGISTRY)


def _fake_registry(ran: list[str]) -> dict[str, Check]:
    def ok(name: str):
        def run(env: Env) -> str:
            ran.append(name)
            return f"{name} fine"

        return run

    def boom(env: Env) -> str:
        ran.append("boom")
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nsecond line")

    def skipped(env: Env) -> str:
        raise Skip("needs 2 GPUs, 1 visible")

    return {
        "first": Check("first", "plan of first", ok("first")),
        "boom": Check("boom", "plan of boom", boom),
        "after": Check("after", "plan of after", ok("after")),
        "skipped": Check("skipped", "plan of skipped", skipped),
    }


@pytest.fixture
def clean_env(monkeypatch):
    """gpu_check.main sets the check's environment: restored after the test."""
    for key in ("HF_HUB_OFFLINE", "FLWR_TELEMETRY_ENABLED", "DS_ACCELERATOR", "XDG_STATE_HOME", "TOKENIZERS_PARALLELISM"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)


def test_a_path_that_raises_is_a_fail_row_and_the_others_still_run(tmp_path, capsys, clean_env):
    ran: list[str] = []
    out = tmp_path / "table.json"
    argv = ["--device", "cpu", "--in-process", "--work", str(tmp_path), "--json", str(out)]
    assert gpu_check.main(argv, registry=_fake_registry(ran)) == 1  # a FAIL: non-zero exit
    assert ran == ["first", "boom", "after"]
    table = capsys.readouterr().out
    rows = {line.split()[0]: line for line in table.splitlines() if line.split() and line.split()[0] in ("first", "boom", "after", "skipped")}
    assert " pass " in rows["first"] and " pass " in rows["after"]
    assert " FAIL " in rows["boom"] and "RuntimeError: CUDA error: an illegal memory access was encountered" in rows["boom"]
    assert "second line" not in table  # one line per row
    assert " skip " in rows["skipped"] and "needs 2 GPUs, 1 visible" in rows["skipped"]
    doc = json.loads(out.read_text())
    assert doc["dry_run"] is False and doc["device"] == "cpu"
    assert [(r["path"], r["status"]) for r in doc["rows"]] == [("first", "pass"), ("boom", "FAIL"), ("after", "pass"), ("skipped", "skip")]
    assert doc["rows"][0]["detail"] == "first fine" and all(r["seconds"] >= 0 for r in doc["rows"])


def test_dry_run_flag_runs_nothing_and_exits_0(tmp_path, capsys):
    ran: list[str] = []
    out = tmp_path / "table.json"
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--json", str(out)], registry=_fake_registry(ran)) == 0
    assert ran == []
    doc = json.loads(out.read_text())
    assert [(r["path"], r["status"], r["detail"]) for r in doc["rows"]] == [(n, "would test", f"plan of {n}") for n in ("first", "boom", "after", "skipped")]


def test_out_of_budget_paths_are_skipped_so_the_table_comes_out(tmp_path):
    ran: list[str] = []
    rows = run_checks(_fake_registry(ran), Env("cpu", tmp_path), isolate=False, budget=0)
    assert ran == [] and [r.status for r in rows] == ["skip"] * 4 and "out of time" in rows[0].detail


def test_a_child_that_crashes_or_hangs_is_a_fail_row(tmp_path, monkeypatch):
    env = Env("cpu", tmp_path)
    # A real path in a real child: the row comes back through the child's result file.
    row = run_child("environment", env, timeout=120)
    assert row.path == "environment" and row.status == "pass" and row.detail.startswith("cpu; torch ") and "deepspeed " in row.detail, row
    crash = tmp_path / "crash.sh"
    crash.write_text("#!/bin/sh\necho 'Fatal Python error: Segmentation fault'\nkill -SEGV $$\n")
    crash.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crash))
    row = run_child("zero-3", env, timeout=60)
    assert row.status == "FAIL" and row.detail == "child killed by signal 11: Fatal Python error: Segmentation fault"
    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hang))
    row = run_child("zero-3", env, timeout=0.5)
    assert row.status == "FAIL" and row.detail == "timed out after 0.5 s" and row.seconds < 10


def test_a_path_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        gpu_check.register("zero-0", "again")(lambda env: "")
