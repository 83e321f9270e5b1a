"""Augmentation geometry on images whose pixels encode their own coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from qkd_jax.data import augment as aug


def coord_image(h: int, w: int) -> np.ndarray:
    """uint8 HxWx3: channel 0 = row + 1, channel 1 = column + 1 (0 marks padding), channel 2 = 9."""
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([y + 1, x + 1, np.full_like(y, 9)], axis=-1).astype(np.uint8)


def _offsets(out: np.ndarray) -> tuple[int, int]:
    """(dy, dx) with out[i, j] = in[i + dy, j + dx] on real pixels; asserts one rigid shift."""
    real = out[..., 2] == 9
    assert (out[~real] == 0).all()  # padding is zero fill
    i, j = np.nonzero(real)
    dy = out[i, j, 0].astype(int) - 1 - i
    dx = out[i, j, 1].astype(int) - 1 - j
    assert len(set(dy)) == 1 and len(set(dx)) == 1
    return int(dy[0]), int(dx[0])


def test_normalize_numbers():
    image = np.array([[[0, 255, 51]]], np.uint8)
    out = aug.normalize(image, (0.5, 0.5, 0.1), (0.5, 0.25, 0.2))
    np.testing.assert_allclose(out, [[[-1.0, 2.0, 0.5]]], rtol=1e-6)
    assert out.dtype == np.float32


def test_flip_mirrors_columns():
    image = coord_image(3, 5)
    np.testing.assert_array_equal(aug.flip_lr(image)[:, 0, 1], [5, 5, 5])
    np.testing.assert_array_equal(aug.flip_lr(image)[1, :, 1], [5, 4, 3, 2, 1])


def test_pad_crop_is_a_rigid_shift_covering_all_offsets():
    image = coord_image(32, 32)
    seen = set()
    for s in range(600):
        out = aug.pad_and_crop(image, np.random.default_rng(s), pad=4)
        assert out.shape == (32, 32, 3)
        seen.add(_offsets(out))
    assert seen == {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)}


def test_cifar_train_flips_half_of_the_time():
    image = coord_image(32, 32)
    flips = 0
    for s in range(200):
        out = aug.cifar_train(image, np.random.default_rng(s))
        row = out[16, :, 1].astype(int)  # row 16 is never padding for shifts of at most 4
        xs = row[row > 0]
        flipped = bool(xs[0] > xs[-1])
        flips += flipped
        dy, dx = _offsets(aug.flip_lr(out) if flipped else out)
        assert -4 <= dy <= 4 and -4 <= dx <= 4
    assert 70 <= flips <= 130


def test_digits_shift_at_most_two_and_never_flips():
    image = coord_image(16, 16)
    for s in range(50):
        dy, dx = _offsets(aug.digits_train(image, np.random.default_rng(s)))
        assert abs(dy) <= 2 and abs(dx) <= 2


def test_crop_box_bounds_area_and_ratio():
    for s in range(300):
        top, left, h, w = aug.sample_crop_box(120, 200, np.random.default_rng(s))
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 200
        assert 0.08 * 0.9 <= h * w / (120 * 200) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_crop_box_falls_back_to_central_crop():
    # A 4x400 strip: no sampled box fits, so torchvision's fallback: h=4, w=round(4*4/3)=5, centred.
    assert aug.sample_crop_box(4, 400, np.random.default_rng(0)) == (0, 197, 4, 5)
    assert aug.sample_crop_box(400, 4, np.random.default_rng(0)) == (197, 0, 5, 4)


def test_random_resized_crop_maps_the_box_onto_the_output():
    # Horizontal ramp 0..255: a box [left, left+w) resized to S columns samples
    # x = left + (j + 0.5) * w / S - 0.5 at output column j (exact for a linear ramp).
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (64, 256, 3)).copy()
    size, flipped_count = 32, 0
    for s in range(40):
        rng = np.random.default_rng(s)
        out = aug.imagenet_train(ramp, rng, size=size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        _, left, _, w = aug.sample_crop_box(64, 256, np.random.default_rng(s))
        expected = left + (np.arange(size) + 0.5) * w / size - 0.5
        row = out[size // 2, :, 0].astype(float)
        flipped = row[0] > row[-1]
        flipped_count += flipped
        if flipped:
            row = row[::-1]
        inner = slice(3, size - 3)  # away from the edge-clamped filter support
        np.testing.assert_allclose(row[inner], expected[inner], atol=1.01)
    assert 5 <= flipped_count <= 35


def test_eval_resize_then_centre_crop():
    image = coord_image(150, 200)  # rows 1..150, columns 1..200
    resized = aug.resize_short_side(image, 73)
    assert resized.shape == (73, int(73 * 200 / 150), 3)
    out = aug.imagenet_eval(image, size=64)  # short side round(64 * 256 / 224) = 73
    assert out.shape == (64, 64, 3)
    # centre crop of the 73x97 image: top = round(4.5) = 4, left = round(16.5) = 16 (torchvision).
    np.testing.assert_array_equal(out, resized[4:68, 16:80])
    crop = aug.center_crop(coord_image(10, 11), 4)
    assert crop[0, 0, 0] == 4 and crop[0, 0, 1] == 5  # top = round(3.0) = 3, left = round(3.5) = 4


def test_resize_of_constant_region_and_grey_images():
    image = np.zeros((40, 40, 1), np.uint8)
    image[:, 20:] = 200
    out = aug.resize(image, 16, 16, box=(0, 24, 40, 16))  # only the bright half
    assert out.shape == (16, 16, 1)
    assert (out == 200).all()


@pytest.mark.parametrize("kind", ["oops"])
def test_unknown_kind(kind):
    with pytest.raises(ValueError, match="augment"):
        aug.train_transform(kind)
    with pytest.raises(ValueError, match="augment"):
        aug.eval_transform(kind)
