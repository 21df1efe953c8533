"""Bad user input: ONE line on stderr starting with `fedprompt: `, exit status 2, no traceback,
and nothing under --output that looks like a result.

In-process through `fedprompt.cli.main` (fast); one subprocess test checks the real entry point.
Cases that fail before a model loads take milliseconds; the two that need the backbone use
minilm-l6 on a 40-row CSV (a few seconds).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedprompt.cli import main
from tests.files import write_csv

REPO = Path(__file__).resolve().parents[1]


def rows(n: int = 40, labels: tuple[str, ...] = ("a", "b")) -> list[tuple]:
    return [(f"example number {i} about {labels[i % len(labels)]}", labels[i % len(labels)]) for i in range(n)]


@pytest.fixture
def small_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "small.csv", rows())


def file_args(path: Path | str) -> list[str]:
    return ["--set", "data.dataset=file", "--set", f"data.path={path}"]


# Keeps any run that wrongly gets past its check short: 1 step, a tiny eval.
CHEAP = ["--set", "train.local_steps=1", "--set", "train.eval_every=0", "--set", "model.max_length=16", "--set", "output.plots=false"]


def user_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; assert exit 2 and exactly one `fedprompt: ` line on stderr containing every
    needle. Returns that line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("fedprompt: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


def assert_no_result(out: Path) -> None:
    assert not list(out.rglob("metrics.jsonl")), f"a failed start left a result under {out}"
    assert not list(out.rglob("config.yaml")), f"a failed start left a result under {out}"


# ---- Config errors (before anything is imported beyond the config) ----


def test_unknown_config_key(capsys, tmp_path):
    out = tmp_path / "run"
    user_error(capsys, ["train", "--set", "train.steps=5", "--output", str(out)], "train.steps", "unknown key", "local_steps")
    assert not out.exists()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  local_steps: 5\n  lr_rate: 0.1\n", encoding="utf-8")
    user_error(capsys, ["train", "--config", str(cfg), "--output", str(out)], "train.lr_rate", "allowed keys")
    assert not out.exists()


def test_wrong_type(capsys, tmp_path):
    user_error(capsys, ["train", "--set", "train.local_steps=abc", "--output", str(tmp_path / "run")], "train.local_steps", "'abc'", "an integer")
    assert not (tmp_path / "run").exists()


def test_wrong_literal_lists_allowed(capsys, tmp_path):
    user_error(capsys, ["eval", "--adapter", str(tmp_path), "--set", "model.quantization=3bit"], "model.quantization", "'3bit'", "'none', '8bit', '4bit'")


def test_bad_set_syntax(capsys):
    user_error(capsys, ["train", "--set", "train.local_steps"], "train.local_steps", "key.path=value")


def test_validate_bad_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model:\n  name: \xff\n")
    user_error(capsys, ["validate", str(bad)], "bad.yaml", "UTF-8")
    user_error(capsys, ["validate", str(tmp_path / "missing.yaml")], "missing.yaml", "does not exist")


# ---- Data errors (before any model loads) ----


def test_missing_data_file(capsys, tmp_path):
    out = tmp_path / "run"
    user_error(capsys, ["train", *file_args("/nonexistent.csv"), "--output", str(out)], "/nonexistent.csv", "does not exist")
    assert not out.exists()


def test_empty_data_file(capsys, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    out = tmp_path / "run"
    user_error(capsys, ["train", *file_args(empty), "--output", str(out)], "empty.csv", "empty")
    assert not out.exists()


def test_csv_without_configured_columns(capsys, tmp_path):
    f = write_csv(tmp_path / "cols.csv", rows(), header=("sentence", "category"))
    out = tmp_path / "run"
    user_error(capsys, ["train", *file_args(f), "--output", str(out)], "cols.csv", "'text'", "'label'", "sentence, category")
    assert not out.exists()
    # an explicit task names the one missing column and the setting to change
    user_error(
        capsys,
        ["train", *file_args(f), "--set", "data.task=classification", "--set", "data.label_column=category", "--output", str(out)],
        "no column 'text'",
        "data.text_column",
        "sentence, category",
    )
    assert not out.exists()


def test_label_outside_label_set(capsys, tmp_path):
    f = write_csv(tmp_path / "abc.csv", rows(labels=("a", "b", "c")))
    out = tmp_path / "run"
    user_error(capsys, ["train", *file_args(f), "--set", "data.labels=[a,b]", "--output", str(out)], "abc.csv", "label 'c'", "data.labels", "a, b")
    assert not out.exists()


def test_undecodable_text(capsys, tmp_path):
    f = write_csv(tmp_path / "latin1.csv", rows())
    f.write_bytes(f.read_bytes() + b"caf\xe9 au lait,a\n")
    out = tmp_path / "run"
    user_error(capsys, ["train", *file_args(f), "--output", str(out)], "latin1.csv", "not valid UTF-8", "0xe9", "line 42")
    assert not out.exists()


# ---- Model errors (after the data, before or at the backbone) ----


def test_unknown_model_name(capsys, tmp_path, small_csv):
    out = tmp_path / "run"
    user_error(
        capsys, ["train", *file_args(small_csv), "--set", "model.name=no-such-model", "--output", str(out)], "model.name", "'no-such-model'", "minilm-l6"
    )
    assert not out.exists()


def test_4bit_without_bitsandbytes(capsys, tmp_path, small_csv, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    out = tmp_path / "run"
    user_error(
        capsys,
        ["train", *file_args(small_csv), *CHEAP, "--set", "model.quantization=4bit", "--output", str(out)],
        "model.quantization",
        "'4bit'",
        "bitsandbytes",
        "model.quantization=none",
    )
    assert not out.exists()


def test_eval_adapter_folder_without_weights(capsys, tmp_path, small_csv):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    user_error(capsys, ["eval", "--adapter", str(adapter), *file_args(small_csv), *CHEAP], str(adapter), "adapter_model.safetensors")


def test_train_into_non_empty_output(capsys, tmp_path, small_csv):
    out = tmp_path / "previous-run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n", encoding="utf-8")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    user_error(capsys, ["train", *file_args(small_csv), *CHEAP, "--output", str(out)], str(out), "not empty", "--overwrite")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]
    assert_no_result(out)


# ---- The real entry point ----


def test_subprocess_one_line_no_traceback(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  local_stepz: 5\n", encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "fedprompt", "train", "--config", str(cfg), "--output", str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fedprompt: ") and "train.local_stepz" in lines[0]
    assert not (tmp_path / "run").exists()


def test_overwrite_refuses_a_folder_that_is_not_a_run(capsys, tmp_path, small_csv):
    """--overwrite deletes only previous run directories: never a folder of other files."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    user_error(capsys, ["train", "--output", str(precious), "--overwrite", *file_args(small_csv), *CHEAP], "not a fedprompt run directory")
    assert (precious / "thesis.tex").read_text() == "do not delete"


def test_output_that_is_a_file(capsys, tmp_path, small_csv):
    f = tmp_path / "out.txt"
    f.write_text("x")
    user_error(capsys, ["train", "--output", str(f), *file_args(small_csv), *CHEAP], "is a file")


def test_sequence_longer_than_the_backbone_positions(capsys, tmp_path, small_csv):
    user_error(
        capsys,
        ["train", "--output", str(tmp_path / "o"), *file_args(small_csv), "--set", "model.max_length=510", "--set", "train.local_steps=1"],
        "exceeds the backbone's 512 positions",
    )
    assert not (tmp_path / "o").exists()


def test_validate_takes_config_flag_and_scientific_floats(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\nprivacy:\n  delta: 1e-5\n")
    assert main(["validate", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0003" in out and "delta: 1.0e-05" in out
