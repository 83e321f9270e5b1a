"""ImageNet augmentation straight from the stored JPEG bytes: decode only the scale the crop needs.

Same semantics as `augment.imagenet_train` / `augment.imagenet_eval` (the crop box comes from
`augment.sample_crop_box` with the same generator draws, then a bilinear antialiased resize and a
flip drawn as `rng.random() < 0.5`), but:

- the image size is read from the JPEG header (`PIL.Image.open` parses only the header);
- when the crop is larger than the output, `Image.draft` asks libjpeg for a DCT-scaled decode
  (1/2, 1/4 or 1/8 per side, the largest reduction that keeps the crop at least the output
  size on both sides), and the box is mapped onto that smaller image;
- the result stays uint8 (normalise on the accelerator: `device_normalize.normalize`).

The DCT-scaled decode averages 2x2 .. 8x8 blocks before the bilinear filter, so the output is
close to, not bit-equal to, the full-decode path (tests/data/test_jpeg_augment.py states the
tolerance on smooth images). A record whose 'image' is already a decoded array (e.g. a source
that does not keep the JPEG bytes) takes the reference geometry and stays uint8.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable

import numpy as np

from qkd_jax.data import augment as aug

Image = np.ndarray
Encoded = bytes | Image


def _open(data: bytes):
    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(data))


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image, from its header (no pixel is decoded)."""
    with _open(data) as im:
        width, height = im.size
    return height, width


def _decode_box_resized(data: bytes, box: aug.Box, out_h: int, out_w: int) -> Image:
    """The region `box` (top, left, h, w; full-resolution pixels) resized to (out_h, out_w), uint8 RGB."""
    top, left, h, w = box
    with _open(data) as im:
        full_w, full_h = im.size
        # Ask for the smallest decode in which the crop still covers the output on both sides;
        # draft picks the largest DCT reduction whose size is >= the requested size.
        want = (min(full_w, math.ceil(full_w * out_w / w)), min(full_h, math.ceil(full_h * out_h / h)))
        im.draft("RGB", want)
        if im.mode != "RGB":
            im = im.convert("RGB")
        dw, dh = im.size
        sx, sy = dw / full_w, dh / full_h
        pil_box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        from PIL import Image as PILImage

        return np.asarray(im.resize((out_w, out_h), PILImage.BILINEAR, box=pil_box))


def imagenet_train_jpeg(data: Encoded, rng: np.random.Generator, *, size: int) -> Image:
    """Random resized crop to `size` x `size` + flip with probability 1/2, from JPEG bytes (uint8 out)."""
    if isinstance(data, np.ndarray):  # already decoded: the reference geometry
        return aug.imagenet_train(data, rng, size=size)
    height, width = jpeg_size(data)
    box = aug.sample_crop_box(height, width, rng)
    out = _decode_box_resized(data, box, size, size)
    return aug.flip_lr(out) if rng.random() < 0.5 else out


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
    if isinstance(data, np.ndarray):
        return aug.imagenet_eval(data, size=size)
    height, width = jpeg_size(data)
    (ct, cl, rh, rw), _ = eval_box(height, width, size)
    with _open(data) as im:
        im.draft("RGB", (min(width, rw), min(height, rh)))
        if im.mode != "RGB":
            im = im.convert("RGB")
        dw, dh = im.size
        sx, sy = dw / rw, dh / rh  # decoded pixels per resized pixel
        pil_box = (cl * sx, ct * sy, (cl + size) * sx, (ct + size) * sy)
        from PIL import Image as PILImage

        return np.asarray(im.resize((size, size), PILImage.BILINEAR, box=pil_box))


def train_transform(image_size: int | None = None) -> Callable[[Encoded, np.random.Generator], Image]:
    """Picklable training transform of encoded ImageNet records (see `imagenet_train_jpeg`)."""
    return functools.partial(imagenet_train_jpeg, size=image_size or 224)


def eval_transform(image_size: int | None = None) -> Callable[[Encoded], Image]:
    """Picklable evaluation transform of encoded ImageNet records (see `imagenet_eval_jpeg`)."""
    return functools.partial(imagenet_eval_jpeg, size=image_size or 224)
