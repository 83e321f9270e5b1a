"""The cropped-decode extension (`qkd_jax.data._jpeg_crop`) against Pillow and the whole-image path.

Its resize must equal Pillow's `Image.resize(size, BILINEAR, box=...)` bit for bit, and its cropped,
DCT-scaled decode must equal a whole decode at the same scale on every pixel the resize reads, so
the training and evaluation transforms give the same bytes with and without it.
"""

from __future__ import annotations

import io
import math
import os
import sysconfig

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from qkd_jax.data import jpeg_augment as ja

native = pytest.mark.skipif(not ja.native_available(), reason="the _jpeg_crop extension was not built")


def _textured(h: int, w: int, seed: int) -> np.ndarray:
    """Stripes plus noise: every 8x8 block has detail, so decoding errors show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(xx / rng.uniform(3, 30))[..., None] + 50 * np.cos(yy / rng.uniform(3, 30))[..., None]
    return (base + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def _pillow(image: np.ndarray, box, out_hw: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(out_hw[::-1], Image.BILINEAR, box=box))


def _random_box(rng: np.random.Generator, h: int, w: int) -> tuple[float, float, float, float]:
    x0 = float(rng.uniform(0, w - 0.5))
    y0 = float(rng.uniform(0, h - 0.5))
    return x0, y0, float(rng.uniform(x0 + 0.1, w)), float(rng.uniform(y0 + 0.1, h))


def test_extension_is_built_where_libjpeg_headers_exist():
    # The test command installs the package, which builds the extension when a compiler and
    # jpeglib.h are there; a silent build failure would leave the slow path in place.
    include_dirs = ["/usr/include", "/usr/local/include", sysconfig.get_paths()["include"]]
    if not any(os.path.exists(os.path.join(d, "jpeglib.h")) for d in include_dirs):
        pytest.skip("no libjpeg headers on this machine: the whole-image path is the expected one")
    assert ja.native_available()


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def horizontal_loop(request):
    """Runs a test with the AVX2 horizontal pass (where the CPU has it) and with the scalar loop."""
    ja._jpeg_crop.set_avx2(request.param)
    yield request.param
    ja._jpeg_crop.set_avx2(True)


@native
def test_resize_equals_pillow_bit_for_bit(horizontal_loop):
    rng = np.random.default_rng(0)
    cases = [
        ((40, 30), (0.0, 0.0, 30.0, 40.0), (40, 30)),  # identity box and size: a copy
        ((40, 30), (3.0, 5.0, 23.0, 25.0), (20, 20)),  # integral box of the output's size: a crop
        ((1, 10), (0.0, 0.0, 10.0, 1.0), (1, 37)),  # horizontal only, upscaling
        ((10, 1), (0.0, 0.0, 1.0, 10.0), (4, 1)),  # vertical only, downscaling
        ((300, 100), (0.0, 0.0, 100.0, 300.0), (50, 90)),  # height shrinks > 2x the width: vertical first
        ((375, 500), (50.0, 40.0, 350.0, 340.0), (224, 224)),  # a typical training crop
    ]
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        cases.append(((h, w), _random_box(rng, h, w), tuple(int(v) for v in rng.integers(1, 70, 2))))
    for (h, w), box, out_hw in cases:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = np.empty(out_hw + (3,), np.uint8)
        ja._jpeg_crop.resize(image, (h, w), box, out_hw, out)
        np.testing.assert_array_equal(out, _pillow(image, box, out_hw), err_msg=f"{(h, w)} {box} {out_hw}")


ENCODINGS = [
    {"subsampling": "4:2:0"},
    {"subsampling": "4:2:2"},
    {"subsampling": "4:4:4"},
    {"subsampling": "4:2:0", "progressive": True},
    {"subsampling": "4:2:0", "restart_marker_blocks": 4},
    {"grey": True},
]


@native
@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_cropped_decode_then_resize_equals_whole_decode_then_pillow(encoding, d, horizontal_loop):
    rng = np.random.default_rng(d)
    options = dict(encoding)
    grey = options.pop("grey", False)
    for trial in range(6):
        h, w = (int(v) for v in rng.integers(40, 420, 2))
        image = _textured(h, w, trial)
        data = _jpeg(image[..., 0] if grey else image, **options)
        dh, dw = math.ceil(h / d), math.ceil(w / d)
        whole = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=dh, min_width=dw)
        assert whole.shape[:2] == (dh, dw)
        box = _random_box(rng, dh, dw)
        out_hw = tuple(int(v) for v in rng.integers(1, 100, 2))
        out = np.empty(out_hw + (3,), np.uint8)
        flip = bool(trial % 2)
        ja._jpeg_crop.decode_crop_resize(data, d, (dh, dw), box, out_hw, out, flip)
        expected = _pillow(whole, box, out_hw)
        np.testing.assert_array_equal(out, expected[:, ::-1] if flip else expected,
                                      err_msg=f"{(h, w)} {box} {out_hw} flip={flip}")


@native
def test_only_the_region_the_resize_reads_is_decoded():
    h, w = 480, 640
    data = _jpeg(_textured(h, w, 0))
    out = np.empty((32, 32, 3), np.uint8)
    rows, cols = ja._jpeg_crop.decode_crop_resize(data, 1, (h, w), (400.0, 300.0, 460.0, 360.0), (32, 32), out)
    # rows: 16 above the 61 read (none below); columns: 16 either side, widened to 16-pixel iMCUs.
    assert rows <= 61 + 16 + 1 and cols <= 61 + 2 * 16 + 2 * 16
    rows, cols = ja._jpeg_crop.decode_crop_resize(data, 1, (h, w), (0.0, 0.0, float(w), float(h)), (32, 32), out)
    assert (rows, cols) == (h, w)


@native
def test_refusals_are_value_errors():
    data = _jpeg(_textured(64, 64, 0))
    out = np.empty((8, 8, 3), np.uint8)
    crop = ja._jpeg_crop.decode_crop_resize
    with pytest.raises(ValueError, match="libjpeg"):
        crop(data[: len(data) // 2], 1, (64, 64), (0.0, 0.0, 64.0, 64.0), (8, 8), out)  # truncated
    with pytest.raises(ValueError, match="libjpeg"):
        crop(b"not a jpeg at all", 1, (64, 64), (0.0, 0.0, 64.0, 64.0), (8, 8), out)
    with pytest.raises(ValueError, match="expected 64x64"):
        crop(data, 2, (64, 64), (0.0, 0.0, 32.0, 32.0), (8, 8), out)  # 1/2 scale is 32 x 32
    with pytest.raises(ValueError, match="not inside"):
        crop(data, 1, (64, 64), (0.0, 0.0, 65.0, 64.0), (8, 8), out)
    with pytest.raises(ValueError, match="denom"):
        crop(data, 3, (22, 22), (0.0, 0.0, 8.0, 8.0), (8, 8), out)
    with pytest.raises(ValueError, match="expected 9 x 8 x 3"):
        crop(data, 1, (64, 64), (0.0, 0.0, 64.0, 64.0), (9, 8), out)
    # The transforms fall back to the whole-image path for whatever the extension refuses.
    assert ja._native(data[: len(data) // 2], "YCbCr", 1, 64, 64, (0.0, 0.0, 64.0, 64.0), 8, 8) is None


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (1200, 900), (64, 48)])
def test_transforms_equal_with_and_without_the_extension(shape, monkeypatch):
    # Landscape, portrait (height shrinks > 2x the width: vertical pass first), large (DCT scaling
    # at 1/2 .. 1/8) and smaller than the output (upscaling).
    h, w = shape
    data = _jpeg(_textured(h, w, 3))
    with_ext = [ja.imagenet_train_jpeg(data, np.random.default_rng(s), size=224) for s in range(8)]
    with_ext.append(ja.imagenet_eval_jpeg(data, size=224))
    monkeypatch.setattr(ja, "_jpeg_crop", None)
    without = [ja.imagenet_train_jpeg(data, np.random.default_rng(s), size=224) for s in range(8)]
    without.append(ja.imagenet_eval_jpeg(data, size=224))
    for a, b in zip(with_ext, without):
        assert a.dtype == np.uint8 and a.shape == (224, 224, 3)
        np.testing.assert_array_equal(a, b)
