"""ImageNet augmentation straight from the stored JPEG bytes: decode only the scale the crop needs.

Same semantics as `augment.imagenet_train` / `augment.imagenet_eval` (the crop box comes from
`augment.sample_crop_box` with the same generator draws, then a bilinear antialiased resize and a
flip drawn as `rng.random() < 0.5`), but:

- the image size and colour space are read from the JPEG header (`simplejpeg.decode_jpeg_header`);
- the JPEG is decoded by TurboJPEG (`simplejpeg`, libjpeg-turbo with the accurate IDCT and fancy
  upsampling, bit-identical to Pillow's full decode but straight into an RGB array); when the crop
  is at least twice the output on both sides it is decoded at 1/2, 1/4 or 1/8 scale per side (the
  largest reduction that keeps the crop at least the output size) and the box is mapped onto that
  smaller image at exactly 1/d. libjpeg-turbo's other scales M/8 decode slowly (5/8 .. 7/8
  measured slower than the full decode, benchmarks/jpeg_decode_scales.py) and are not used.
  CMYK/YCCK JPEGs, whose RGB conversion TurboJPEG does differently, and anything it cannot read go
  through Pillow;
- the result stays uint8 (normalise on the accelerator: `device_normalize.normalize`);
- where the optional C extension `_jpeg_crop` was built (setup.py: a C compiler and libjpeg-turbo
  headers), one call decodes only the region the resize reads (libjpeg's `jpeg_crop_scanline` /
  `jpeg_skip_scanlines`, at the same DCT scale) and resizes it with Pillow's bilinear arithmetic
  reproduced exactly: the output equals the whole-image path's bit for bit
  (tests/data/test_jpeg_crop.py) at about half the CPU time (benchmarks/input_pipeline.py).
  Anything it refuses (a corrupt file, an unexpected scaled size) takes the whole-image path.

Bad arguments (a size below 1, a box with a NaN or infinite coordinate) raise ValueError naming the
argument before either path runs, and a corrupt or truncated JPEG that the whole image needs raises
ValueError on both (the extension's refusal falls back to TurboJPEG, which refuses it too).

The DCT-scaled decode averages 2x2 .. 8x8 blocks before the bilinear filter, so the output is
close to, not bit-equal to, the full-decode path (tests/data/test_jpeg_augment.py states the
tolerance on smooth images). A record whose 'image' is already a decoded array (e.g. a source
that does not keep the JPEG bytes) takes the reference geometry and stays uint8.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Callable

import numpy as np

from qkd_jax.data import augment as aug

try:
    from qkd_jax.data import _jpeg_crop
except ImportError:  # built without a C compiler or libjpeg headers: whole-image decodes
    _jpeg_crop = None
# QKD_JAX_JPEG_CROP=0 turns the extension off (benchmarks compare both paths; worker processes
# inherit the environment).
if os.environ.get("QKD_JAX_JPEG_CROP", "1") == "0":
    _jpeg_crop = None

Image = np.ndarray
Encoded = bytes | Image


def native_available() -> bool:
    """Whether the cropped-decode extension was built (else every image is decoded whole)."""
    return _jpeg_crop is not None


def _open(data: bytes):
    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(data))


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image, from its header (no pixel is decoded)."""
    with _open(data) as im:
        width, height = im.size
    return height, width


# Colour spaces TurboJPEG decodes to RGB the way Pillow does; CMYK/YCCK go through Pillow.
_TURBO_SPACES = ("YCbCr", "Gray", "RGB")


def _check_size(name: str, value: int) -> None:
    """Refuse an output size below 1 (Pillow would refuse it late, the eval geometry divides by it)."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_box(box: aug.Box) -> None:
    """Refuse a box with a NaN or infinite coordinate: every comparison with NaN is false, so it
    would pass the range checks downstream."""
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"box must be finite, got {tuple(box)}")


def _reduction(full_h: int, full_w: int, crop_h: float, crop_w: float, out_h: int, out_w: int) -> int:
    """Largest DCT reduction d in (8, 4, 2, 1) keeping the crop >= the output on both sides.

    Only 1/2, 1/4 and 1/8: libjpeg-turbo's M/8 scales with M = 5..7 measured slower than a full
    decode (benchmarks/jpeg_decode_scales.py).
    """
    for d in (8, 4, 2):
        if crop_w / d >= out_w and crop_h / d >= out_h and full_w >= d and full_h >= d:
            return d
    return 1


def _pillow_reduced(data: bytes, d: int) -> np.ndarray:
    """Pillow decode at 1/d scale (draft), RGB: the path for what TurboJPEG does not decode."""
    with _open(data) as im:
        full_w, full_h = im.size
        im.draft("RGB", (math.ceil(full_w / d), math.ceil(full_h / d)))
        if im.mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im)


def _decode_reduced(data: bytes, full_h: int, full_w: int, d: int, space: str | None) -> tuple[np.ndarray, float]:
    """RGB uint8 decode at about 1/d scale, and the decoded pixels per full-resolution pixel."""
    if space in _TURBO_SPACES:
        import simplejpeg

        image = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(full_h / d),
                                       min_width=math.ceil(full_w / d))
    else:
        image = _pillow_reduced(data, d)
    # TurboJPEG and libjpeg both give ceil(size / d); the IDCT maps 8 pixels to 8 / d.
    if image.shape[:2] != (math.ceil(full_h / d), math.ceil(full_w / d)):
        return image, image.shape[1] / full_w
    return image, 1.0 / d


def _header(data: bytes) -> tuple[int, int, str | None]:
    """(height, width, colour space) from the JPEG header; colour space None when TurboJPEG refuses it."""
    import simplejpeg

    try:
        height, width, space, _ = simplejpeg.decode_jpeg_header(data)
        return height, width, space
    except ValueError:  # not a baseline/progressive JPEG TurboJPEG reads: Pillow opens it
        height, width = jpeg_size(data)
        return height, width, None


def _native(data: bytes, space: str | None, d: int, full_h: int, full_w: int,
            box: tuple[float, float, float, float], out_h: int, out_w: int, flip: bool = False) -> Image | None:
    """`box` (Pillow's (x0, y0, x1, y1) on the 1/d-scale image) resized by the extension (mirrored
    if `flip`, in the same call: a separate strided copy of the flipped array cost about a fifth
    of the transform), or None where it is not built or refuses the file (the caller then decodes
    the whole image)."""
    if _jpeg_crop is None or space not in _TURBO_SPACES:
        return None
    out = np.empty((out_h, out_w, 3), np.uint8)
    try:
        _jpeg_crop.decode_crop_resize(data, d, (math.ceil(full_h / d), math.ceil(full_w / d)), box, (out_h, out_w),
                                      out, flip)
    except ValueError:
        return None
    return out


def _decode_box_resized(data: bytes, box: aug.Box, out_h: int, out_w: int,
                        header: tuple[int, int, str | None] | None = None, flip: bool = False) -> Image:
    """The region `box` (top, left, h, w; full-resolution pixels) resized to (out_h, out_w), uint8
    RGB, mirrored left-right if `flip`."""
    from PIL import Image as PILImage

    _check_box(box)
    _check_size("out_h", out_h)
    _check_size("out_w", out_w)
    top, left, h, w = box
    full_h, full_w, space = header or _header(data)
    d = _reduction(full_h, full_w, h, w, out_h, out_w)
    dh, dw, s = math.ceil(full_h / d), math.ceil(full_w / d), 1.0 / d
    native = _native(data, space, d, full_h, full_w,
                     (min(left * s, dw), min(top * s, dh), min((left + w) * s, dw), min((top + h) * s, dh)),
                     out_h, out_w, flip)
    if native is not None:
        return native
    image, s = _decode_reduced(data, full_h, full_w, d, space)
    dh, dw = image.shape[:2]
    pil_box = (min(left * s, dw), min(top * s, dh), min((left + w) * s, dw), min((top + h) * s, dh))
    out = np.asarray(PILImage.fromarray(image).resize((out_w, out_h), PILImage.Resampling.BILINEAR, box=pil_box))
    return aug.flip_lr(out) if flip else out


def imagenet_train_jpeg(data: Encoded, rng: np.random.Generator, *, size: int) -> Image:
    """Random resized crop to `size` x `size` + flip with probability 1/2, from JPEG bytes (uint8 out)."""
    _check_size("size", size)
    if isinstance(data, np.ndarray):  # already decoded: the reference geometry
        return aug.imagenet_train(data, rng, size=size)
    header = _header(data)
    box = aug.sample_crop_box(header[0], header[1], rng)
    flip = rng.random() < 0.5  # drawn right after the box, as the reference does (the decode draws nothing)
    return _decode_box_resized(data, box, size, size, header, flip)


def eval_box(height: int, width: int, size: int) -> tuple[aug.Box, tuple[int, int]]:
    """The full-resolution box that `augment.imagenet_eval` keeps, and the size it is resized to.

    `imagenet_eval` resizes to (rh, rw) (short side round(size * 256 / 224), long side truncated)
    and takes the central `size` square at (ct, cl); resizing the box
    (ct * h / rh, cl * w / rw, size * h / rh, size * w / rw) to `size` samples the same points.
    Returned as ((ct, cl, rh, rw), (size, size)): the crop offsets in resized pixels and the
    resized image shape, from which `_decode_eval` maps the box.
    """
    short = round(size * 256 / 224)
    rh, rw = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
    ct, cl = round((rh - size) / 2.0), round((rw - size) / 2.0)
    return (ct, cl, rh, rw), (size, size)


def imagenet_eval_jpeg(data: Encoded, *, size: int) -> Image:
    """`augment.imagenet_eval` (resize short side to round(size*256/224), centre crop) from JPEG bytes."""
    _check_size("size", size)
    if isinstance(data, np.ndarray):
        return aug.imagenet_eval(data, size=size)
    height, width, space = _header(data)
    (ct, cl, rh, rw), _ = eval_box(height, width, size)
    fy, fx = height / rh, width / rw  # full-resolution pixels per resized pixel
    d = _reduction(height, width, size * fy, size * fx, size, size)
    s = 1.0 / d
    native = _native(data, space, d, height, width,
                     (cl * fx * s, ct * fy * s, (cl + size) * fx * s, (ct + size) * fy * s), size, size)
    if native is not None:
        return native
    image, s = _decode_reduced(data, height, width, d, space)
    from PIL import Image as PILImage

    pil_box = (cl * fx * s, ct * fy * s, (cl + size) * fx * s, (ct + size) * fy * s)
    return np.asarray(PILImage.fromarray(image).resize((size, size), PILImage.Resampling.BILINEAR, box=pil_box))


def train_transform(image_size: int | None = None) -> Callable[[Encoded, np.random.Generator], Image]:
    """Picklable training transform of encoded ImageNet records (see `imagenet_train_jpeg`)."""
    return functools.partial(imagenet_train_jpeg, size=image_size or 224)


def eval_transform(image_size: int | None = None) -> Callable[[Encoded], Image]:
    """Picklable evaluation transform of encoded ImageNet records (see `imagenet_eval_jpeg`)."""
    return functools.partial(imagenet_eval_jpeg, size=image_size or 224)
