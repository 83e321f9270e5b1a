"""The JPEG fast path through the real reader: a prepared `imagenet2012` of synthetic JPEGs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from benchmarks import input_pipeline, synthetic_imagenet
from qkd_jax.data import dataset_info, get_source, make_eval_loader, make_train_loader
from qkd_jax.data import jpeg_augment as ja

N = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("imagenet"))
    synthetic_imagenet.write_dataset(root, N, seed=1)
    return root


def _train(data_dir, **kw):
    info = dataset_info("imagenet2012")
    return make_train_loader(get_source("imagenet2012", "train", data_dir, encoded=True), batch_size=4,
                             seed=2, num_epochs=2, augment="imagenet", image_size=40, mean=info.mean,
                             std=info.std, num_threads=1, image_dtype="uint8", jpeg=True, **kw)


def test_encoded_records_hold_the_jpeg_bytes(data_dir):
    decoded = get_source("imagenet2012", "train", data_dir)
    encoded = get_source("imagenet2012", "train", data_dir, encoded=True)
    assert len(encoded) == N
    for i in (0, 5, 11):
        data = encoded[i]["image"]
        assert isinstance(data, bytes)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), decoded[i]["image"])
        assert encoded[i]["label"] == decoded[i]["label"]
    with pytest.raises(ValueError, match="not stored as JPEG bytes"):
        get_source("cifar10", "train", data_dir, encoded=True)


def test_batches_are_the_per_example_transform(data_dir):
    # Same stream order and randomness as the old path: labels match, and each image is
    # `imagenet_train_jpeg` of its record with the generator (seed, epoch, index).
    info = dataset_info("imagenet2012")
    old = list(make_train_loader(get_source("imagenet2012", "train", data_dir), batch_size=4, seed=2,
                                 num_epochs=2, augment="imagenet", image_size=40, mean=info.mean,
                                 std=info.std, num_threads=1))
    new = list(_train(data_dir))
    assert len(new) == len(old) == 2 * N // 4
    for o, n in zip(old, new):
        np.testing.assert_array_equal(o["label"], n["label"])
        assert n["image"].dtype == np.uint8 and n["image"].shape == (4, 40, 40, 3)
    source = get_source("imagenet2012", "train", data_dir, encoded=True)
    # Recompute batch 0 by hand from grain's epoch-0 shuffle.
    import grain

    perm = grain.MapDataset.range(N).shuffle(seed=2)
    for j in range(4):
        index = int(perm[j])
        expected = ja.imagenet_train_jpeg(source[index]["image"], np.random.default_rng([2, 0, index]),
                                          size=40)
        np.testing.assert_array_equal(new[0]["image"][j], expected)


def test_workers_give_the_same_batches_and_resume_exactly(data_dir):
    full = list(_train(data_dir))
    it = iter(_train(data_dir, worker_count=2))
    try:
        head = [next(it) for _ in range(2)]
        state = it.get_state()
    finally:
        it.close()
    again = iter(_train(data_dir, worker_count=0))
    again.set_state(state)
    rest = list(again)
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_eval_loader_uint8(data_dir):
    batches = list(make_eval_loader(get_source("imagenet2012", "train", data_dir, encoded=True),
                                    batch_size=5, augment="imagenet", image_size=32, image_dtype="uint8",
                                    jpeg=True))
    assert [b["image"].shape for b in batches] == [(5, 32, 32, 3)] * 3
    assert all(b["image"].dtype == np.uint8 for b in batches)
    assert batches[-1]["mask"].tolist() == [True, True, False, False, False]


@pytest.mark.slow  # the input-pipeline benchmark end to end at a tiny size
def test_benchmark_at_tiny_size(tmp_path):
    out = tmp_path / "bench.json"
    data_dir = tmp_path / "data"
    paths = "old,new,crop" if ja.native_available() else "old,new"
    result = input_pipeline.main([f"--data_dir={data_dir}", "--images=6", "--batch=2", "--batches=1",
                                  "--size=32", "--workers=0", f"--paths={paths}", f"--out={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["rows"]
    assert [(r["path"], r["workers"]) for r in rows] == [(p, 0) for p in paths.split(",")]
    for r in rows:
        assert r["images"] == 2 and r["shape"] == [2, 32, 32, 3]
        assert r["images_per_s"] > 0 and r["wall_s"] > 0 and r["first_batch_s"] > 0
    assert [r["dtype"] for r in rows] == ["float32"] + ["uint8"] * (len(rows) - 1)
    # The images it wrote decode to the sizes it reports, in the ImageNet-like range, through the
    # runner's reader and as the plain JPEG files.
    meta = json.loads((data_dir / "jpeg" / "sizes.json").read_text())
    sizes = [tuple(s) for s in meta["sizes"]]
    assert len(sizes) == 6 and all(300 <= min(s) and max(s) <= 600 for s in sizes)
    source = get_source("imagenet2012", "train", str(data_dir))
    seen = {}
    for i in range(len(source)):
        record = source[i]
        k = int(record["file_name"].decode().split("_")[-1].split(".")[0])
        seen[k] = record["image"].shape
        assert record["image"].dtype == np.uint8
    assert seen == {k: (*sizes[k], 3) for k in range(6)}
    for k in range(6):
        with Image.open(os.path.join(data_dir, "jpeg", f"{k:06d}.JPEG")) as im:
            assert (im.height, im.width) == sizes[k] and im.format == "JPEG"
