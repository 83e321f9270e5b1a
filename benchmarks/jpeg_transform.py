"""Per-image CPU time of the JPEG training and eval transforms, with and without the cropped-decode
extension (not a test).

    python benchmarks/jpeg_transform.py --jpeg_dir=bench-data/jpeg --images=600 --passes=4

Runs `jpeg_augment.imagenet_train_jpeg` (224 px random resized crop + flip) and
`imagenet_eval_jpeg` over the same JPEG files, once through `qkd_jax.data._jpeg_crop` (decode only
what the resize reads, resize in C) and once through the whole-image path (TurboJPEG decode of the
whole image at the crop's DCT scale, Pillow's resize), the two interleaved pass by pass so both see
the same machine load; prints the best pass's process CPU milliseconds per image and checks that
both give the same bytes. The JPEGs are those benchmarks/input_pipeline.py writes (run it first,
or point --jpeg_dir at any JPEG folder).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, ROOT)

from benchmarks import synthetic_imagenet


def _pass(fn: Callable[[bytes, int], object], datas: list[bytes]) -> tuple[float, list]:
    start = time.process_time()
    outs = [fn(data, i) for i, data in enumerate(datas)]
    return time.process_time() - start, outs


def main(argv: list[str] | None = None) -> dict[str, float]:
    import numpy as np

    from qkd_jax.data import jpeg_augment as ja

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jpeg_dir", default=os.path.join(ROOT, "bench-data", "jpeg"))
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    if not ja.native_available():
        p.error("the qkd_jax.data._jpeg_crop extension is not built (pip install -e . with a C compiler and "
                "libjpeg headers, e.g. Debian's libjpeg62-turbo-dev)")
    try:
        datas = synthetic_imagenet.read_jpegs(args.jpeg_dir, args.images)
    except FileNotFoundError as err:
        p.error(str(err))
    transforms = {
        "train": lambda d, i: ja.imagenet_train_jpeg(d, np.random.default_rng(i), size=args.size),
        "eval": lambda d, i: ja.imagenet_eval_jpeg(d, size=args.size),
    }
    extension = ja._jpeg_crop
    best: dict[str, float] = {}
    for name, fn in transforms.items():
        for _ in range(args.passes):
            outs = {}
            for path, module in (("crop", extension), ("whole", None)):
                ja._jpeg_crop = module
                try:
                    seconds, outs[path] = _pass(fn, datas)
                finally:
                    ja._jpeg_crop = extension
                key = f"{name} {path}"
                best[key] = min(best.get(key, math.inf), seconds / len(datas) * 1e3)
            if not all(np.array_equal(a, b) for a, b in zip(outs["crop"], outs["whole"])):
                raise AssertionError(f"{name}: the extension's output differs from the whole-image path's")
    for key, ms in best.items():
        print(f"{key:<12} {ms:6.3f} ms/image")
    for name in transforms:
        print(f"{name}: whole / crop = {best[f'{name} whole'] / best[f'{name} crop']:.2f}")
    return best


if __name__ == "__main__":
    main()
