"""A config's task data: the built-in corpora or a user file, cut into a stratified train/test split."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedprompt.config import DataConfig
from fedprompt.data.builtin import _bbc_raw, _tweets_raw
from fedprompt.data.common import DataError, TaskData, _cut, _datasets, _listed
from fedprompt.data.files import _column, _load_file

if TYPE_CHECKING:
    import datasets


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


@dataclass
class _Labelled:
    """A classification source's rows before the split: label names per row, and the label list
    (index = class id)."""

    name: str
    texts: list[str]
    raw_labels: list[str]
    labels: list[str]


def _builtin(cfg: DataConfig, texts: list[str], raw_labels: list[str]) -> _Labelled:
    name = cfg.dataset
    if cfg.task == "generation":
        raise DataError(f"data.task: the built-in {name!r} dataset is classification only; use data.task auto or classification")
    builtin = sorted(set(raw_labels))
    if cfg.labels:
        unknown = [lab for lab in cfg.labels if lab not in builtin]
        if unknown:
            raise DataError(f"data.labels: {', '.join(map(repr, unknown))} not in the {name} labels; allowed: {', '.join(builtin)}")
        keep = [i for i, lab in enumerate(raw_labels) if lab in cfg.labels]  # a subset filters rows
        texts, raw_labels = [texts[i] for i in keep], [raw_labels[i] for i in keep]
    return _Labelled(name, texts, raw_labels, list(cfg.labels) or builtin)


def _bbc(cfg: DataConfig, ds_mod: Any, rng: Any) -> _Labelled:
    texts, raw_labels = map(list, _bbc_raw())
    return _builtin(cfg, texts, raw_labels)


def _tweets(cfg: DataConfig, ds_mod: Any, rng: Any) -> _Labelled:
    rows = [r for r in _tweets_raw() if r[2] >= cfg.min_confidence]
    return _builtin(cfg, [r[0] for r in rows], [r[1] for r in rows])


def _file(cfg: DataConfig, ds_mod: Any, rng: Any) -> _Labelled | TaskData:
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
            raise DataError(
                f"data file {cfg.path!r}: row {i + 1} has label {_cut(repr(lab))}, not in data.labels ({', '.join(cfg.labels)}); fix the row or add the label"
            )
        raw_labels.append(lab)
    return _Labelled(name, texts, raw_labels, list(cfg.labels) or sorted(set(raw_labels)))


# data.dataset -> (config, the datasets module, rng) -> a classification source's rows, or a
# generation task's data (already split).
DATASETS = {"bbc": _bbc, "tweets": _tweets, "file": _file}


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load the configured dataset and split it deterministically (stratified for classification)."""
    import numpy as np

    ds_mod = _datasets()
    rng = np.random.default_rng(cfg.seed)
    if cfg.dataset not in DATASETS:
        raise DataError(f"data.dataset: {cfg.dataset!r} is not allowed; expected {', '.join(DATASETS)}")
    got = DATASETS[cfg.dataset](cfg, ds_mod, rng)
    if isinstance(got, TaskData):
        return got
    name, texts, raw_labels, labels = got.name, got.texts, got.raw_labels, got.labels

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
