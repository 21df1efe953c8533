"""A server SIGKILLed at any moment — mid-aggregation, mid-checkpoint-write, between the
checkpoint's renames, between checkpoint and metrics row, or at a random time — resumes from
the last complete checkpoint and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedprompt.report import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # real server processes, killed and restarted


def _server(out: Path, point: str = "none", rnd: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.faultserver", str(out), point, str(rnd)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(out: Path, point: str = "none", rnd: int = 0) -> tuple[int, str]:
    p = _server(out, point, rnd)
    log, _ = p.communicate(timeout=300)
    return p.returncode, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("reference")
    rc, log = _finish(out)
    assert rc == 0, log
    return read_jsonl(out / "metrics.jsonl")


def _same_run(out: Path, reference: list[dict]) -> None:
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # every round once
    assert [r["digest"] for r in rows[1:]] == [r["digest"] for r in reference[1:]]
    assert rows[-1]["accuracy"] == reference[-1]["accuracy"]
    assert (out / "summary.json").is_file()


def test_sigkill_at_each_fault_point_then_restart_resumes_exactly(tmp_path, reference):
    """One run killed four times, at a different point of a different round each time."""
    # resumed_after: where this start resumes, i.e. the newest complete checkpoint the previous
    # death left (a half-written one is never used; a rename cut short leaves the previous one).
    for rnd, point, resumed_after in [(1, "aggregate", None), (2, "checkpoint-write", 0), (3, "checkpoint-rename", 1), (4, "metrics-append", 2)]:
        rc, log = _finish(tmp_path, point, rnd)
        assert rc == -signal.SIGKILL, log
        if resumed_after is not None:  # the newest complete checkpoint is the one used
            assert f"resuming after round {resumed_after} of 4" in log, log
        assert max(r["round"] for r in read_jsonl(tmp_path / "metrics.jsonl")) < rnd, point
    rc, log = _finish(tmp_path)
    assert rc == 0, log
    assert "resuming after round 4 of 4" in log  # metrics-append died after round 4's checkpoint
    _same_run(tmp_path, reference)


def test_sigkill_at_random_moments_then_restart_resumes_exactly(tmp_path, reference):
    rng = random.Random(20261123)
    kills = 0
    done = 0  # rounds completed when the last kill came
    for _ in range(3):
        before = len(read_jsonl(tmp_path / "metrics.jsonl")) if (tmp_path / "metrics.jsonl").exists() else 0
        p = _server(tmp_path)
        # Once this process has written two rows of its own (it is in the round loop and a
        # round's length is known), at a random moment within about one more round: on a slow
        # machine or a fast one, the kill lands mid-run (a fixed delay outlived the whole run
        # on an idle CI machine).
        t0, seen = time.monotonic(), []
        while p.poll() is None and time.monotonic() - t0 < 300 and len(seen) < 2:
            try:
                rows = read_jsonl(tmp_path / "metrics.jsonl") if (tmp_path / "metrics.jsonl").exists() else []
            except ValueError:  # a row being written: read again
                rows = []
            seen += [time.monotonic()] * max(0, len(rows) - before - len(seen))
            time.sleep(0.02)
        if p.poll() is not None:
            break
        assert len(seen) >= 2, "the server made no progress in 300 s"
        time.sleep(rng.uniform(0.0, seen[1] - seen[0]))
        if p.poll() is not None:
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        done = len(read_jsonl(tmp_path / "metrics.jsonl")) - 1
    rc, log = _finish(tmp_path)
    assert rc == 0, log
    assert kills >= 1 and done >= 1, (kills, done)  # it died after real progress, and resumed from it
    assert "resuming after round " in log
    _same_run(tmp_path, reference)
