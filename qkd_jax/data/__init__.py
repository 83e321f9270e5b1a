"""Data: tfds data sources (ArrayRecord, no TensorFlow), the bundled digits, grain pipelines."""

from qkd_jax.data.augment import AUGMENTS
from qkd_jax.data.digits import prepare_digits
from qkd_jax.data.info import DATASETS, DatasetInfo, dataset_info, resolve_data_dir
from qkd_jax.data.pipeline import (
    make_eval_loader,
    make_train_loader,
    num_eval_batches,
    num_train_batches,
)
from qkd_jax.data.sharding import process_shard
from qkd_jax.data.sources import (
    ENCODED,
    DatasetNotPreparedError,
    get_source,
    preparation_hint,
)

__all__ = [
    "AUGMENTS", "DATASETS", "ENCODED", "DatasetInfo", "DatasetNotPreparedError", "dataset_info",
    "get_source", "make_eval_loader", "make_train_loader", "num_eval_batches",
    "num_train_batches", "preparation_hint", "prepare_digits", "process_shard",
    "resolve_data_dir",
]
