"""Golden test: the exact payload manifest (tensor names, shapes, dtypes) of every shipped
config. A change here changes what crosses the wire; regenerate deliberately with
FEDPROMPT_REGEN_GOLDEN=1 pytest tests/test_golden_manifest.py and review the diff."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedprompt import payload
from fedprompt.config import load_config
from fedprompt.run import setup

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "manifests.json"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _manifest(path: Path) -> list:
    s = setup(load_config(path))
    return [[t.name, list(t.shape), t.dtype] for t in payload.manifest_of(s.model)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_manifest_matches_golden(path):
    got = _manifest(path)
    if os.environ.get("FEDPROMPT_REGEN_GOLDEN") == "1":
        data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
        data[path.stem] = got
        GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert path.stem in golden, f"no golden manifest for {path.name}; regenerate (see module docstring)"
    assert got == golden[path.stem]


def test_every_golden_entry_has_a_config():
    assert set(json.loads(GOLDEN.read_text())) == {p.stem for p in CONFIGS}
