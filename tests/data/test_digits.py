"""The self-building `qkd_digits` dataset against scikit-learn's `load_digits()`."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from qkd_jax.data import dataset_info, get_source, make_eval_loader, make_train_loader


def _no_network(*args, **kwargs):
    raise AssertionError("network access during dataset preparation")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tfds"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        get_source("qkd_digits", "train", root)  # prepares both splits
    return root


def _expected() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Independent statement of the documented transform and split."""
    digits = load_digits()
    train, test = train_test_split(np.arange(1797), test_size=360, stratify=digits.target,
                                   random_state=0)
    out = {}
    for name, idx in (("train", np.sort(train)), ("test", np.sort(test))):
        levels = np.floor(digits.images[idx] * 255 / 16 + 0.5)  # round half up to 0..255
        images = np.kron(levels, np.ones((2, 2)))[..., None]  # each pixel -> a 2x2 block
        out[name] = images.astype(np.uint8), digits.target[idx]
    return out


def _read_all(source) -> tuple[np.ndarray, np.ndarray]:
    records = [source[i] for i in range(len(source))]
    return (np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]))


def test_written_as_array_record(data_dir):
    folder = os.path.join(data_dir, "qkd_digits", "1.0.0")
    files = sorted(f for f in os.listdir(folder) if ".array_record" in f)
    assert files == ["qkd_digits-test.array_record-00000-of-00001",
                     "qkd_digits-train.array_record-00000-of-00001"]
    before = os.path.getmtime(os.path.join(folder, files[1]))
    source = get_source("qkd_digits", "train", data_dir)  # second use: no rebuild
    assert os.path.getmtime(os.path.join(folder, files[1])) == before
    assert type(source).__name__ == "ArrayRecordDataSource"


def test_pixels_and_labels_match_sklearn(data_dir):
    expected = _expected()
    sizes = {}
    for split in ("train", "test"):
        images, labels = _read_all(get_source("qkd_digits", split, data_dir))
        assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 1)
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
        sizes[split] = len(labels)
    assert sizes == {"train": 1437, "test": 360}
    assert sum(sizes.values()) == 1797
    info = dataset_info("qkd_digits")
    assert (info.num_train, info.num_eval) == (sizes["train"], sizes["test"])


def test_stratified_class_balance(data_dir):
    all_counts = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(_read_all(get_source("qkd_digits", "test", data_dir))[1], minlength=10)
    train_counts = np.bincount(_read_all(get_source("qkd_digits", "train", data_dir))[1], minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, all_counts)
    assert np.all(np.abs(test_counts - all_counts * 360 / 1797) < 1)  # 20 % of every class


def test_normalisation_constants_are_train_statistics(data_dir):
    images, _ = _read_all(get_source("qkd_digits", "train", data_dir))
    info = dataset_info("qkd_digits")
    assert abs(images.mean() / 255 - info.mean[0]) < 1e-5
    assert abs(images.std() / 255 - info.std[0]) < 1e-5


def test_loaders_on_digits(data_dir):
    info = dataset_info("qkd_digits")
    train = make_train_loader(get_source("qkd_digits", "train", data_dir), batch_size=256, seed=0,
                              num_epochs=1, augment=info.augment, mean=info.mean, std=info.std)
    batches = list(train)
    assert len(batches) == 1437 // 256
    assert batches[0]["image"].shape == (256, 16, 16, 1)
    # Normalised over the epoch: roughly zero mean, unit variance (shifts only move zeros in).
    images = np.concatenate([b["image"] for b in batches])
    assert abs(images.mean()) < 0.1 and 0.85 < images.std() < 1.1
    evaluation = list(make_eval_loader(get_source("qkd_digits", "test", data_dir), batch_size=256,
                                       mean=info.mean, std=info.std))
    labels = np.concatenate([b["label"][b["mask"]] for b in evaluation])
    np.testing.assert_array_equal(labels, _expected()["test"][1])
