"""Load: 200 virtual clients on the real MiniLM, 10% sampled per round, on one worker; the
memory of the whole process tree after round 3 is within 10% of that after round 1 (a 4th
round runs so that round 3's figure is not taken while the run shuts down)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import TINY, metrics_rows, set_args, stop_all

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _tree_pss(root: psutil.Process) -> int:
    """Bytes of memory the process tree holds, shared pages split among their sharers (PSS):
    a sum of RSS would count the backbone's shared pages once per process."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def test_200_virtual_clients_10_percent_per_round_memory_flat(tmp_path):
    out = tmp_path / "run"
    sets = [
        *TINY,
        "data.max_examples=0",
        "federation.num_clients=200",
        "federation.fraction_fit=0.1",
        "federation.fraction_evaluate=0",
        "federation.rounds=4",
        "federation.local_steps=2",  # the config's 10 steps x 20 clients cost 30 s a round; memory is what is measured
        "federation.min_clients=20",
        "data.partition=iid",
        "federation.engine=flower",  # Ray workers serving 200 virtual clients: what this test watches
    ]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    with open(tmp_path / "sim.log", "wb") as log:
        p = subprocess.Popen(
            [sys.executable, "-m", "fedprompt", "simulate", "--config", str(ROOT / "configs/bbc-minilm-prompt.yaml"), *set_args(sets), "--output", str(out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
    proc, mem, peak = psutil.Process(p.pid), {}, 0
    try:
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < 1500:
            peak = max(peak, _tree_pss(proc))
            for r in metrics_rows(out):
                if r["round"] not in mem:
                    mem[r["round"]] = _tree_pss(proc)  # just after the round's row: the same moment of each round
            time.sleep(0.5)
        assert p.wait(timeout=5) == 0, (tmp_path / "sim.log").read_text()[-3000:]
    finally:
        stop_all([p])
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["clients"] == 20 for r in rows[1:])
    print(f"\nPSS after rounds 1..3: {[round(mem[r] / 2**20) for r in (1, 2, 3)]} MiB, peak {peak / 2**20:.0f} MiB")
    assert mem[3] <= 1.1 * mem[1], {k: v / 2**20 for k, v in mem.items()}
    assert peak < 12 * 2**30  # half of a 24 GB CI machine
