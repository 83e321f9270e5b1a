"""The JPEG fast path against the reference ImageNet augmentation (full decode, augment.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qkd_jax.data import augment as aug
from qkd_jax.data import jpeg_augment as ja


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth RGB image: a 4x5 random grid upsampled bicubically."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    """The reference decode (what tfds's PIL decoder returns), grey repeated to 3 channels."""
    image = np.asarray(Image.open(io.BytesIO(data)))
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


@pytest.fixture
def draft_sizes(monkeypatch):
    """Records the DCT reduction taken by each decode as (d, d) (1 = full resolution).

    Also checks the decode's geometry: ceil(size / d) pixels per side, mapped at exactly 1 / d.
    Turns the cropped-decode extension off, so every image takes the whole-image path it records
    (tests/data/test_jpeg_crop.py shows the extension's output equals that path's bit for bit).
    """
    monkeypatch.setattr(ja, "_jpeg_crop", None)
    seen: list[tuple[int, int]] = []
    original = ja._decode_reduced

    def decode(data, full_h, full_w, d, space):
        image, s = original(data, full_h, full_w, d, space)
        assert image.shape == (-(-full_h // d), -(-full_w // d), 3) and s == 1.0 / d
        seen.append((d, d))
        return image, s

    monkeypatch.setattr(ja, "_decode_reduced", decode)
    return seen


def test_header_size_without_decoding():
    data = _jpeg(_smooth(123, 457, 0))
    assert ja.jpeg_size(data) == (123, 457)


def test_no_reduction_is_the_reference_bit_for_bit(draft_sizes):
    # 96 x 128 image, 64 px output: no crop covers 2 x 64 px on both sides, so no DCT scaling;
    # then the fast path must equal the reference exactly: same box, same resize, same flip.
    data = _jpeg(_smooth(96, 128, 1))
    full = _decoded(data)
    flips = set()
    for seed in range(40):
        ref_rng, fast_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        ref = aug.imagenet_train(full, ref_rng, size=64)
        fast = ja.imagenet_train_jpeg(data, fast_rng, size=64)
        assert fast.dtype == np.uint8 and fast.shape == (64, 64, 3)
        np.testing.assert_array_equal(fast, ref)
        # Same draws consumed: box sampling and the flip use the generator identically.
        assert fast_rng.bit_generator.state == ref_rng.bit_generator.state
        check = np.random.default_rng(seed)
        aug.sample_crop_box(96, 128, check)
        flips.add(check.random() < 0.5)
    assert flips == {True, False}  # both branches were exercised
    assert set(draft_sizes) == {(1, 1)}


def test_dct_scaled_crop_is_close_to_the_full_decode(draft_sizes):
    # 480 x 640 smooth images, 56 px output: most crops decode at 1/2 .. 1/8 scale. The DCT
    # scaling averages blocks before the bilinear filter; on smooth content the result stays
    # within a few grey levels of the full decode (measured: max 3, mean <= 0.45 over these seeds).
    diffs = []
    for seed in range(24):
        data = _jpeg(_smooth(480, 640, seed))
        ref = aug.imagenet_train(_decoded(data), np.random.default_rng(seed), size=56)
        fast = ja.imagenet_train_jpeg(data, np.random.default_rng(seed), size=56)
        d = np.abs(ref.astype(np.int16) - fast.astype(np.int16))
        diffs.append((d.max(), d.mean()))
    assert max(m for m, _ in diffs) <= 4
    assert max(mean for _, mean in diffs) <= 0.75
    reductions = {s for s in draft_sizes if s != (1, 1)}
    assert reductions and reductions <= {(2, 2), (4, 4), (8, 8)}


def test_reduced_decode_keeps_the_crop_at_least_the_output_size(draft_sizes):
    # The chosen scale never shrinks the crop below the output on either side.
    h, w, size = 480, 640, 56
    for seed in range(30):
        data = _jpeg(_smooth(h, w, seed))
        box = aug.sample_crop_box(h, w, np.random.default_rng(seed))
        draft_sizes.clear()
        ja.imagenet_train_jpeg(data, np.random.default_rng(seed), size=size)
        (fx, fy), = draft_sizes
        assert box[3] / fx >= size - 1 and box[2] / fy >= size - 1


def test_grey_jpeg_becomes_rgb_like_the_reference():
    grey = _smooth(96, 128, 3)[..., 0]
    data = _jpeg(grey)
    full = _decoded(data)
    for seed in range(5):
        ref = aug.imagenet_train(full, np.random.default_rng(seed), size=64)
        fast = ja.imagenet_train_jpeg(data, np.random.default_rng(seed), size=64)
        np.testing.assert_array_equal(fast, ref)


@pytest.mark.parametrize("hw, size, max_diff, mean_diff", [
    ((480, 640), 224, 1, 0.01),   # short side 256 < 480: full-resolution decode, same sample points
    ((640, 480), 224, 1, 0.01),   # portrait
    ((480, 640), 56, 4, 0.75),    # short side 64: decoded at 1/4 scale
])
def test_eval_matches_resize_and_centre_crop(hw, size, max_diff, mean_diff):
    # A box resize samples the points of the whole-image resize; they differ only where the box's
    # float scale rounds differently (a grey level at most, in a handful of pixels).
    for seed in range(4):
        data = _jpeg(_smooth(*hw, seed))
        ref = aug.imagenet_eval(_decoded(data), size=size)
        fast = ja.imagenet_eval_jpeg(data, size=size)
        assert fast.shape == ref.shape == (size, size, 3) and fast.dtype == np.uint8
        d = np.abs(ref.astype(np.int16) - fast.astype(np.int16))
        assert d.max() <= max_diff and d.mean() <= mean_diff


def test_turbo_decode_is_pillow_decode_bit_for_bit():
    # TurboJPEG (simplejpeg) and Pillow run the same accurate IDCT and fancy upsampling: a full
    # decode is the reference decode exactly, for 4:2:0 colour and for greyscale.
    for image in (_smooth(120, 200, 5), _smooth(120, 200, 6)[..., 1]):
        data = _jpeg(image, quality=85)
        image, s = ja._decode_reduced(data, 120, 200, 1, ja._header(data)[2])
        assert s == 1.0
        np.testing.assert_array_equal(image, _decoded(data))


def test_cmyk_jpeg_goes_through_pillow(draft_sizes):
    # TurboJPEG's CMYK -> RGB differs from Pillow's: CMYK records keep the Pillow decode.
    cmyk = np.concatenate([_smooth(96, 128, 7), _smooth(96, 128, 8)[..., :1]], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert ja._header(data)[2] not in ja._TURBO_SPACES
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for seed in range(5):
        ref = aug.imagenet_train(full, np.random.default_rng(seed), size=64)
        np.testing.assert_array_equal(ja.imagenet_train_jpeg(data, np.random.default_rng(seed), size=64), ref)


def test_decoded_records_take_the_reference_geometry():
    image = _smooth(96, 128, 4)
    np.testing.assert_array_equal(ja.imagenet_train_jpeg(image, np.random.default_rng(7), size=32),
                                  aug.imagenet_train(image, np.random.default_rng(7), size=32))
    np.testing.assert_array_equal(ja.imagenet_eval_jpeg(image, size=32), aug.imagenet_eval(image, size=32))
