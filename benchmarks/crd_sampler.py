"""Time per step of CRD's negative samplers (qkd_jax/distill/crd.py, option `sampler`).

    python benchmarks/crd_sampler.py [--repeats=5] [--skip-exact-imagenet]

Times the jitted draw of the (batch, 1 + nce_k) contrast indices alone (not the loss), after
compilation, median of --repeats calls, at
- CIFAR-100 scale: n_data 50000 (100 classes of 500), batch 64, nce_k 16384: both samplers;
- ImageNet scale: n_data 1281167 (1000 classes of 1237..1300 rows; ILSVRC-2012 train: 732..1300),
  batch 256, nce_k 16384: 'with_replacement' and, unless --skip-exact-imagenet, 'exact' (a
  (256, 1281167) score matrix and its top-k: 1.3 GB of float32 and minutes per step on a CPU).
Prints one line per (scale, sampler): seconds per step and the expected repeated pairs per example
of 'with_replacement', C(nce_k, 2) / m with m the other-class rows.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qkd_jax.distill.crd import class_blocks, crd_contrast_index, crd_contrast_index_with_replacement  # noqa: E402

SCALES = {
    "cifar100": dict(n=50000, classes=100, batch=64, nce_k=16384),
    "imagenet": dict(n=1281167, classes=1000, batch=256, nce_k=16384),
}


def dataset_labels(n: int, classes: int) -> np.ndarray:
    """n labels over `classes` classes, shuffled: equal sizes, or when n / classes > 1000 the
    ImageNet count with 300 classes shortened (1237..1300 rows)."""
    if n // classes <= 1000:
        return np.random.default_rng(0).permutation(np.arange(n) % classes)
    rng = np.random.default_rng(0)
    sizes = np.full(classes, 1300)
    short = n - 1300 * classes  # negative: rows to remove
    cut = rng.choice(classes, size=300, replace=False)
    sizes[cut] -= (-short) // 300
    sizes[cut[: (-short) % 300]] -= 1
    assert sizes.sum() == n
    return rng.permutation(np.repeat(np.arange(classes), sizes))


def time_sampler(sampler: str, n: int, classes: int, batch: int, nce_k: int, repeats: int) -> float:
    """Median seconds of one jitted draw (after a compiling call)."""
    labels = dataset_labels(n, classes)
    lab = jnp.asarray(labels, jnp.int32)
    blocks = class_blocks(labels)
    rng = np.random.default_rng(1)
    index = jnp.asarray(rng.integers(0, n, size=batch), jnp.int32)
    if sampler == "exact":
        fn = jax.jit(lambda key, idx: crd_contrast_index(key, lab, idx, nce_k))
    else:
        fn = jax.jit(lambda key, idx: crd_contrast_index_with_replacement(
            key, lab, idx, nce_k, blocks["class_order"], blocks["class_start"], blocks["class_count"]))
    fn(jax.random.key(0), index).block_until_ready()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        fn(jax.random.key(r + 1), index).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-exact-imagenet", action="store_true")
    a = p.parse_args(argv)
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))")
    for scale, s in SCALES.items():
        m = s["n"] - s["n"] // s["classes"]
        for sampler in ("exact", "with_replacement"):
            if scale == "imagenet" and sampler == "exact" and a.skip_exact_imagenet:
                print(f"{scale:9s} {sampler:17s} skipped")
                continue
            sec = time_sampler(sampler, repeats=a.repeats, **s)
            dup = f"; expected repeated pairs per example {s['nce_k'] * (s['nce_k'] - 1) / 2 / m:.1f}" \
                if sampler == "with_replacement" else ""
            print(f"{scale:9s} {sampler:17s} n={s['n']} batch={s['batch']} nce_k={s['nce_k']}: "
                  f"{sec * 1e3:.2f} ms/step{dup}", flush=True)


if __name__ == "__main__":
    main()
