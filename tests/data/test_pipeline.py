"""grain pipelines: epochs, resume, sharding, evaluation padding, label-free loading."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qkd_jax.data import pipeline
from tests.data import IndexSource, decode_index

N = 10  # not a multiple of the batch size: batches straddle epochs


def _train(batch_size=4, seed=5, num_epochs=3, augment="cifar", **kw):
    return pipeline.make_train_loader(IndexSource(N), batch_size=batch_size, seed=seed,
                                      num_epochs=num_epochs, augment=augment, num_threads=2, **kw)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_each_epoch_is_a_fresh_permutation():
    batches = list(_train(batch_size=5, augment="none"))
    order = np.concatenate([decode_index(b["image"]) for b in batches])
    assert len(order) == 3 * N
    epochs = order.reshape(3, N)
    for e in epochs:
        assert sorted(e) == list(range(N))
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels, order % 10)


def test_seed_changes_order_and_batch_count_drops_remainder():
    a = list(_train(seed=1, augment="none"))
    b = list(_train(seed=2, augment="none"))
    assert len(a) == len(b) == 3 * N // 4 == pipeline.num_train_batches(N, 4, 3)
    assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))
    assert all(x["image"].shape == (4, 16, 16, 3) and x["image"].dtype == np.float32 for x in a)
    assert all(x["label"].dtype == np.int32 for x in a)


@pytest.mark.parametrize("k", [1, 2, 3, 5])  # the 3rd batch holds positions 8..11: epochs 0 and 1
def test_resume_reproduces_augmented_batches(k):
    full = list(_train())
    it = iter(_train())
    head = [next(it) for _ in range(k)]
    state = it.get_state()
    fresh = iter(_train())  # a new loader, as after a restart
    fresh.set_state(state)
    _assert_same(head + list(fresh), full)


def test_resume_infinite_stream():
    it = iter(_train(num_epochs=None))
    first = [next(it) for _ in range(9)]  # 36 positions: more than 3 epochs
    state = it.get_state()
    more = [next(it) for _ in range(3)]
    again = iter(_train(num_epochs=None))
    again.set_state(state)
    _assert_same([next(again) for _ in range(3)], more)
    _assert_same(first[:7], list(_train(num_epochs=3)))  # same stream as the finite loader


def test_augmentation_differs_between_epochs():
    batches = list(_train(batch_size=5, num_epochs=4, augment="cifar"))
    images = np.concatenate([b["image"] for b in batches])
    index = np.concatenate([decode_index(b["image"]) for b in batches])
    views = [images[index == i] for i in range(N)]
    assert all(len(v) == 4 for v in views)
    # Four epochs of pad-4 crops + flips of the same example are not all identical.
    assert sum(len({v.tobytes() for v in views_i}) > 1 for views_i in views) >= N - 1


@pytest.mark.parametrize("augment", ["none", "cifar"])
def test_shards_cover_the_global_batch(augment):
    whole = list(_train(batch_size=8, augment=augment))
    shards = [list(_train(batch_size=8, augment=augment, shard_index=p, shard_count=2))
              for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for j, batch in enumerate(whole):
        assert shards[0][j]["image"].shape[0] == 4
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([shards[0][j][key], shards[1][j][key]]), batch[key])


def test_drop_labels_gives_same_images_without_labels():
    with_labels = list(_train(num_epochs=1))
    without = list(_train(num_epochs=1, drop_labels=True))
    assert all(set(b) == {"image"} for b in without)
    for a, b in zip(with_labels, without):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_with_index_emits_the_source_row_of_each_example():
    plain = list(_train(num_epochs=2))
    indexed = list(_train(num_epochs=2, with_index=True))
    for a, b in zip(plain, indexed):
        assert set(b) == {"image", "label", "index"} and b["index"].dtype == np.int32
        np.testing.assert_array_equal(b["index"], decode_index(b["image"]))  # the row the image encodes
        np.testing.assert_array_equal(a["image"], b["image"])  # same stream otherwise
    shards = [list(_train(num_epochs=1, with_index=True, shard_index=i, shard_count=2)) for i in range(2)]
    for b in (b for shard in shards for b in shard):
        np.testing.assert_array_equal(b["index"], decode_index(b["image"]))


def test_normalisation_of_train_batch():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    batch = next(iter(_train(augment="none", mean=mean, std=std)))
    raw = batch["image"] * np.asarray(std) + np.asarray(mean)  # back to the 0..1 scale
    np.testing.assert_allclose(raw[..., 2], 7 / 255, atol=1e-6)
    np.testing.assert_allclose(raw[..., 1], 0.0, atol=1e-6)
    # Example i < 10 has channel 0 = i = its label.
    expected = np.broadcast_to(batch["label"][:, None, None] / 255, raw.shape[:3])
    np.testing.assert_allclose(raw[..., 0], expected, atol=1e-6)


def test_batch_size_must_split_over_shards():
    with pytest.raises(ValueError, match="multiple"):
        _train(batch_size=6, shard_count=4)
    with pytest.raises(ValueError, match="shard_index"):
        _train(batch_size=8, shard_index=2, shard_count=2)


@pytest.mark.parametrize("shard_count", [1, 2])
def test_eval_sees_each_example_once_and_masks_padding(shard_count):
    source = IndexSource(N)
    loaders = [pipeline.make_eval_loader(source, batch_size=4, shard_index=p,
                                         shard_count=shard_count, num_threads=1)
               for p in range(shard_count)]
    per_shard = [list(ld) for ld in loaders]
    assert all(len(b) == pipeline.num_eval_batches(N, 4) == 3 for b in per_shard)
    batches = list(itertools.chain(*per_shard))
    mask = np.concatenate([b["mask"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.dtype == np.bool_ and mask.sum() == N and (~mask).sum() == 2
    index = decode_index(images[mask])
    assert sorted(index) == list(range(N))
    np.testing.assert_array_equal(labels[mask], index % 10)
    assert not images[~mask].any()
    if shard_count == 1:  # source order, padding only at the end
        np.testing.assert_array_equal(index, np.arange(N))
        np.testing.assert_array_equal(mask, np.arange(12) < N)


def test_worker_processes_give_the_same_batches():
    plain = list(_train(num_epochs=1))
    it = iter(_train(num_epochs=1, worker_count=2))
    try:
        _assert_same(list(it), plain)
    finally:
        it.close()


def test_state_resumes_with_another_worker_count():
    full = list(_train())
    it = iter(_train(worker_count=2))
    try:
        head = [next(it) for _ in range(3)]
        state = it.get_state()
    finally:
        it.close()
    assert state == {"next_index": 3}
    for workers in (0, 1):
        again = iter(_train(worker_count=workers))
        again.set_state(state)
        try:
            _assert_same(head + list(again), full)
        finally:
            again.close()


def test_uint8_batches_are_the_unnormalised_geometry():
    floats = list(_train(num_epochs=1))
    ints = list(_train(num_epochs=1, image_dtype="uint8"))
    assert all(b["image"].dtype == np.uint8 for b in ints)
    for f, i in zip(floats, ints):
        np.testing.assert_array_equal(f["label"], i["label"])
        np.testing.assert_array_equal(f["image"], i["image"].astype(np.float32) / np.float32(255))


def test_bad_image_dtype_and_jpeg_without_imagenet_are_refused():
    with pytest.raises(ValueError, match="image_dtype must be one of"):
        _train(image_dtype="float16")
    with pytest.raises(ValueError, match="jpeg=True decodes ImageNet-style crops only"):
        _train(jpeg=True)
    with pytest.raises(ValueError, match="not a loader state"):
        iter(_train()).set_state({"foo": 1})
