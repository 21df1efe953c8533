"""The run directory (`--output`): what may be written where, and the run's own error.

Light on purpose (no torch): `fedprompt server`, which only aggregates tiny tensors, uses it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedprompt.errors import UserError


class RunError(UserError, ValueError):
    """A user-facing problem with the run itself (e.g. output directory already used)."""


RUN_MARKERS = ("config.yaml", "metrics.jsonl")


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a non-empty folder (without --overwrite), or, even with
    --overwrite, a folder that is not a previous run or that holds the working directory."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {str(out)!r} is a file; pass a folder path")
    # A fresh ext4 volume (a Kubernetes PVC) holds lost+found: that is still an empty run dir.
    if not (out.is_dir() and any(p.name != "lost+found" for p in out.iterdir())):
        return
    if not overwrite:
        raise RunError(f"output directory {str(out)!r} is not empty; pass a new --output, or --overwrite to replace it")
    if not any((out / m).is_file() for m in RUN_MARKERS):
        raise RunError(f"--overwrite refused: {str(out)!r} is not a fedprompt run directory (no config.yaml or metrics.jsonl); pick another --output")
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise RunError(f"--overwrite refused: {str(out)!r} contains the current directory")


def prepare_output(out: Path, overwrite: bool) -> None:
    check_output(out, overwrite)
    if out.is_dir() and any(p.name != "lost+found" for p in out.iterdir()):
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--output {str(out)!r} cannot be created: {e.strerror}") from None
