"""Depthwise 3x3 conv forward + backward: XLA's grouped conv vs a sum of shifted products (not a test).

    python benchmarks/depthwise.py                 # MobileNetV2-like shapes, batch 32, CPU or accelerator
    python benchmarks/depthwise.py --batch=256 --out=dw.json

The grouped conv (`lax.conv_general_dilated(..., feature_group_count=C)`, what nn.Conv with
groups=C runs) has a known slow backward pass in XLA (jax-ml/jax issues 13800 and 23713). The
alternative writes the same depthwise conv as the sum over the k*k taps of a strided slice of the
padded input times that tap's per-channel weight: only elementwise products and adds, whose
gradients XLA derives as pads and slices. Both compute the same function (tests/test_benchmarks.py
checks values and gradients). For each MobileNetV2 depthwise shape (224 px input), the script
times jit(value_and_grad) of sum(y^2) w.r.t. input and kernel, median of `--steps` calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.models.depthwise import depthwise_conv_general_dilated

#: (spatial size of the input, channels, stride) of MobileNetV2's depthwise convs at 224 px.
MOBILENET_V2_DW = ((112, 32, 1), (112, 96, 2), (56, 144, 1), (56, 144, 2), (28, 192, 1), (28, 192, 2),
                   (14, 384, 1), (14, 576, 1), (14, 576, 2), (7, 960, 1))


def grouped_depthwise(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """NHWC depthwise conv, torch padding (k-1)//2, kernel (k, k, 1, C): XLA's grouped conv."""
    pad = (w.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


def shifted(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """The same conv through `qkd_jax.models.depthwise` (what MobileNetV2(depthwise='shifted') runs)."""
    pad = (w.shape[0] - 1) // 2
    return depthwise_conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=x.shape[-1])


def _loss(fn, stride):
    return lambda x, w: jnp.sum(fn(x, w, stride) ** 2)


def time_grad(fn, x, w, stride: int, steps: int) -> float:
    """Median seconds of jit(value_and_grad w.r.t. x and w) after one warm-up call."""
    step = jax.jit(jax.value_and_grad(_loss(fn, stride), argnums=(0, 1)))
    jax.block_until_ready(step(x, w))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(x, w))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default="depthwise_results.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for size, channels, stride in MOBILENET_V2_DW:
        x = jnp.asarray(rng.normal(size=(args.batch, size, size, channels)), args.dtype)
        w = jnp.asarray(rng.normal(size=(3, 3, 1, channels)), args.dtype)
        grouped = time_grad(grouped_depthwise, x, w, stride, args.steps)
        shifted_s = time_grad(shifted, x, w, stride, args.steps)
        rows.append(dict(size=size, channels=channels, stride=stride, batch=args.batch, dtype=args.dtype,
                         grouped_ms=1e3 * grouped, shifted_ms=1e3 * shifted_s, speedup=grouped / shifted_s))
        r = rows[-1]
        print(f"{size:4d} {channels:4d} s{stride}  grouped {r['grouped_ms']:8.2f} ms  shifted {r['shifted_ms']:8.2f} ms  "
              f"grouped/shifted {r['speedup']:5.2f}", flush=True)
    total_g = sum(r["grouped_ms"] for r in rows)
    total_s = sum(r["shifted_ms"] for r in rows)
    print(f"device {jax.devices()[0].device_kind}: all depthwise layers grouped {total_g:.1f} ms, "
          f"shifted {total_s:.1f} ms (grouped/shifted {total_g / total_s:.2f})")
    with open(args.out, "w") as f:
        json.dump({"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
