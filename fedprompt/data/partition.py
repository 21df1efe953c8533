"""Partitions of a split among clients (iid, dirichlet, quantity), and rows appended to a split."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from fedprompt.config import DataConfig
from fedprompt.data.common import DataError, _datasets, _error_line

if TYPE_CHECKING:
    import datasets


def _lognormal_sizes(n: int, parts: int, sigma: float, seed: int) -> list[int]:
    """Partition sizes summing to n, proportional to log-normal(0, sigma) weights, each >= 1."""
    import numpy as np

    w = np.random.default_rng(seed).lognormal(0.0, sigma, parts)
    quota = w / w.sum() * (n - parts)
    sizes = np.floor(quota).astype(int)
    sizes[np.argsort(-(quota - sizes), kind="stable")[: n - parts - int(sizes.sum())]] += 1
    return [int(s) + 1 for s in sizes]  # SizePartitioner wants Python ints


def _dirichlet(ds: "datasets.Dataset", cfg: DataConfig, n: int) -> tuple[Any, "datasets.Dataset"]:
    from flwr_datasets.partitioner import DirichletPartitioner

    if "label" not in ds.column_names:
        raise DataError("data.partition: 'dirichlet' needs class labels, which a generation task has not; use iid or quantity")
    min_size = min(10, len(ds) // n // 2)
    return DirichletPartitioner(n, partition_by="label", alpha=cfg.alpha, seed=cfg.seed, min_partition_size=min_size), ds


def _iid(ds: "datasets.Dataset", cfg: DataConfig, n: int) -> tuple[Any, "datasets.Dataset"]:
    from flwr_datasets.partitioner import IidPartitioner

    # Iid and Size partitioners take contiguous slices: shuffle so order in `ds` does not leak in.
    return IidPartitioner(n), ds.shuffle(seed=cfg.seed, keep_in_memory=True)


def _quantity(ds: "datasets.Dataset", cfg: DataConfig, n: int) -> tuple[Any, "datasets.Dataset"]:
    from flwr_datasets.partitioner import SizePartitioner

    ds = ds.shuffle(seed=cfg.seed, keep_in_memory=True)
    return SizePartitioner(_lognormal_sizes(len(ds), n, cfg.quantity_sigma, cfg.seed)), ds


# data.partition -> (dataset, config, number of partitions) -> (flwr-datasets partitioner, the dataset it cuts)
PARTITIONERS = {"iid": _iid, "dirichlet": _dirichlet, "quantity": _quantity}


def partition(ds: "datasets.Dataset", cfg: DataConfig, num_partitions: int, partition_id: int) -> "datasets.Dataset":
    """Partition `partition_id` of `num_partitions` with flwr-datasets: iid (IidPartitioner),
    dirichlet (DirichletPartitioner on "label", cfg.alpha) or quantity (SizePartitioner with
    log-normal sizes of sigma cfg.quantity_sigma; flwr-datasets has no log-normal partitioner)."""
    if num_partitions < 1:
        raise DataError(f"num_partitions: {num_partitions} must be >= 1")
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition_id: {partition_id} is out of range; allowed 0..{num_partitions - 1}")
    if num_partitions > len(ds):
        raise DataError(f"{num_partitions} partitions for {len(ds)} examples; use at most {len(ds)} clients or more data (data.max_examples)")
    part, ds = PARTITIONERS[cfg.partition](ds, cfg, num_partitions)
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Dirichlet warns on each resampling attempt
            return part.load_partition(partition_id)
    except ValueError as e:
        raise DataError(
            f"could not make {num_partitions} {cfg.partition} partitions of {len(ds)} examples ({_error_line(e)}); raise data.alpha or use fewer clients"
        ) from None


def with_rows(ds: "datasets.Dataset", columns: dict[str, list]) -> "datasets.Dataset":
    """`ds` with rows appended at the end, given column by column (`columns` must name every
    column of `ds`: text + label for classification, prompt + response for generation)."""
    mod = _datasets()
    extra = mod.Dataset.from_dict({k: list(v) for k, v in columns.items()}, features=ds.features)
    return mod.concatenate_datasets([ds, extra])
