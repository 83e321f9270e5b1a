"""Helpers for the data tests: a synthetic source whose images encode their own index."""

from __future__ import annotations

import numpy as np


class IndexSource:
    """`n` records; image i is HxWx3 uint8 with channel 0 = i % 256, 1 = i // 256, 2 = 7; label i % 10."""

    def __init__(self, n: int, size: int = 16):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        image = np.empty((self.size, self.size, 3), np.uint8)
        image[..., 0], image[..., 1], image[..., 2] = i % 256, i // 256, 7
        return {"image": image, "label": i % 10}


def decode_index(images: np.ndarray) -> np.ndarray:
    """Index of each image of an IndexSource batch normalised with mean 0, std 1.

    Reads the centre pixel, which pad-4 crops and flips of 16x16 images never move off the image.
    """
    c = images.shape[1] // 2
    raw = np.rint(images[:, c, c, :] * 255).astype(np.int64)
    return raw[:, 0] + 256 * raw[:, 1]
