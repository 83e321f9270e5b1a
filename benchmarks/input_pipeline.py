"""ImageNet training-input benchmark: grain old path vs new path, 0/1/2 workers, and tf.data (not a test).

    python benchmarks/input_pipeline.py                       # 2000 synthetic JPEGs, grain rows
    python benchmarks/input_pipeline.py --tf                  # + tf.data rows (bash benchmarks/tf_venv.sh first)
    python benchmarks/input_pipeline.py --images=200 --batches=4 --out=bench.json

Writes `--images` synthetic ImageNet-like JPEGs (benchmarks/synthetic_imagenet.py) as a
prepared tfds `imagenet2012` under `--data_dir` and reads them back through
`qkd_jax.data.get_source('imagenet2012', 'train', data_dir)`, the runner's reader. Rows:

- grain old: decoded records (full Pillow decode in the reader), `augment.imagenet_train`,
  float32 normalised on the host: the path every ImageNet run took before `data.jpeg`;
- grain new: JPEG bytes (`get_source(..., encoded=True)`), `jpeg_augment.imagenet_train_jpeg`
  (header size, DCT-scaled decode of the whole image, Pillow's resize of the crop), uint8 out,
  with the cropped-decode extension turned off (QKD_JAX_JPEG_CROP=0);
- grain crop: the same with the extension `qkd_jax.data._jpeg_crop` (decode only the rows and
  columns the resize reads, resize in C with Pillow's arithmetic: the same output bytes), the
  path the ImageNet configs take where the extension was built;
- tf.data (`--tf`): the flax ImageNet example's training pipeline
  (`tf.image.sample_distorted_bounding_box` + `decode_and_crop_jpeg`, bicubic resize, flip) on the
  same JPEG bytes, in `.bench-venv/` (benchmarks/input_pipeline_tf.py), with 1 and 2 threads.

Each row runs in its own process: one warm-up batch (worker start-up, first decode), then
`--batches` batches of `--batch` images at `--size` px are timed. Reported: images/s (wall) and
images per CPU-second (user + system time of the process and its worker processes over the
timed batches, read from /proc): the per-core figure, which does not depend on what else the
machine runs, and the cores the row kept busy. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, ROOT)

from benchmarks import synthetic_imagenet
from benchmarks.cpu_time import tree_cpu_seconds

TF_PYTHON = os.path.join(ROOT, ".bench-venv", "bin", "python")
TF_SCRIPT = os.path.join(ROOT, "benchmarks", "input_pipeline_tf.py")


def grain_row(data_dir: str, path: str, workers: int, batch: int, batches: int, size: int) -> dict:
    """Times one grain configuration in this process (run it in a fresh process)."""
    from qkd_jax.data import dataset_info, get_source, make_train_loader

    info = dataset_info("imagenet2012")
    new = path in ("new", "crop")
    source = get_source("imagenet2012", "train", data_dir, encoded=new)
    loader = make_train_loader(source, batch_size=batch, seed=0, augment="imagenet", image_size=size,
                               mean=info.mean, std=info.std, worker_count=workers,
                               num_threads=1,
                               image_dtype="uint8" if new else "float32", jpeg=new)
    it = iter(loader)
    t_start = time.perf_counter()
    first = next(it)
    startup = time.perf_counter() - t_start
    cpu0, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
    for _ in range(batches):
        out = next(it)
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds(os.getpid()) - cpu0
    it.close()
    images = batches * batch
    return {"pipeline": "grain", "path": path, "workers": workers, "images": images,
            "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall,
            # /proc counts CPU time in clock ticks (10 ms): a tiny run can read 0, which says nothing per core
            "images_per_cpu_s": images / cpu if cpu > 0 else float("nan"), "cores_busy": cpu / wall,
            "first_batch_s": startup,
            "dtype": str(out["image"].dtype), "shape": list(first["image"].shape)}


def tf_rows(data_dir: str, batch: int, batches: int, size: int) -> list[dict]:
    """The tf.data rows, from benchmarks/input_pipeline_tf.py in .bench-venv/."""
    if not os.path.exists(TF_PYTHON):
        raise FileNotFoundError(f"{TF_PYTHON} not found; create it with: bash benchmarks/tf_venv.sh")
    rows = []
    for threads in (1, 2):
        cmd = [TF_PYTHON, TF_SCRIPT, f"--jpeg_dir={os.path.join(data_dir, 'jpeg')}", f"--batch={batch}",
               f"--batches={batches}", f"--size={size}", f"--threads={threads}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def _run_child(args: argparse.Namespace, path: str, workers: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--data_dir={args.data_dir}", f"--batch={args.batch}",
           f"--batches={args.batches}", f"--size={args.size}", f"--one={path},{workers}"]
    env = dict(os.environ, QKD_JAX_JPEG_CROP="1" if path == "crop" else "0")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False, env=env)
    if done.returncode:
        raise RuntimeError(f"row {path},{workers} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _extension_built() -> bool:
    try:
        from qkd_jax.data import _jpeg_crop  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(rows: list[dict]) -> str:
    head = (f"{'pipeline':<8} {'path':<5} {'workers':>7} {'images/s':>9} {'img/CPU-s':>10} "
            f"{'cores':>6} {'1st batch s':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['pipeline']:<8} {r['path']:<5} {r['workers']:>7} {r['images_per_s']:>9.1f} "
                     f"{r['images_per_cpu_s']:>10.1f} {r['cores_busy']:>6.2f} {r['first_batch_s']:>11.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default=os.path.join(ROOT, "bench-data"))
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12, help="timed batches per row (after one warm-up)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--paths", default="old,new,crop", help="grain rows: old, new (whole decode), crop (extension)")
    p.add_argument("--tf", action="store_true", help="add the tf.data rows (needs .bench-venv/)")
    p.add_argument("--out", default="input_pipeline.json")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: PATH,WORKERS in this process
    args = p.parse_args(argv)
    if args.one:
        path, workers = args.one.split(",")
        row = grain_row(args.data_dir, path, int(workers), args.batch, args.batches, args.size)
        print(json.dumps(row))
        return row
    if args.images < 1 or args.batch < 1 or args.batches < 1:
        p.error("--images, --batch and --batches must be >= 1")
    t0 = time.perf_counter()
    sizes = synthetic_imagenet.write_dataset(args.data_dir, args.images)
    written = time.perf_counter() - t0
    paths = [name for name in args.paths.split(",") if name]
    unknown = sorted(set(paths) - {"old", "new", "crop"})
    if unknown:
        p.error(f"--paths: unknown {unknown}; choose from old,new,crop")
    if "crop" in paths and not _extension_built():
        p.error("--paths=crop: the qkd_jax.data._jpeg_crop extension is not built (pip install -e . with a C "
                "compiler and libjpeg headers, e.g. Debian's libjpeg62-turbo-dev)")
    rows = [_run_child(args, path, int(w)) for w in args.workers.split(",") for path in paths]
    if args.tf:
        rows += tf_rows(args.data_dir, args.batch, args.batches, args.size)
    result = {"machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version()},
              "settings": {"images": args.images, "batch": args.batch, "batches": args.batches,
                           "size": args.size, "data_dir": args.data_dir, "write_s": written,
                           "mean_height": sum(h for h, _ in sizes) / len(sizes),
                           "mean_width": sum(w for _, w in sizes) / len(sizes)},
              "rows": rows}
    print(format_table(rows))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
