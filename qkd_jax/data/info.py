"""Dataset constants in one place: classes, image shapes, normalisation, splits, augmentation kind."""

from __future__ import annotations

import dataclasses
import os

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """Static facts about a dataset.

    `image_shape` is the stored (H, W, C) shape (None for variable-sized ImageNet), `input_size`
    the side of the square image fed to the model, `mean`/`std` per channel on the 0..1 scale
    (normalised = (uint8 / 255 - mean) / std), `augment` the training augmentation kind
    understood by `pipeline.make_train_loader`.
    """

    name: str
    num_classes: int
    image_shape: tuple[int | None, int | None, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_split: str
    eval_split: str
    num_train: int
    num_eval: int
    augment: str
    input_size: int


_INFOS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        # 1797 scikit-learn digits, 2x nearest-upsampled to 16x16 (see digits.py). Mean/std of the
        # train split (asserted in tests/data/test_digits.py).
        DatasetInfo(name="qkd_digits", num_classes=10, image_shape=(16, 16, 1), mean=(0.30543,),
                    std=(0.37596,), train_split="train", eval_split="test", num_train=1437,
                    num_eval=360, augment="digits", input_size=16),
        # Per-channel statistics of the CIFAR training sets.
        DatasetInfo(name="cifar10", num_classes=10, image_shape=(32, 32, 3),
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    train_split="train", eval_split="test", num_train=50_000, num_eval=10_000,
                    augment="cifar", input_size=32),
        DatasetInfo(name="cifar100", num_classes=100, image_shape=(32, 32, 3),
                    mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                    train_split="train", eval_split="test", num_train=50_000, num_eval=10_000,
                    augment="cifar", input_size=32),
        DatasetInfo(name="imagenet2012", num_classes=1000, image_shape=(None, None, 3),
                    mean=_IMAGENET_MEAN, std=_IMAGENET_STD, train_split="train",
                    eval_split="validation", num_train=1_281_167, num_eval=50_000,
                    augment="imagenet", input_size=224),
        # SQAKD recipe: 64 px Tiny-ImageNet upsampled to 224 with ImageNet-style augmentation.
        DatasetInfo(name="tiny_imagenet", num_classes=200, image_shape=(64, 64, 3),
                    mean=_IMAGENET_MEAN, std=_IMAGENET_STD, train_split="train",
                    eval_split="val", num_train=100_000, num_eval=10_000, augment="imagenet",
                    input_size=224),
    )
}

DATASETS: tuple[str, ...] = tuple(_INFOS)


def dataset_info(name: str) -> DatasetInfo:
    """The `DatasetInfo` of a supported dataset; unknown names are a `ValueError` listing the known ones."""
    try:
        return _INFOS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def resolve_data_dir(data_dir: str | None = None) -> str:
    """The data directory: `data_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets` (tfds's
    default); a bucket URI (gs://bucket/tensorflow_datasets, read by tfds) is returned unchanged."""
    chosen = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    if "://" in chosen:
        return chosen
    return os.path.abspath(os.path.expanduser(chosen))
