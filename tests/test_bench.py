"""The benchmark harness (benchmarks/bench.py) assembles RESULTS.md from what the sections
measured, says which targets were met or missed, and keeps a failed section visible; and
README's performance table quotes RESULTS.md exactly."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import bench

ROOT = Path(__file__).resolve().parent.parent


def _section(out: Path, name: str, summary: dict | None, rc: int = 0) -> None:
    d = out / name
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"wall_s": 12.0, "date": "2026-12-01 08:00 UTC", "mode": "quick", "rc": rc}))
    if summary is not None:
        (d / "result.json").write_text(json.dumps({"title": f"title of {name}", "markdown": f"body of {name}", "summary": summary, "plots": []}))


def test_report_gives_each_target_its_verdict_and_keeps_failures_visible(tmp_path):
    out, md = tmp_path / "runs", tmp_path / "doc" / "RESULTS.md"
    md.parent.mkdir()
    _section(out, "engine", {"ratio": 1.02})
    _section(out, "template", {"ratio_per_round": 2.5})
    _section(out, "wire", None, rc=1)
    bench.report(out, md, total_s=60)
    text = md.read_text()
    assert "| DeepSpeed engine step / plain torch step | 1.020 | <= 1.05 | met |" in text
    assert "| template pattern s per round / fedprompt s per round | 2.500 | >= 3.0 | **missed** |" in text
    assert "| bytes per client-round / raw payload bytes | - | <= 1.1 | not measured |" in text
    assert "FAILED (exit status 1)" in text and "body of engine" in text and "title of template" in text
    assert "Versions: torch " in text
    assert "memory" not in text.split("## Targets")[1].split("##")[0]  # a section never run has no row


def test_readme_performance_table_is_quoted_from_results_md():
    """Every row of README's benchmark-targets table is a row of benchmarks/RESULTS.md."""
    readme = (ROOT / "README.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    block = readme.split("<!-- bench-targets -->")[1].split("<!-- /bench-targets -->")[0]
    rows = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| measurement")]
    assert rows, "README has no benchmark-targets table"
    missing = [r for r in rows if r not in results.splitlines()]
    assert not missing, f"README rows not in benchmarks/RESULTS.md (rerun `make bench` and copy its Targets table): {missing}"
    assert re.search(r"Generated \d{4}-\d\d-\d\d", results)


def test_rerunning_one_section_keeps_the_others_as_they_were(tmp_path):
    """`bench.py --only X` rewrites X's section and target rows; every other section keeps its
    earlier text (and date) and its rows."""
    md = tmp_path / "RESULTS.md"
    first = tmp_path / "first"
    _section(first, "engine", {"ratio": 1.02})
    _section(first, "wire", {"max_up_over_raw": 1.05})
    bench.report(first, md, total_s=60)
    second = tmp_path / "second"
    _section(second, "wire", {"max_up_over_raw": 1.2})
    bench.report(second, md, total_s=10)
    text = md.read_text()
    assert "| DeepSpeed engine step / plain torch step | 1.020 | <= 1.05 | met |" in text  # kept
    assert "| bytes per client-round / raw payload bytes | 1.200 | <= 1.1 | **missed** |" in text  # rerun
    assert "1.050" not in text and text.count("body of engine") == 1 and text.count("body of wire") == 1
    assert text.index("title of engine") < text.index("title of wire")  # the order of SECTIONS
