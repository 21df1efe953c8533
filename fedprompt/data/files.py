"""User data files (CSV, JSON Lines, JSON, Parquet), loaded as hostile input: every problem is one DataError line naming the file, row or column and the fix."""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedprompt.config import DataConfig
from fedprompt.data.common import DataError, _chain, _datasets, _error_line, _listed

if TYPE_CHECKING:
    import datasets


_FILE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _bad_text_byte(path: Path) -> tuple[int, int, int] | None:
    """(byte offset, line number, byte) of the first invalid UTF-8 byte or NUL byte, or None;
    streamed. A NUL is valid UTF-8 but no text file has one: pandas and arrow then disagree on
    the columns (or it is UTF-16 without a BOM), so the file is refused with this position."""
    dec = codecs.getincrementaldecoder("utf-8")()
    pos, lines = 0, 0
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(dec.getstate()[0])  # bytes held back from the previous chunk
            nul = chunk.find(b"\0")
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                off = pos - pending + e.start
                if nul < 0 or off < pos + nul:
                    line = lines + chunk[: max(0, off - pos)].count(b"\n") + 1
                    return off, line, e.object[e.start]
            if nul >= 0:
                return pos + nul, lines + chunk[:nul].count(b"\n") + 1, 0
            if not chunk:
                return None
            pos += len(chunk)
            lines += chunk.count(b"\n")


MAX_JSON_DEPTH = 100  # far beyond any real record; pyarrow's JSON reader crashes (SIGSEGV) near 10,000


_JSON_STRING = re.compile(rb'"[^"\\\n]*(?:\\.[^"\\\n]*)*"')  # JSON strings hold no raw newline


def _json_too_deep(path: Path) -> int | None:
    """First line whose JSON nesting exceeds MAX_JSON_DEPTH, or None. Line by line, as pyarrow
    parses .jsonl/.json files (one document per line); brackets inside strings do not count."""
    import numpy as np

    step = np.zeros(256, np.int64)
    step[list(b"[{")], step[list(b"]}")] = 1, -1
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if line.count(b"[") + line.count(b"{") <= MAX_JSON_DEPTH:  # cannot nest deeper: skip fast
                continue
            walk = np.cumsum(step[np.frombuffer(_JSON_STRING.sub(b"", line), np.uint8)])
            walk -= np.minimum(np.minimum.accumulate(walk), 0)  # a stray closer stops at depth 0
            if walk.size and walk.max() > MAX_JSON_DEPTH:
                return n
    return None


_JSON_KEY = re.compile(_JSON_STRING.pattern + rb"(\s*:)?")  # a string, and the colon that makes it a key


def _json_slash_key(path: Path) -> str | None:
    """The first object key with a "/" in it, or None; strings matched left to right per line."""
    with path.open("rb") as f:
        for line in f:
            if b"/" not in line and b"\\" not in line:  # "\/" and "\u002f" are slashes too
                continue
            for m in _JSON_KEY.finditer(line):
                if m.group(1) and (b"/" in m.group() or b"\\" in m.group()):
                    try:
                        key = json.loads(m.group()[: m.start(1) - m.start()])
                    except ValueError:
                        continue
                    if "/" in key:
                        return key
    return None


def _parquet_check(path: Path, name: str) -> None:
    """Refuse what the parquet footer already shows wrong (no rows, duplicate column names),
    which `datasets` reports only as an arrow internal ("BatchSize must be greater than 0")."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        names = meta.schema.to_arrow_schema().names
    except Exception:  # corrupt or not parquet: load_dataset's error says which
        return
    if meta.num_rows == 0:
        raise DataError(f"data file {name!r} has no rows; add examples to it")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise DataError(f"data file {name!r} has duplicate column names ({', '.join(map(repr, dup))}); give every column a distinct name")


def _load_file(cfg: DataConfig) -> "datasets.Dataset":
    try:
        path = Path(cfg.path).expanduser()
    except RuntimeError:  # "~user/..." of an unknown user, or no home directory
        raise DataError(f"data file {cfg.path!r}: cannot expand '~' (unknown user or no home directory); give the full path") from None
    name = str(path)
    if not path.is_file():
        if path.exists():
            raise DataError(f"data file {name!r} is not a regular file (a directory?); set data.path to a .csv, .jsonl, .json or .parquet file")
        raise DataError(f"data file {name!r} does not exist; set data.path to an existing .csv, .jsonl, .json or .parquet file")
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"data file {name!r} has unknown extension {path.suffix!r}; use .csv, .jsonl, .json or .parquet")
    try:
        if path.stat().st_size == 0:
            raise DataError(f"data file {name!r} is empty (0 bytes); give a file with a header/records and at least 2 examples per class")
        if builder != "parquet":
            bad = _bad_text_byte(path)
            if bad is not None and bad[2] == 0:
                raise DataError(
                    f"data file {name!r} has a NUL byte (offset {bad[0]}, line {bad[1]}), which no text file has; "
                    "if it is UTF-16, re-encode it as UTF-8 (iconv -f utf-16 -t utf-8), else remove the NUL bytes"
                )
            if bad is not None:
                off, line, byte = bad
                raise DataError(
                    f"data file {name!r} is not valid UTF-8 (byte 0x{byte:02x} at offset {off}, line {line}); "
                    "re-encode it as UTF-8, e.g. iconv -f cp1252 -t utf-8"
                )
        if builder == "json":
            deep = _json_too_deep(path)
            if deep is not None:
                raise DataError(
                    f"data file {name!r}: line {deep} nests JSON values more than {MAX_JSON_DEPTH} levels deep; "
                    "text, label, prompt and response values must be strings or numbers"
                )
        if builder == "parquet":
            _parquet_check(path, name)
    except OSError as e:
        raise DataError(f"data file {name!r} cannot be read: {e.strerror or e}") from None
    ds_mod = _datasets()
    cache = Path(os.environ.get("FEDPROMPT_CACHE", "~/.cache/fedprompt")).expanduser() / "datasets"
    log = logging.getLogger("datasets")
    level = log.level
    log.setLevel(logging.CRITICAL)  # it logs parse failures before raising; our DataError says it once

    def load(**options: Any) -> "datasets.Dataset":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds_mod.load_dataset(builder, data_files=str(path.resolve()), split="train", cache_dir=str(cache), **options)

    try:
        if builder != "json":
            ds = load()
        else:
            # A column of mixed types (1 and "a") is stored as JSON text by datasets, which
            # re-encodes the column a parse error names by splitting its path at "/": a key with a
            # "/" is then never found and it retries forever. So: a plain parse first, and the
            # mixed-type mode only when no key has a "/".
            try:
                ds = load(on_mixed_types=None)
            except Exception as e:
                if not any(") changed from " in str(x) for x in _chain(e)):
                    raise
                key = _json_slash_key(path)
                if key is not None:
                    raise DataError(
                        f"data file {name!r}: key {key!r} has values of mixed types and a '/' in its name, "
                        "which the JSON loader cannot handle; rename the key or give its values one type"
                    ) from None
                ds = load(on_mixed_types="use_json")
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (ArrowInvalid, ParserError, ValueError...)
        if "corresponds to no data" in str(e):
            raise DataError(f"data file {name!r} has no rows; add examples to it") from None
        raise DataError(f"data file {name!r} could not be parsed as {builder}: {_error_line(e)}") from None
    finally:
        log.setLevel(level)
    if len(ds) == 0:
        raise DataError(f"data file {name!r} has no rows; add examples to it")
    return ds


def _column(ds: "datasets.Dataset", cfg: DataConfig, kind: str) -> list[Any]:
    """Values of the column configured as data.<kind>_column; None/blank values are errors."""
    col = getattr(cfg, f"{kind}_column")
    if col not in ds.column_names:
        raise DataError(f"data file {cfg.path!r} has no column {col!r} (set data.{kind}_column); columns found: {_listed(ds.column_names)}")
    values = list(ds[col])
    for i, v in enumerate(values):  # rows count from 1, header excluded
        if isinstance(v, (dict, list, bytes)):  # str() would make "{'a': 1}" or "b'..'" a text or a class
            what = "a mapping" if isinstance(v, dict) else "a list" if isinstance(v, list) else "binary data"
            raise DataError(
                f"data file {cfg.path!r}: row {i + 1} has {what} in column {col!r}; "
                f"data.{kind}_column must hold strings or numbers (pick another column or flatten it)"
            )
        # NaN: a missing number (JSON NaN, or a gap pandas filled in a numeric CSV column)
        if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip():
            raise DataError(f"data file {cfg.path!r}: row {i + 1} has an empty {col!r} value; fill it in or remove the row")
    return values
