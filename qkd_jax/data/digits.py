"""`qkd_digits`: scikit-learn's 1797 handwritten digits as a tfds dataset that builds itself offline.

Transform (documented, asserted in tests): sklearn's 8x8 grey levels v in 0..16 become
uint8 `(255 * v + 8) // 16` (= round(v * 255 / 16), halves up), then each pixel is repeated 2x2
(nearest upsampling) to 16x16x1. 16x16 lets CIFAR-style CNNs (two stride-2 stages) end on 4x4
maps instead of 2x2 while adding no interpolated values; it trains in seconds on 2 CPU cores.

Split: stratified 80/20 with `sklearn.model_selection.train_test_split(..., test_size=360,
stratify=target, random_state=0)` -> 1437 train / 360 test; each split keeps sklearn's
order (ascending original index; shuffling at write time is disabled).

Storage: `<data_dir>/qkd_digits/1.0.0/qkd_digits-{train,test}.array_record-00000-of-00001`
written by tfds itself (the image is a raw uint8 `Tensor` feature: tfds's `Image` feature would
need TensorFlow to PNG-encode), read back with `builder.as_data_source` (no TensorFlow).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from qkd_jax.data.info import resolve_data_dir

NUM_TEST = 360
SPLIT_SEED = 0
UPSAMPLE = 2


def digits_split_indices() -> dict[str, np.ndarray]:
    """Original `load_digits()` indices of each split, ascending."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, test = train_test_split(
        np.arange(len(target)), test_size=NUM_TEST, stratify=target, random_state=SPLIT_SEED
    )
    return {"train": np.sort(train), "test": np.sort(test)}


def digits_to_uint8(levels: np.ndarray) -> np.ndarray:
    """sklearn grey levels (0..16, shape (..., 8, 8)) -> uint8 images (..., 16, 16, 1)."""
    v = np.asarray(levels).astype(np.int64)
    scaled = ((255 * v + 8) // 16).astype(np.uint8)
    up = scaled.repeat(UPSAMPLE, axis=-2).repeat(UPSAMPLE, axis=-1)
    return up[..., None]


class QkdDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn digits, 16x16x1 uint8, 10 classes, 1437 train / 360 test."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split (random_state=0), 2x nearest upsampling."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file. (tfds 4.9.10's default needs the undeclared `importlib_resources` package.)"""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(16, 16, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # the data ships inside scikit-learn
        return {name: self._generate_examples(idx) for name, idx in digits_split_indices().items()}

    def _generate_examples(self, indices: Sequence[int]) -> Iterator[tuple[int, dict]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits_to_uint8(digits.images)
        for i in indices:
            yield int(i), {"image": images[i], "label": int(digits.target[i])}


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive lock so concurrent processes (xdist, several hosts) prepare only once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_digits(data_dir: str | None = None) -> QkdDigits:
    """Builds `qkd_digits` into `data_dir` (array_record) unless already there; returns the builder."""
    root = resolve_data_dir(data_dir)
    if "://" in root:  # a bucket: no directory to create and no flock; tfds writes the files
        lock = contextlib.nullcontext()
    else:
        os.makedirs(root, exist_ok=True)
        lock = _file_lock(os.path.join(root, ".qkd_digits.lock"))
    with lock:
        builder = QkdDigits(data_dir=root, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
            builder = QkdDigits(data_dir=root)  # re-read the written dataset_info
    return builder


def digits_source(split: str, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
    """Random-access source of `qkd_digits` (prepared on first use); records {'image', 'label'}."""
    return prepare_digits(data_dir).as_data_source(split=split)
