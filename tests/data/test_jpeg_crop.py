"""The cropped-decode extension (`qkd_jax.data._jpeg_crop`) against Pillow and the whole-image path.

Its resize must equal Pillow's `Image.resize(size, BILINEAR, box=...)` bit for bit, and its cropped,
DCT-scaled decode must equal a whole decode at the same scale on every pixel the resize reads, so
the training and evaluation transforms give the same bytes with and without it. Bad arguments and
damaged JPEGs must raise ValueError (naming the argument), never read out of bounds or hang, and
raise the same error type on the whole-image path.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from qkd_jax.data import jpeg_augment as ja

# The extension reproduces the resize arithmetic of Pillow 13 (the locked version) bit for bit.
# Pillow 9.3-12 (in setup.cfg's range) round the bilinear resize differently: 1 level apart in up
# to a fifth of the pixels (measured at Pillow 9.3, 10.0, 11.0 and 12.0), so there the checks
# allow one level.
PILLOW_EXACT = int(Image.__version__.split(".")[0]) >= 13


def assert_pillow_equal(actual: np.ndarray, expected: np.ndarray, err_msg: str = "") -> None:
    """Equal to Pillow's resize: bit for bit from Pillow 13, within one level before."""
    if PILLOW_EXACT:
        np.testing.assert_array_equal(actual, expected, err_msg=err_msg)
    else:
        diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
        assert diff.max(initial=0) <= 1, err_msg



def _build_prerequisites_missing() -> str | None:
    """Why setup.py cannot build the extension here (no C compiler, or no libjpeg headers or
    library), or None when it can: asks the compiler Python builds extensions with, as the build does."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    if shutil.which(cc[0]) is None:
        return f"no C compiler ({cc[0]!r} is not on PATH)"
    probe = ("#include <stdio.h>\n#include <jpeglib.h>\n"
             "int main(void) { struct jpeg_error_mgr e; jpeg_std_error(&e); return 0; }\n")
    result = subprocess.run([*cc, "-x", "c", "-", "-ljpeg", "-o", os.devnull], input=probe, capture_output=True,
                            text=True, timeout=120)
    if result.returncode:
        return "no libjpeg headers or library: " + (result.stderr.strip().splitlines() or ["link failed"])[0]
    return None


@pytest.fixture(scope="module")
def ext():
    """The built extension. Skips only where it cannot be built (or QKD_JAX_JPEG_CROP=0 turns it
    off); fails where a compiler and libjpeg are present but it is missing: a silent build failure
    would leave the slow path in place."""
    if ja.native_available():
        return ja._jpeg_crop
    if os.environ.get("QKD_JAX_JPEG_CROP", "1") == "0":
        pytest.skip("QKD_JAX_JPEG_CROP=0 turns the extension off")
    missing = _build_prerequisites_missing()
    if missing:
        pytest.skip(f"{missing}: the whole-image path is the expected one")
    pytest.fail("a C compiler and libjpeg are present but qkd_jax.data._jpeg_crop is missing: reinstall the "
                "package (or run `python setup.py build_ext --inplace`) and read the build's warning")


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


def test_extension_is_built_where_a_compiler_and_libjpeg_exist(ext):
    # The test command installs the package, which builds the extension when a compiler and
    # libjpeg are there; the fixture fails if it did not.
    assert ja.native_available() and ext.LIBJPEG_VERSION >= 62


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def horizontal_loop(request, ext):
    """Runs a test with the AVX2 horizontal pass (where the CPU has it) and with the scalar loop."""
    ext.set_avx2(request.param)
    yield request.param
    ext.set_avx2(True)


def test_resize_equals_pillow_bit_for_bit(ext, horizontal_loop):
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
        ext.resize(image, (h, w), box, out_hw, out)
        assert_pillow_equal(out, _pillow(image, box, out_hw), err_msg=f"{(h, w)} {box} {out_hw}")


ENCODINGS = [
    {"subsampling": "4:2:0"},
    {"subsampling": "4:2:2"},
    {"subsampling": "4:4:4"},
    {"subsampling": "4:2:0", "progressive": True},
    {"subsampling": "4:2:0", "restart_marker_blocks": 4},
    {"grey": True},
]


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("d", [1, 2, 4, 8])
def test_cropped_decode_then_resize_equals_whole_decode_then_pillow(encoding, d, ext, horizontal_loop):
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
        ext.decode_crop_resize(data, d, (dh, dw), box, out_hw, out, flip)
        expected = _pillow(whole, box, out_hw)
        assert_pillow_equal(out, expected[:, ::-1] if flip else expected,
                            err_msg=f"{(h, w)} {box} {out_hw} flip={flip}")


def test_only_the_region_the_resize_reads_is_decoded(ext):
    h, w = 480, 640
    data = _jpeg(_textured(h, w, 0))
    out = np.empty((32, 32, 3), np.uint8)
    rows, cols = ext.decode_crop_resize(data, 1, (h, w), (400.0, 300.0, 460.0, 360.0), (32, 32), out)
    # rows: 16 above the 61 read (none below); columns: 16 either side, widened to 16-pixel iMCUs.
    assert rows <= 61 + 16 + 1 and cols <= 61 + 2 * 16 + 2 * 16
    rows, cols = ext.decode_crop_resize(data, 1, (h, w), (0.0, 0.0, float(w), float(h)), (32, 32), out)
    assert (rows, cols) == (h, w)


def test_refusals_are_value_errors(ext):
    data = _jpeg(_textured(64, 64, 0))
    out = np.empty((8, 8, 3), np.uint8)
    crop = ext.decode_crop_resize
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
    with pytest.raises(ValueError, match="out holds 192 bytes, expected 9 x 8 x 3"):
        crop(data, 1, (64, 64), (0.0, 0.0, 64.0, 64.0), (9, 8), out)
    # The transforms fall back to the whole-image path for whatever the extension refuses.
    assert ja._native(data[: len(data) // 2], "YCbCr", 1, 64, 64, (0.0, 0.0, 64.0, 64.0), 8, 8) is None


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (1200, 900), (64, 48)])
def test_transforms_equal_with_and_without_the_extension(shape, monkeypatch, ext):
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
        assert_pillow_equal(a, b)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("box", [(NAN, 0.0, 64.0, 64.0), (0.0, NAN, 64.0, 64.0), (0.0, 0.0, NAN, 64.0),
                                 (0.0, 0.0, 64.0, NAN), (0.0, 0.0, INF, 64.0), (-INF, 0.0, 64.0, 64.0),
                                 (0.0, 0.0, 64.0, 1e300)])  # 1e300 is infinite as a float32
def test_non_finite_boxes_are_refused(ext, box):
    # Every comparison with NaN is false, so the range check alone let NaN through to (int) casts.
    data = _jpeg(_textured(64, 64, 0))
    out = np.empty((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^box must be finite"):
        ext.decode_crop_resize(data, 1, (64, 64), box, (8, 8), out)
    with pytest.raises(ValueError, match=r"^box must be finite"):
        ext.resize(np.zeros((64, 64, 3), np.uint8), (64, 64), box, (8, 8), out)


def test_sizes_below_one_are_refused(ext):
    data = _jpeg(_textured(64, 64, 0))
    image = np.zeros((64, 64, 3), np.uint8)
    box = (0.0, 0.0, 0.0, 0.0)
    # Image sizes: (-1, -1) with 3 bytes and (0, 5) with none match the buffer's length.
    with pytest.raises(ValueError, match=r"^hw must be >= 1 on both sides, got \(-1, -1\)"):
        ext.resize(np.zeros(3, np.uint8), (-1, -1), box, (8, 8), np.empty((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"^hw must be >= 1 on both sides, got \(0, 5\)"):
        ext.resize(np.zeros(0, np.uint8), (0, 5), box, (8, 8), np.empty((8, 8, 3), np.uint8))
    # Output sizes: zero, and two negatives whose product matches the buffer's length.
    for out_hw, out in [((0, 8), np.empty((0, 8, 3), np.uint8)), ((-2, -3), np.empty(18, np.uint8))]:
        with pytest.raises(ValueError, match=r"^out_hw must be >= 1"):
            ext.resize(image, (64, 64), (0.0, 0.0, 64.0, 64.0), out_hw, out)
        with pytest.raises(ValueError, match=r"^out_hw must be >= 1"):
            ext.decode_crop_resize(data, 1, (64, 64), (0.0, 0.0, 64.0, 64.0), out_hw, out)
    with pytest.raises(ValueError, match=r"^scaled_hw must be >= 1"):
        ext.decode_crop_resize(data, 1, (0, 0), box, (8, 8), np.empty((8, 8, 3), np.uint8))


# Runs decode_crop_resize on each case in a fresh interpreter that loads only the extension (no JAX
# import), printing one line per case: a regression that spins or overruns a buffer fails the test
# through the timeout or the exit status instead of hanging or crashing the suite.
_CHILD = """
import importlib.util, pickle, sys
spec = importlib.util.spec_from_file_location("_jpeg_crop", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
with open(sys.argv[2], "rb") as f:
    cases = pickle.load(f)
for label, short, data, d, hw, box, out_hw in cases:
    ext.set_short_reads(*short)
    try:
        ext.decode_crop_resize(data, d, hw, box, out_hw, bytearray(out_hw[0] * out_hw[1] * 3))
        print(label, "returned", flush=True)
    except ValueError as e:
        print(label, "ValueError", e, flush=True)
"""


def _run_isolated(ext, cases, tmp_path) -> dict[str, str]:
    path, log = tmp_path / "cases.pickle", tmp_path / "results.txt"
    path.write_bytes(pickle.dumps(cases))
    with open(log, "w") as stdout:
        try:
            done = subprocess.run([sys.executable, "-c", _CHILD, ext.__file__, str(path)], stdout=stdout,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"decode_crop_resize hung; the cases before: {log.read_text()!r}")
    assert done.returncode == 0, done.stderr
    results = dict(line.split(" ", 1) for line in log.read_text().splitlines())
    assert set(results) == {case[0] for case in cases}
    return results


def test_short_skip_and_stalled_read_raise_instead_of_overrunning_or_spinning(ext, tmp_path):
    # set_short_reads makes libjpeg's skip stop one row short (the rows would then be stored before
    # the buffer) or its read return no row (the read loop would spin with the GIL released).
    data = _jpeg(_textured(64, 64, 0))
    results = _run_isolated(ext, [
        ("skip", (True, False), data, 1, (64, 64), (0.0, 40.0, 64.0, 64.0), (8, 8)),  # reads rows 39..: skips 23
        ("read", (False, True), data, 1, (64, 64), (0.0, 40.0, 64.0, 64.0), (8, 8)),
        ("read-from-top", (False, True), data, 1, (64, 64), (0.0, 0.0, 64.0, 8.0), (8, 8)),  # no skip
        ("normal", (False, False), data, 1, (64, 64), (0.0, 40.0, 64.0, 64.0), (8, 8)),
    ], tmp_path)
    assert results["skip"] == "ValueError libjpeg: jpeg_skip_scanlines stopped at row 22 of 23"
    assert results["read"] == "ValueError libjpeg: jpeg_read_scanlines returned no row at row 23 of 64"
    assert results["read-from-top"] == "ValueError libjpeg: jpeg_read_scanlines returned no row at row 0 of 9"
    assert results["normal"] == "returned"


def _zeroed_scan(data: bytes) -> bytes:
    """The JPEG with every byte from the first scan's data up to the end-of-image marker zeroed."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    return data[:start] + bytes(len(data) - 2 - start) + data[-2:]


DAMAGED_ENCODINGS = [{}, {"progressive": True}, {"restart_marker_blocks": 4}]
BOXES = {"top": (0.0, 0.0, 64.0, 8.0), "bottom": (0.0, 56.0, 64.0, 64.0), "whole": (0.0, 0.0, 64.0, 64.0)}


def test_damaged_jpegs_return_or_raise_never_hang(ext, tmp_path):
    cases = []
    for i, options in enumerate(DAMAGED_ENCODINGS):
        data = _jpeg(_textured(64, 64, i), **options)
        for name, box in BOXES.items():
            cases.append((f"truncated-{i}-{name}", (False, False), data[: len(data) // 2], 1, (64, 64), box, (8, 8)))
            cases.append((f"zeroed-{i}-{name}", (False, False), _zeroed_scan(data), 1, (64, 64), box, (8, 8)))
    results = _run_isolated(ext, cases, tmp_path)
    for label, result in results.items():
        assert result == "returned" or result.startswith("ValueError libjpeg: "), (label, result)
        if label.startswith("truncated"):  # the missing end-of-image marker is refused whatever the box
            assert result == "ValueError libjpeg: no end-of-image marker at the end of the data (truncated?)"
        if label.endswith("whole"):  # zeroed: the decode reaches the marker with scan data left over
            assert result.startswith("ValueError libjpeg: "), (label, result)


def _bad_requests() -> dict[str, tuple]:
    """Bad inputs for the transforms: (function, args, the message's start)."""
    data = _jpeg(_textured(64, 64, 0))
    rng = np.random.default_rng
    return {
        "train-size-0": (lambda: ja.imagenet_train_jpeg(data, rng(0), size=0), "size must be >= 1, got 0"),
        "eval-size-0": (lambda: ja.imagenet_eval_jpeg(data, size=0), "size must be >= 1, got 0"),
        "eval-size-negative": (lambda: ja.imagenet_eval_jpeg(data, size=-3), "size must be >= 1, got -3"),
        "box-nan": (lambda: ja._decode_box_resized(data, (0, 0, NAN, 64), 8, 8), "box must be finite"),
        "box-inf": (lambda: ja._decode_box_resized(data, (0, INF, 64, 64), 8, 8), "box must be finite"),
        "out-w-0": (lambda: ja._decode_box_resized(data, (0, 0, 64, 64), 8, 0), "out_w must be >= 1, got 0"),
        "truncated": (lambda: ja.imagenet_train_jpeg(data[: len(data) // 2], rng(0), size=8), None),
        "truncated-eval": (lambda: ja.imagenet_eval_jpeg(data[: len(data) // 2], size=8), None),
        "zeroed-scan": (lambda: ja._decode_box_resized(_zeroed_scan(data), (0, 0, 64, 64), 8, 8), None),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_input_raises_the_same_error_with_and_without_the_extension(ext, case, monkeypatch):
    call, message = _bad_requests()[case]
    with pytest.raises(ValueError) as native:
        call()
    monkeypatch.setattr(ja, "_jpeg_crop", None)  # QKD_JAX_JPEG_CROP=0: TurboJPEG and Pillow only
    with pytest.raises(ValueError) as fallback:
        call()
    assert str(native.value) == str(fallback.value)
    if message:
        assert str(native.value).startswith(message)
