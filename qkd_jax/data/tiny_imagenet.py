"""Tiny-ImageNet-200 read straight from its unzipped folder (random access, decoded with Pillow).

Layout (as unzipped from http://cs231n.stanford.edu/tiny-imagenet-200.zip into `<data_dir>`):
  <data_dir>/tiny-imagenet-200/wnids.txt
  <data_dir>/tiny-imagenet-200/train/<wnid>/images/<wnid>_<k>.JPEG      (500 per class)
  <data_dir>/tiny-imagenet-200/val/images/val_<k>.JPEG + val/val_annotations.txt (tab separated:
  file name, wnid, box). The unlabelled `test/` folder is not read.
Labels are the positions of the wnids in sorted order (torchvision `ImageFolder` order).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

FOLDER = "tiny-imagenet-200"
SPLITS = ("train", "val")


class TinyImageNetSource:
    """Random-access source with records {'image': uint8 (H, W, 3), 'label': int}."""

    def __init__(self, root: str, split: str):
        if split not in SPLITS:
            raise ValueError(f"tiny_imagenet split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = root, split
        with open(os.path.join(root, "wnids.txt")) as f:
            self.wnids = sorted(line.strip() for line in f if line.strip())
        index = {w: i for i, w in enumerate(self.wnids)}
        if split == "train":
            items = []
            for wnid in self.wnids:
                folder = os.path.join(root, "train", wnid, "images")
                items += [(os.path.join(folder, n), index[wnid])
                          for n in sorted(os.listdir(folder)) if n.endswith(".JPEG")]
        else:
            with open(os.path.join(root, "val", "val_annotations.txt")) as f:
                rows = [line.split("\t") for line in f if line.strip()]
            items = [(os.path.join(root, "val", "images", r[0]), index[r[1]]) for r in sorted(rows)]
        self._paths = [p for p, _ in items]
        self._labels = np.asarray([y for _, y in items], np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image  # Pillow: JPEG decoding

        with Image.open(self._paths[i]) as im:
            image = np.asarray(im.convert("RGB"))  # a few Tiny-ImageNet JPEGs are greyscale
        return {"image": image, "label": int(self._labels[i])}

    def __repr__(self) -> str:
        return f"TinyImageNetSource(root={self.root!r}, split={self.split!r}, n={len(self)})"


def is_present(root: str) -> bool:
    """Whether `root` looks like an unzipped tiny-imagenet-200 folder."""
    return all(os.path.exists(os.path.join(root, p))
               for p in ("wnids.txt", "train", os.path.join("val", "val_annotations.txt")))
