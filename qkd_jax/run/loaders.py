"""The run's data loaders, read from its config and opened sources: training batches (sharded
per process, or whole for work every process repeats), eval batches, steps per epoch.

With `config.data.jpeg` on a dataset stored as JPEG, images are decoded at the scale their crop
needs; the training loop and evaluation then take uint8 batches and normalise them on the
device with `preprocess(ctx)`, while calibration and Hessian probes keep float32 batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import jax

from qkd_jax import data as qdata
from qkd_jax.data import device_normalize
from qkd_jax.run import build
from qkd_jax.run.context import RunContext


def _augment(ctx: RunContext) -> str:
    return ctx.config.dataset.augment or ctx.info.augment


def _image_size(ctx: RunContext) -> int:
    return build.input_shape(ctx.config)[0]


def jpeg_path(ctx: RunContext) -> bool:
    """Whether the run decodes stored JPEGs directly (config.data.jpeg on an encoded dataset)."""
    return (bool(ctx.config.data.jpeg) and ctx.config.dataset.name in qdata.ENCODED
            and _augment(ctx) == "imagenet")


def preprocess(ctx: RunContext) -> Callable | None:
    """The device normalisation for the uint8 batches of `train_loader(..., uint8=True)` and
    `eval_batches`, or None when they are already normalised on the host."""
    if not jpeg_path(ctx):
        return None
    return device_normalize.normalizer(ctx.info.mean, ctx.info.std)


def train_loader(ctx: RunContext, batch_size: int, epochs: Optional[int], seed: int, labels: bool,
                 sharded: bool = True, uint8: bool = False, workers: bool = True, with_index: bool = False):
    """Training batches; `sharded=False` gives every process the whole global batch (for work
    such as calibration and Hessian probes that every process repeats identically). `uint8`:
    uint8 images when `preprocess(ctx)` is not None (the step normalises them). `workers=False`
    reads in threads whatever `data.num_workers` says (a few batches: no worker start-up).
    `with_index` adds each example's row of the split as 'index' (CRD's memory banks)."""
    jpeg = jpeg_path(ctx)
    return qdata.make_train_loader(
        ctx.source(ctx.info.train_split, encoded=jpeg),
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
        worker_count=ctx.config.data.num_workers if workers else 0,
        image_dtype="uint8" if uint8 and jpeg else "float32",
        jpeg=jpeg,
    )


def train_labels(ctx: RunContext):
    """The training split's labels in row order (int32), read once for criteria that sample by
    class (CRD); reads every record of the split."""
    import numpy as np

    source = ctx.source(ctx.info.train_split)
    return np.asarray([int(source[i]["label"]) for i in range(len(source))], np.int32)


def eval_batches(ctx: RunContext):
    """Evaluation batches: uint8 images when `preprocess(ctx)` is not None."""
    jpeg = jpeg_path(ctx)
    return qdata.make_eval_loader(
        ctx.source(ctx.info.eval_split, encoded=jpeg),
        batch_size=ctx.config.dataset.eval_batch_size,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        augment=_augment(ctx),
        image_size=_image_size(ctx),
        mean=ctx.info.mean,
        std=ctx.info.std,
        worker_count=ctx.config.data.num_workers,
        image_dtype="uint8" if jpeg else "float32",
        jpeg=jpeg,
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
