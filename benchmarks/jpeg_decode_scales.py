"""Per-image CPU time of JPEG decodes at each libjpeg-turbo DCT scale M/8 (not a test).

    python benchmarks/jpeg_decode_scales.py --jpeg_dir=bench-data/jpeg --images=300

Why `jpeg_augment` only uses the 1/2, 1/4 and 1/8 reductions: TurboJPEG can decode at any M/8
(M = 1..8), but M = 5, 6, 7 (the ones a 224 px crop from a ~500 px image would take) measured
slower than the full decode, more than the smaller resize they leave saves. Prints, per M,
the best of 3 passes of process CPU time per image (TurboJPEG via simplejpeg, accurate IDCT and
fancy upsampling), and Pillow's full decode for comparison. The JPEGs are those that
benchmarks/input_pipeline.py writes (run it first, or point --jpeg_dir at any JPEG folder).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, ROOT)

from benchmarks import synthetic_imagenet


def per_image_ms(fn: Callable[[bytes], object], datas: list[bytes], passes: int = 3) -> float:
    """Best-of-`passes` process CPU milliseconds per image of `fn` over `datas`."""
    best = math.inf
    for _ in range(passes):
        start = time.process_time()
        for data in datas:
            fn(data)
        best = min(best, time.process_time() - start)
    return best / len(datas) * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    import numpy as np
    import simplejpeg
    from PIL import Image

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jpeg_dir", default=os.path.join("bench-data", "jpeg"))
    p.add_argument("--images", type=int, default=300)
    args = p.parse_args(argv)
    try:
        datas = synthetic_imagenet.read_jpegs(args.jpeg_dir, args.images)
    except FileNotFoundError as err:
        p.error(str(err))
    rows = {"pillow full": per_image_ms(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), datas)}
    for m in range(1, 9):
        def decode(data: bytes, m: int = m) -> np.ndarray:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=math.ceil(height * m / 8),
                                          min_width=math.ceil(width * m / 8))
        rows[f"turbo {m}/8"] = per_image_ms(decode, datas)
    for name, ms in rows.items():
        print(f"{name:<12} {ms:6.3f} ms/image")
    return rows


if __name__ == "__main__":
    main()
