"""Random-access sources by dataset name; a dataset that is not on disk says how to prepare it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qkd_jax.data import digits, tiny_imagenet
from qkd_jax.data.info import dataset_info, resolve_data_dir

# tfds 4.9.10 needs `importlib_resources` to build any of its datasets (undeclared dependency).
_TFDS_BUILD = "pip install tensorflow tensorflow-datasets importlib_resources"


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is missing from the data directory; the message says how to prepare it."""


def preparation_hint(name: str, data_dir: str | None = None) -> str:
    """Shell instructions that put `name` where `get_source` looks for it."""
    root = resolve_data_dir(data_dir)
    if name in ("cifar10", "cifar100"):
        return (f"Build it once with TensorFlow (needs internet), in ArrayRecord format:\n"
                f"  {_TFDS_BUILD}\n"
                f"  tfds build {name} --file_format=array_record --data_dir={root}")
    if name == "imagenet2012":
        manual = os.path.join(root, "downloads", "manual")
        return (f"Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from "
                f"https://image-net.org (login required) into {manual}, then:\n"
                f"  {_TFDS_BUILD}\n"
                f"  tfds build imagenet2012 --file_format=array_record --data_dir={root} "
                f"--manual_dir={manual}")
    if name == "tiny_imagenet":
        return (f"Download and unzip it so that {os.path.join(root, tiny_imagenet.FOLDER)}"
                f"/wnids.txt exists:\n"
                f"  mkdir -p {root} && cd {root} && "
                f"wget http://cs231n.stanford.edu/tiny-imagenet-200.zip && "
                f"unzip -q tiny-imagenet-200.zip")
    return f"qkd_digits prepares itself: qkd_jax.data.digits.prepare_digits({root!r})"


def _not_prepared(name: str, data_dir: str | None, cause: str) -> DatasetNotPreparedError:
    return DatasetNotPreparedError(
        f"dataset {name!r} is not prepared under {resolve_data_dir(data_dir)} ({cause}).\n"
        + preparation_hint(name, data_dir))


# Datasets stored as JPEG bytes that `get_source(..., encoded=True)` can hand over undecoded.
ENCODED = ("imagenet2012",)


def get_source(name: str, split: str, data_dir: str | None = None, *,
               encoded: bool = False) -> Sequence[dict[str, Any]]:
    """Random-access source (len, [i] -> {'image': uint8 HWC, 'label': int, ...}) of one split.

    `name`: 'qkd_digits' (built on first use), 'cifar10', 'cifar100', 'imagenet2012' (tfds
    ArrayRecord, read with `tfds.data_source`, no TensorFlow) or 'tiny_imagenet' (image folder).
    `data_dir`: see `info.resolve_data_dir`. Raises `DatasetNotPreparedError` if absent.
    `encoded=True` (datasets in `ENCODED`): 'image' is the stored JPEG bytes, undecoded, for
    `pipeline.make_train_loader(..., jpeg=True)`.
    """
    dataset_info(name)  # validates the name
    if encoded and name not in ENCODED:
        raise ValueError(f"dataset {name!r} is not stored as JPEG bytes; encoded=True needs one "
                         f"of {ENCODED} (use encoded=False)")
    if name == "qkd_digits":
        return digits.digits_source(split, data_dir)
    if name == "tiny_imagenet":
        root = os.path.join(resolve_data_dir(data_dir), tiny_imagenet.FOLDER)
        if not tiny_imagenet.is_present(root):
            raise _not_prepared(name, data_dir, f"{root} not found")
        return tiny_imagenet.TinyImageNetSource(root, split)
    import tensorflow_datasets as tfds

    try:
        decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
        return tfds.data_source(name, split=split, data_dir=resolve_data_dir(data_dir),
                                download=False, decoders=decoders)
    except (KeyError, NotImplementedError, FileNotFoundError, AssertionError) as e:
        # tfds: KeyError "splits is empty" (nothing built), NotImplementedError (built as
        # TFRecord only), FileNotFoundError (files removed).
        raise _not_prepared(name, data_dir, f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
