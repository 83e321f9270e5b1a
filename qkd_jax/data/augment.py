"""Image augmentation in NumPy (+ Pillow for resizing), pure given the `np.random.Generator`.

Geometry works on uint8 (H, W, C) arrays and returns uint8; `normalize` makes the float32
model input. Semantics follow torchvision (the papers' code): RandomCrop(32, padding=4) with
zero fill, RandomHorizontalFlip, RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) with
bilinear antialiased resizing, Resize(short side) + CenterCrop for evaluation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

AUGMENTS = ("cifar", "imagenet", "digits", "none")
Box = tuple[int, int, int, int]  # top, left, height, width


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 -> float32 `(image / 255 - mean) / std`, per channel."""
    mean_ = np.asarray(mean, np.float32)
    std_ = np.asarray(std, np.float32)
    return (image.astype(np.float32) / np.float32(255.0) - mean_) / std_


def flip_lr(image: np.ndarray) -> np.ndarray:
    """Mirror left-right (axis 1 of HWC)."""
    return image[:, ::-1]


def pad_and_crop(image: np.ndarray, rng: np.random.Generator, *, pad: int,
                 size: int | None = None) -> np.ndarray:
    """Zero-pad `pad` pixels on each side, then crop a random `size` square (default: input size)."""
    h, w = image.shape[:2]
    sh, sw = (h, w) if size is None else (size, size)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top = int(rng.integers(0, h + 2 * pad - sh + 1))
    left = int(rng.integers(0, w + 2 * pad - sw + 1))
    return padded[top:top + sh, left:left + sw]


def cifar_train(image: np.ndarray, rng: np.random.Generator, *, pad: int = 4,
                size: int | None = None) -> np.ndarray:
    """CIFAR recipe: pad 4 + random crop + horizontal flip with probability 1/2."""
    out = pad_and_crop(image, rng, pad=pad, size=size)
    return flip_lr(out) if rng.random() < 0.5 else out


def digits_train(image: np.ndarray, rng: np.random.Generator, *, max_shift: int = 2) -> np.ndarray:
    """Random translation by up to `max_shift` pixels per axis (zero fill); no flip for digits."""
    return pad_and_crop(image, rng, pad=max_shift)


def sample_crop_box(height: int, width: int, rng: np.random.Generator, *,
                    scale: tuple[float, float] = (0.08, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """torchvision `RandomResizedCrop.get_params`: 10 tries, then the central crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: np.ndarray, height: int, width: int, box: Box | None = None) -> np.ndarray:
    """Bilinear antialiased resize (Pillow) of `image`, or of its `box` region, to (height, width)."""
    from PIL import Image

    pil_box = None if box is None else (box[1], box[0], box[1] + box[3], box[0] + box[2])
    channels = [image] if image.shape[2] == 3 else [image[..., c] for c in range(image.shape[2])]
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize(
        (width, height), Image.Resampling.BILINEAR, box=pil_box)) for c in channels]
    return out[0] if image.shape[2] == 3 else np.stack(out, axis=-1)


def imagenet_train(image: np.ndarray, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """Random resized crop to `size` x `size` + horizontal flip with probability 1/2."""
    box = sample_crop_box(image.shape[0], image.shape[1], rng)
    out = resize(image, size, size, box)
    return flip_lr(out) if rng.random() < 0.5 else out


def resize_short_side(image: np.ndarray, short: int) -> np.ndarray:
    """Resize so the shorter side is `short` (long side truncated as torchvision does)."""
    h, w = image.shape[:2]
    if h <= w:
        return resize(image, short, int(short * w / h))
    return resize(image, int(short * h / w), short)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Central `size` x `size` crop (offsets rounded as torchvision `CenterCrop`)."""
    h, w = image.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image[top:top + size, left:left + size]


def imagenet_eval(image: np.ndarray, *, size: int) -> np.ndarray:
    """Resize the short side to round(size * 256 / 224), then centre-crop `size`."""
    return center_crop(resize_short_side(image, int(round(size * 256 / 224))), size)


def _keep(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    del rng
    return image


def train_transform(kind: str, image_size: int | None = None
                    ) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """uint8 geometry of a training example for augmentation `kind` (picklable, see `AUGMENTS`)."""
    if kind == "cifar":
        return functools.partial(cifar_train, size=image_size)
    if kind == "imagenet":
        return functools.partial(imagenet_train, size=image_size or 224)
    if kind == "digits":
        return digits_train
    if kind == "none":
        return _keep
    raise ValueError(f"unknown augment {kind!r}; expected one of {AUGMENTS}")


def eval_transform(kind: str, image_size: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 geometry of an evaluation example: ImageNet-style resize + centre crop, else identity."""
    if kind == "imagenet":
        return functools.partial(imagenet_eval, size=image_size or 224)
    if kind in AUGMENTS:
        return _keep
    raise ValueError(f"unknown augment {kind!r}; expected one of {AUGMENTS}")
