"""Sources by name: tfds mock data through the loaders, Tiny-ImageNet folders, missing datasets."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from qkd_jax.data import (
    DatasetNotPreparedError,
    dataset_info,
    get_source,
    make_eval_loader,
    make_train_loader,
)

CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616])
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture
def mock_tfds():
    # USE_CODE: no metadata files needed; in tfds 4.9.10 this also mocks `tfds.data_source`.
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_cifar10_mock_source_and_normalisation(mock_tfds, tmp_path):
    source = get_source("cifar10", "test", str(tmp_path))
    assert len(source) == 12
    info = dataset_info("cifar10")
    batches = list(make_eval_loader(source, batch_size=8, augment=info.augment,
                                    mean=info.mean, std=info.std))
    assert [b["image"].shape for b in batches] == [(8, 32, 32, 3)] * 2
    assert batches[0]["image"].dtype == np.float32 and batches[0]["label"].dtype == np.int32
    for i in (0, 5, 11):  # known images: the raw uint8 records, normalised by hand
        raw = source[i]["image"].astype(np.float64)
        expected = (raw / 255 - CIFAR10_MEAN) / CIFAR10_STD
        np.testing.assert_allclose(batches[i // 8]["image"][i % 8], expected, atol=1e-5)
        assert batches[i // 8]["label"][i % 8] == source[i]["label"]
    assert batches[1]["mask"].tolist() == [True] * 4 + [False] * 4


def test_cifar10_mock_train_batches(mock_tfds, tmp_path):
    info = dataset_info("cifar10")
    source = get_source("cifar10", "train", str(tmp_path))
    batch = next(iter(make_train_loader(source, batch_size=6, seed=0, augment="cifar",
                                        mean=info.mean, std=info.std)))
    assert batch["image"].shape == (6, 32, 32, 3) and batch["label"].shape == (6,)
    assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
    # Every value is a normalised uint8 (or the zero padding of the crop).
    raw = (batch["image"] * CIFAR10_STD + CIFAR10_MEAN) * 255
    np.testing.assert_allclose(raw, np.rint(raw), atol=1e-3)
    assert raw.min() > -1e-3 and raw.max() < 255 + 1e-3


def test_imagenet_mock_resizes_variable_images(mock_tfds, tmp_path):
    source = get_source("imagenet2012", "validation", str(tmp_path))
    assert len({source[i]["image"].shape for i in range(12)}) > 1  # mock images vary in size
    info = dataset_info("imagenet2012")
    train = next(iter(make_train_loader(source, batch_size=4, seed=1, augment=info.augment,
                                        image_size=32, mean=info.mean, std=info.std)))
    assert train["image"].shape == (4, 32, 32, 3) and train["label"].max() < 1000
    evaluation = next(iter(make_eval_loader(source, batch_size=4, augment=info.augment,
                                            image_size=32, mean=info.mean, std=info.std)))
    assert evaluation["image"].shape == (4, 32, 32, 3)
    # Resizing random images keeps values inside the normalised uint8 range.
    lo, hi = (0 - IMAGENET_MEAN) / IMAGENET_STD, (1 - IMAGENET_MEAN) / IMAGENET_STD
    assert (evaluation["image"] >= lo - 1e-5).all() and (evaluation["image"] <= hi + 1e-5).all()


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet2012"])
def test_missing_tfds_dataset_says_how_to_build_it(name, tmp_path):
    with pytest.raises(DatasetNotPreparedError) as err:
        get_source(name, "train", str(tmp_path))
    assert isinstance(err.value, FileNotFoundError)
    message = str(err.value)
    assert f"'{name}'" in message
    assert f"tfds build {name} --file_format=array_record --data_dir={tmp_path}" in message
    assert "pip install tensorflow" in message
    if name == "imagenet2012":
        assert f"--manual_dir={tmp_path}/downloads/manual" in message


def test_missing_tiny_imagenet_says_where_to_unzip(tmp_path):
    with pytest.raises(DatasetNotPreparedError, match="tiny_imagenet") as err:
        get_source("tiny_imagenet", "train", str(tmp_path))
    assert f"{tmp_path}/tiny-imagenet-200/wnids.txt" in str(err.value)
    assert "tiny-imagenet-200.zip" in str(err.value)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        get_source("mnist", "train")


def _write_tiny_imagenet(root: str) -> dict[str, tuple[int, int, int]]:
    """3 classes x 2 train images, 3 val images; each class has its own solid colour."""
    colours = {"n03": (200, 10, 10), "n01": (10, 200, 10), "n02": (10, 10, 200)}
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(base)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(colours) + "\n")
    for wnid, colour in colours.items():
        folder = os.path.join(base, "train", wnid, "images")
        os.makedirs(folder)
        for k in range(2):
            Image.new("RGB", (64, 64), colour).save(os.path.join(folder, f"{wnid}_{k}.JPEG"))
    os.makedirs(os.path.join(base, "val", "images"))
    rows = []
    for k, wnid in enumerate(["n02", "n03", "n01"]):
        name = f"val_{k}.JPEG"
        image = Image.new("L", (64, 64), 128) if k == 2 else Image.new("RGB", (64, 64), colours[wnid])
        image.save(os.path.join(base, "val", "images", name))
        rows.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.writelines(rows)
    return colours


def test_tiny_imagenet_folder(tmp_path):
    colours = _write_tiny_imagenet(str(tmp_path))
    label_of = {w: i for i, w in enumerate(sorted(colours))}  # n01 -> 0, n02 -> 1, n03 -> 2
    train = get_source("tiny_imagenet", "train", str(tmp_path))
    assert len(train) == 6
    for i in range(6):
        record = train[i]
        wnid = sorted(colours)[record["label"]]
        assert record["image"].shape == (64, 64, 3) and record["image"].dtype == np.uint8
        np.testing.assert_allclose(record["image"].mean(axis=(0, 1)), colours[wnid], atol=3)
    assert sorted(train[i]["label"] for i in range(6)) == [0, 0, 1, 1, 2, 2]
    val = get_source("tiny_imagenet", "val", str(tmp_path))
    assert [val[i]["label"] for i in range(3)] == [label_of["n02"], label_of["n03"], label_of["n01"]]
    grey = val[2]["image"]
    assert grey.shape == (64, 64, 3) and np.abs(grey.astype(int) - 128).max() <= 2
    info = dataset_info("tiny_imagenet")
    batch = next(iter(make_eval_loader(val, batch_size=4, augment=info.augment, image_size=56,
                                       mean=info.mean, std=info.std)))
    assert batch["image"].shape == (4, 56, 56, 3) and batch["mask"].tolist() == [True] * 3 + [False]
