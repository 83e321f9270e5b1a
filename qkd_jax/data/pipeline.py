"""grain pipelines: deterministic, sharded, resumable training and evaluation batches.

Both loaders are `BatchLoader`s: a `grain.MapDataset` of whole local batches read from batch k
on by a `grain.IterDataset` (threads, or worker processes), so an iterator's state is the index
of its next batch: `state = it.get_state()` and, in a fresh
process, `it = iter(make_train_loader(<same arguments>)); it.set_state(state)` continue with
exactly the batches the first iterator would have produced.

Training stream: epoch e visits the examples in the order of `grain`'s index shuffle seeded with
`seed + e`; epochs are concatenated and cut into global batches of `batch_size` (a batch may
straddle two epochs; `num_epochs` epochs give floor(num_epochs * n / batch_size) batches, the
rest is dropped). Augmentation randomness depends only on (seed, epoch, example index), so it
is the same whether the example is read by one process or by several, before or after a resume.
Sharding: see `sharding.py`. Batches are dicts of NumPy arrays: 'image' float32 NHWC
normalised (or uint8 NHWC with `image_dtype='uint8'`, normalised later on the accelerator by
`device_normalize.normalize`), 'label' int32 (omitted with `drop_labels`), for training with
`with_index` also 'index' int32 (the example's row in `source`, what CRD's memory banks are keyed
by), and for evaluation 'mask' (bool, False on padding).

`jpeg=True` (ImageNet sources opened with `get_source(..., encoded=True)`, records holding the
JPEG bytes) decodes each image at the smallest DCT scale its crop needs (`jpeg_augment.py`).

The state is `{'next_index': k}` whatever `worker_count` is, so a run may resume with a
different number of worker processes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from qkd_jax.data import augment as aug
from qkd_jax.data import jpeg_augment
from qkd_jax.data.sharding import check_shard, global_position, local_batch_size

Batch = dict[str, np.ndarray]


def num_train_batches(num_examples: int, batch_size: int, num_epochs: int) -> int:
    """Global batches in `num_epochs` epochs of the training stream."""
    return num_epochs * num_examples // batch_size


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Global evaluation batches (the last one padded)."""
    return math.ceil(num_examples / batch_size)


IMAGE_DTYPES = ("float32", "uint8")


def _read(source: Sequence[dict[str, Any]], index: int) -> tuple[np.ndarray | bytes, int]:
    record = source[index]
    image = record["image"]
    return (image if isinstance(image, bytes) else np.asarray(image)), int(record["label"])


def _finish_image(image: np.ndarray, mean, std) -> np.ndarray:
    """float32 normalised, or the uint8 geometry itself when `mean` is None (device normalisation)."""
    return np.ascontiguousarray(image) if mean is None else aug.normalize(image, mean, std)


class _TrainExample:
    """Local stream position -> augmented, normalised example (picklable for worker processes)."""

    def __init__(self, source, *, seed, local_batch, global_batch, shard_index, transform,
                 mean, std, drop_labels, with_index=False):
        self.source, self.seed, self.transform = source, seed, transform
        self.with_index = with_index
        self.local_batch, self.global_batch, self.shard_index = local_batch, global_batch, shard_index
        self.mean, self.std, self.drop_labels = mean, std, drop_labels
        self.n = len(source)
        self.order = grain.MapDataset.range(self.n).shuffle(seed=seed)

    def __call__(self, k: int) -> Batch:
        g = global_position(k, local_batch=self.local_batch, global_batch=self.global_batch,
                            shard_index=self.shard_index)
        epoch = g // self.n
        index = int(self.order[g]) % self.n
        image, label = _read(self.source, index)
        rng = np.random.default_rng([self.seed, epoch, index])
        out = {"image": _finish_image(self.transform(image, rng), self.mean, self.std)}
        if not self.drop_labels:
            out["label"] = np.int32(label)
        if self.with_index:
            out["index"] = np.int32(index)
        return out


class _EvalExample:
    """Local stream position -> normalised example with mask; positions past the end are padding."""

    def __init__(self, source, *, local_batch, global_batch, shard_index, transform, mean, std):
        self.source, self.transform, self.mean, self.std = source, transform, mean, std
        self.local_batch, self.global_batch, self.shard_index = local_batch, global_batch, shard_index
        self.n = len(source)

    def _example(self, index: int) -> Batch:
        image, label = _read(self.source, index)
        image = _finish_image(self.transform(image), self.mean, self.std)
        return {"image": image, "label": np.int32(label), "mask": np.bool_(True)}

    def __call__(self, k: int) -> Batch:
        g = global_position(k, local_batch=self.local_batch, global_batch=self.global_batch,
                            shard_index=self.shard_index)
        if g < self.n:
            return self._example(g)
        first = self._example(0)
        return {"image": np.zeros_like(first["image"]), "label": np.int32(0),
                "mask": np.bool_(False)}


class BatchIterator:
    """Iterator over a `BatchLoader`'s batches whose state is the index of the next batch."""

    def __init__(self, loader: BatchLoader):
        self._loader, self._next, self._it = loader, 0, None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self._loader.iter_dataset(self._next))
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues at batch `state['next_index']` (a state from any worker count)."""
        if "next_index" not in state:
            raise ValueError(f"not a loader state (no 'next_index'): {sorted(state)}; "
                             f"restore a state saved by BatchIterator.get_state")
        self.close()
        self._next = int(state["next_index"])

    def close(self) -> None:
        """Stops the worker processes (if any); iterating again restarts them."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


class BatchLoader:
    """Batches k = 0, 1, ... of a `MapDataset` of examples, read by threads or worker processes."""

    def __init__(self, examples: grain.MapDataset, local_batch: int, num_threads: int,
                 prefetch: int, worker_count: int):
        if worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {worker_count}")
        self.batches = examples.batch(local_batch, drop_remainder=True)
        self.num_threads, self.prefetch, self.worker_count = num_threads, prefetch, worker_count

    def __len__(self) -> int:
        return len(self.batches)

    def iter_dataset(self, start: int = 0) -> grain.IterDataset:
        """The grain pipeline from batch `start` on."""
        it = self.batches[start:].to_iter_dataset(grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=self.prefetch))
        if self.worker_count > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # outside absl.app.run (tests, notebooks): grain reads flags
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return it

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self)


def _finish(ds: grain.MapDataset, local_batch: int, num_threads: int, prefetch: int,
            worker_count: int) -> BatchLoader:
    return BatchLoader(ds, local_batch, num_threads, prefetch, worker_count)


def _norm(image_dtype: str, mean: Sequence[float], std: Sequence[float]):
    if image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}")
    return (None, None) if image_dtype == "uint8" else (tuple(mean), tuple(std))


def _check_jpeg(jpeg: bool, augment: str) -> None:
    if jpeg and augment != "imagenet":
        raise ValueError(f"jpeg=True decodes ImageNet-style crops only; augment is {augment!r} "
                         f"(use augment='imagenet' or jpeg=False)")


def make_train_loader(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    augment: str = "none",
    image_size: int | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    drop_labels: bool = False,
    with_index: bool = False,
    num_threads: int = 4,
    prefetch: int = 4,
    worker_count: int = 0,
    image_dtype: str = "float32",
    jpeg: bool = False,
) -> BatchLoader:
    """Shuffled, augmented training batches of `batch_size // shard_count` examples for this shard.

    `batch_size` is global; `num_epochs=None` repeats forever; `augment` in `augment.AUGMENTS`;
    `image_size` the output side for 'cifar' crops / 'imagenet' resized crops (default: input
    size / 224); `mean`/`std` on the 0..1 scale; `seed` in [0, 2**32); `with_index` adds each
    example's source row as 'index' (int32; CRD needs it). `worker_count > 0` adds
    grain worker processes: the same batches and the same iterator state (outside
    `absl.app.run` this marks absl flags parsed). `image_dtype='uint8'` skips the normalisation
    (`mean`/`std` unused); `jpeg=True` reads records holding JPEG bytes (module docstring).
    """
    check_shard(shard_index, shard_count)
    local = local_batch_size(batch_size, shard_count)
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is None:
        length = sys.maxsize // batch_size * local
    else:
        length = num_train_batches(len(source), batch_size, num_epochs) * local
    _check_jpeg(jpeg, augment)
    transform = (jpeg_augment.train_transform(image_size) if jpeg
                 else aug.train_transform(augment, image_size))
    mean_, std_ = _norm(image_dtype, mean, std)
    example = _TrainExample(source, seed=seed, local_batch=local, global_batch=batch_size,
                            shard_index=shard_index, transform=transform,
                            mean=mean_, std=std_, drop_labels=drop_labels, with_index=with_index)
    ds = grain.MapDataset.range(length).map(example)
    return _finish(ds, local, num_threads, prefetch, worker_count)


def make_eval_loader(
    source: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    augment: str = "none",
    image_size: int | None = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    num_threads: int = 4,
    prefetch: int = 4,
    worker_count: int = 0,
    image_dtype: str = "float32",
    jpeg: bool = False,
) -> BatchLoader:
    """Every example once, in source order, no augmentation; the last global batch is padded.

    `augment` names the dataset family: 'imagenet' resizes the short side to
    round(image_size * 256 / 224) and centre-crops `image_size`; the others only normalise.
    Each shard yields `num_eval_batches(len(source), batch_size)` batches with a boolean 'mask'.
    `image_dtype`, `jpeg`, `worker_count`: as in `make_train_loader`.
    """
    check_shard(shard_index, shard_count)
    local = local_batch_size(batch_size, shard_count)
    length = num_eval_batches(len(source), batch_size) * local
    _check_jpeg(jpeg, augment)
    transform = (jpeg_augment.eval_transform(image_size) if jpeg
                 else aug.eval_transform(augment, image_size))
    mean_, std_ = _norm(image_dtype, mean, std)
    example = _EvalExample(source, local_batch=local, global_batch=batch_size,
                           shard_index=shard_index, transform=transform, mean=mean_, std=std_)
    ds = grain.MapDataset.range(length).map(example)
    return _finish(ds, local, num_threads, prefetch, worker_count)
