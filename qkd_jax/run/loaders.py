"""The run's data loaders, read from its config and opened sources: training batches (sharded
per process, or whole for work every process repeats), eval batches, steps per epoch."""

from __future__ import annotations

from typing import Optional

import jax

from qkd_jax import data as qdata
from qkd_jax.run import build
from qkd_jax.run.context import RunContext


def _augment(ctx: RunContext) -> str:
    return ctx.config.dataset.augment or ctx.info.augment


def _image_size(ctx: RunContext) -> int:
    return build.input_shape(ctx.config)[0]


def train_loader(ctx: RunContext, batch_size: int, epochs: Optional[int], seed: int, labels: bool,
                 sharded: bool = True, with_index: bool = False):
    """Training batches; `sharded=False` gives every process the whole global batch (for work
    such as calibration and Hessian probes that every process repeats identically);
    `with_index` adds each example's row of the split as 'index' (CRD's memory banks)."""
    return qdata.make_train_loader(
        ctx.source(ctx.info.train_split),
        batch_size=batch_size,
        seed=seed,
        num_epochs=epochs,
        shard_index=jax.process_index() if sharded else 0,
        shard_count=jax.process_count() if sharded else 1,
        augment=_augment(ctx),
        image_size=_image_size(ctx),
        mean=ctx.info.mean,
        std=ctx.info.std,
        drop_labels=not labels,
        with_index=with_index,
    )


def train_labels(ctx: RunContext):
    """The training split's labels in row order (int32), read once for criteria that sample by
    class (CRD); reads every record of the split."""
    import numpy as np

    source = ctx.source(ctx.info.train_split)
    return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int32)


def eval_batches(ctx: RunContext):
    return qdata.make_eval_loader(
        ctx.source(ctx.info.eval_split),
        batch_size=ctx.config.dataset.eval_batch_size,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        augment=_augment(ctx),
        image_size=_image_size(ctx),
        mean=ctx.info.mean,
        std=ctx.info.std,
    )


def steps_per_epoch(ctx: RunContext, batch_size: int) -> int:
    # The size of the train split on disk, not DatasetInfo.num_train: the loader's epochs are
    # len(source) examples long, and a prepared/mock split may differ from the nominal size.
    return max(1, qdata.num_train_batches(len(ctx.source(ctx.info.train_split)), batch_size, 1))


def check_batch(ctx: RunContext, batch_size: int, key: str) -> None:
    n = ctx.mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"config.{key}={batch_size} does not split over {n} devices; use a multiple of {n}."
        )
