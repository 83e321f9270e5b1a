"""Synthetic ImageNet-like JPEGs stored as a prepared tfds `imagenet2012` (ArrayRecord), no TensorFlow.

The files are the layout `tfds build imagenet2012 --file_format=array_record` writes
(`<data_dir>/imagenet2012/5.1.0/imagenet2012-train.array_record-*`, dataset_info.json,
features.json), written by tfds's own ImageNet builder class with its example generator
replaced, so `qkd_jax.data.get_source('imagenet2012', 'train', data_dir)` reads them with the
same reader code as the real dataset. The same JPEG bytes are also written to
`<data_dir>/jpeg/<i>.JPEG` for the tf.data comparison (benchmarks/input_pipeline_tf.py).

Content: smooth noise (a coarse random grid upsampled bicubically) plus a few filled ellipses
and rectangles, light pixel noise; sizes around 500x375 (landscape or portrait, each side
varied), JPEG quality 90, labels cycling over the first classes of ImageNet's label list.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

VERSION_DIR = os.path.join("imagenet2012", "5.1.0")


def synthetic_image(rng: np.random.Generator) -> np.ndarray:
    """One natural-looking uint8 RGB image of about 500x375 (either orientation)."""
    long_side, short_side = int(rng.integers(400, 601)), int(rng.integers(300, 451))
    w, h = (long_side, short_side) if rng.random() < 0.75 else (short_side, long_side)
    coarse = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _builder_class():
    import tensorflow_datasets as tfds
    from etils import epath
    from tensorflow_datasets.datasets.imagenet2012 import (
        imagenet2012_dataset_builder as ib,
    )

    class SyntheticImagenet2012(ib.Builder, skip_registration=True):
        """tfds's imagenet2012 builder (same name, version, features) fed synthetic JPEGs."""

        name = "imagenet2012"
        pkg_dir_path = epath.Path(ib.__file__).parent

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls) -> epath.Path:  # tfds's default needs the undeclared importlib_resources
            return epath.Path(ib.__file__)

        def __init__(self, *, examples: dict[str, list[tuple[str, bytes, str]]], **kw):
            self._examples = examples
            super().__init__(**kw)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split, rows in self._examples.items() if rows}

        def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
            for file_name, data, wnid in self._examples[split]:
                yield file_name, {"image": data, "label": wnid, "file_name": file_name}

    return SyntheticImagenet2012


def write_dataset(data_dir: str, num_images: int, seed: int = 0, num_classes: int = 10,
                  quality: int = 90, val_images: int = 0) -> list[tuple[int, int]]:
    """Writes `num_images` synthetic JPEGs as the 'train' split of `imagenet2012` under `data_dir`
    (and `val_images` more as its 'validation' split, not in `jpeg/`).

    Returns the (height, width) of each training image, by the number in its file name. An existing dataset of the
    same size and seed is kept (its sizes are read back from `<data_dir>/jpeg/sizes.json`).
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    meta_path = os.path.join(data_dir, "jpeg", "sizes.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["num_images"] == num_images and meta["seed"] == seed and meta["quality"] == quality:
            return [tuple(s) for s in meta["sizes"]]
        raise FileExistsError(f"{data_dir} holds another synthetic dataset ({meta_path}); "
                              f"use an empty --data_dir")
    with open(imagenet_common.label_names_file()) as f:
        wnids = f.read().split()[:num_classes]
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(data_dir, "jpeg"), exist_ok=True)
    examples, sizes = [], []
    for i in range(num_images):
        image = synthetic_image(rng)
        data = encode_jpeg(image, quality)
        wnid = wnids[i % len(wnids)]
        examples.append((f"{wnid}_{i:06d}.JPEG", data, wnid))
        with open(os.path.join(data_dir, "jpeg", f"{i:06d}.JPEG"), "wb") as f:
            f.write(data)
        sizes.append(image.shape[:2])
    val = []
    for i in range(val_images):
        wnid = wnids[i % len(wnids)]
        val.append((f"ILSVRC2012_val_{i + 1:08d}.JPEG", encode_jpeg(synthetic_image(rng), quality), wnid))
    builder = _builder_class()(examples={"train": examples, "validation": val}, data_dir=data_dir,
                               file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    with open(meta_path, "w") as f:
        json.dump({"num_images": num_images, "seed": seed, "quality": quality,
                   "sizes": [list(s) for s in sizes]}, f)
    return sizes


def read_jpegs(jpeg_dir: str, limit: int) -> list[bytes]:
    """The bytes of the first `limit` .JPEG/.jpg files of `jpeg_dir` (sorted by name), for the
    per-image benchmarks; FileNotFoundError naming how to make them when there are none."""
    files = sorted(glob.glob(os.path.join(jpeg_dir, "*.JPEG")) + glob.glob(os.path.join(jpeg_dir, "*.jpg")))
    if not files:
        raise FileNotFoundError(f"no .JPEG/.jpg files in {jpeg_dir}; run benchmarks/input_pipeline.py first "
                                f"or pass --jpeg_dir")
    datas = []
    for path in files[:limit]:
        with open(path, "rb") as f:
            datas.append(f.read())
    return datas
