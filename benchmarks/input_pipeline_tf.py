"""tf.data ImageNet training input (the flax ImageNet example's pipeline) on a folder of JPEGs.

Runs in .bench-venv/ (bash benchmarks/tf_venv.sh), called by benchmarks/input_pipeline.py --tf;
prints one JSON row (same keys as the grain rows). TensorFlow is not a qkd_jax dependency.

The preprocessing is flax examples/imagenet/input_pipeline.py: `sample_distorted_bounding_box`
(area 0.08..1, aspect 3/4..4/3, 10 attempts, whole image as the bounding box), `decode_and_crop_jpeg`,
bicubic resize to `--size`, random flip, float normalisation; here its output is cast back to uint8
after the resize so the work matches the grain rows (normalisation is on the device there).
`--threads` bounds the pipeline's private thread pool (1 or 2 cores).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tensorflow as tf
from cpu_time import tree_cpu_seconds


def distorted_bounding_box_crop(image_bytes, bbox, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
                                area_range=(0.08, 1.0), max_attempts=10):
    """flax examples/imagenet: sample a box and decode only its region."""
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=bbox, min_object_covered=min_object_covered,
        aspect_ratio_range=aspect_ratio_range, area_range=area_range, max_attempts=max_attempts,
        use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    target_height, target_width, _ = tf.unstack(size)
    crop_window = tf.stack([offset_y, offset_x, target_height, target_width])
    return tf.image.decode_and_crop_jpeg(image_bytes, crop_window, channels=3)


def _at_least_x_are_equal(a, b, x):
    return tf.greater_equal(tf.reduce_sum(tf.cast(tf.equal(a, b), tf.int32)), x)


def decode_and_random_crop(image_bytes, image_size):
    """flax examples/imagenet `_decode_and_random_crop` (centre-crop fallback when sampling fails)."""
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    image = distorted_bounding_box_crop(image_bytes, bbox)
    original_shape = tf.io.extract_jpeg_shape(image_bytes)
    bad = _at_least_x_are_equal(original_shape, tf.shape(image), 3)
    return tf.cond(bad, lambda: _decode_and_center_crop(image_bytes, image_size),
                   lambda: tf.image.resize([image], [image_size, image_size], method="bicubic")[0])


def _decode_and_center_crop(image_bytes, image_size, crop_padding=32):
    shape = tf.io.extract_jpeg_shape(image_bytes)
    h, w = shape[0], shape[1]
    padded = tf.cast(((image_size / (image_size + crop_padding)) * tf.cast(tf.minimum(h, w), tf.float32)),
                     tf.int32)
    oy, ox = ((h - padded) + 1) // 2, ((w - padded) + 1) // 2
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([oy, ox, padded, padded]), channels=3)
    return tf.image.resize([image], [image_size, image_size], method="bicubic")[0]


def preprocess_for_train(image_bytes, image_size):
    image = decode_and_random_crop(image_bytes, image_size)
    image = tf.image.random_flip_left_right(image)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jpeg_dir", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    files = sorted(glob.glob(os.path.join(args.jpeg_dir, "*.JPEG")))
    if not files:
        raise SystemExit(f"no *.JPEG under {args.jpeg_dir}; run benchmarks/input_pipeline.py first")
    data = []
    for name in files:
        with open(name, "rb") as f:
            data.append(f.read())
    ds = tf.data.Dataset.from_tensor_slices(data).repeat().shuffle(len(data), seed=0)
    ds = ds.map(lambda b: preprocess_for_train(b, args.size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(args.batch, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = args.threads
    options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    it = iter(ds)
    t_start = time.perf_counter()
    first = next(it)
    startup = time.perf_counter() - t_start
    cpu0, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
    for _ in range(args.batches):
        out = next(it)
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds(os.getpid()) - cpu0
    images = args.batches * args.batch
    print(json.dumps({"pipeline": "tf.data", "path": f"tf{tf.__version__}", "workers": f"{args.threads}thr",
                      "images": images, "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall,
                      "images_per_cpu_s": images / cpu, "cores_busy": cpu / wall, "first_batch_s": startup,
                      "dtype": out.dtype.name, "shape": list(first.shape)}))


if __name__ == "__main__":
    main()
