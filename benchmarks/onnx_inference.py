"""onnxruntime images/s: the float ONNX student vs the int8-container ONNX student (not a test).

    python benchmarks/onnx_inference.py                       # ResNet-20 32 px, ResNet-18 and MobileNetV2 224 px
    python benchmarks/onnx_inference.py --iters=5 --out=onnx_bench.json
    python benchmarks/onnx_inference.py --quick               # ResNet-20 at 8 px, a few calls (for the tests)

Each model is built as an LSQ W4A4 student with 8-bit first and last layers (the zoo's
`first_last_8bit` rule), random weights and fixed quantizer parameters (speed does not depend on
training), exported once (`export_variables`) and written twice from that record
(`quant/export/onnx_format.py`):
  float:     types='float', float32 weights (the student's dequantized values), activations
             QuantizeLinear -> DequantizeLinear, float Conv / Gemm in onnxruntime;
  container: types='container', uint8 activation codes and int8 weights, ConvInteger /
             MatMulInteger (int32 accumulation) in onnxruntime.
For batch 1 and 64, one warm-up call then the median of `--iters` calls on the CPU execution
provider (all graph optimizations, default threads); images/s = batch / median seconds. The
ratio is container / float (> 1: the integer model is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

#: (model, input size) of the full run.
MODELS = (("resnet20", 32), ("resnet18", 224), ("mobilenet_v2", 224))
BATCHES = (1, 64)
QUANT_PARAMS = {"w_step": 0.05, "a_step": 0.2, "output_scale": 1.0}


def build_export(name: str, size: int, seed: int = 0):
    """(model, IntegerExport) of an LSQ W4A4 first/last-8-bit student with random weights."""
    import jax
    import jax.numpy as jnp

    from qkd_jax.models import get_model, signed_inputs
    from qkd_jax.quant import export as qexport
    from qkd_jax.quant.layers import quantized_layers
    from qkd_jax.quant.rules import first_last_8bit, with_signed_inputs

    conv, dense = quantized_layers(with_signed_inputs(first_last_8bit("lsq", 4, 4), signed_inputs(name)))
    model = get_model(name, 10 if size <= 32 else 1000, conv=conv, dense=dense)
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = path[-1].key
        if key == "kernel":
            return (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
        if key in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if key in QUANT_PARAMS:
            return np.full(leaf.shape, QUANT_PARAMS[key], np.float32)
        return np.zeros(leaf.shape, np.float32)

    variables = {c: jax.tree_util.tree_map_with_path(fill, shapes[c]) for c in ("params", "batch_stats")
                 if c in shapes}
    return model, qexport.export_variables(model, variables, (size, size, 3))


def time_model(model_bytes: bytes, images: np.ndarray, iters: int) -> float:
    """Median seconds of one onnxruntime call on `images` (after one warm-up call)."""
    from qkd_jax.quant.export.onnx_check import session

    sess = session(model_bytes)
    sess.run(["logits"], {"images": images})
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sess.run(["logits"], {"images": images})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(models, batches, iters: int) -> dict:
    import onnxruntime

    from qkd_jax.quant.export.onnx_check import optimized_ops
    from qkd_jax.quant.export.onnx_format import to_onnx

    rows = []
    for name, size in models:
        model, exported = build_export(name, size)
        protos = {t: to_onnx(model, exported, types=t).SerializeToString() for t in ("float", "container")}
        ops = optimized_ops(protos["container"])
        for batch in batches:
            images = np.random.default_rng(1).normal(size=(batch, size, size, 3)).astype(np.float32)
            secs = {t: time_model(b, images, iters) for t, b in protos.items()}
            row = {"model": name, "size": size, "batch": batch,
                   "float_images_per_s": batch / secs["float"], "int8_images_per_s": batch / secs["container"],
                   "float_bytes": len(protos["float"]), "int8_bytes": len(protos["container"]),
                   "integer_nodes": ops["ConvInteger"] + ops["MatMulInteger"], "quantized_layers": len(exported.layers)}
            row["ratio"] = row["int8_images_per_s"] / row["float_images_per_s"]
            rows.append(row)
            print(f"{name:>13} {size:>3}px batch {batch:>3}: float {row['float_images_per_s']:9.1f} img/s   "
                  f"int8 {row['int8_images_per_s']:9.1f} img/s   ratio {row['ratio']:.2f}   "
                  f"({row['integer_nodes']}/{row['quantized_layers']} layers on integer kernels)", flush=True)
    meta = {"onnxruntime": onnxruntime.__version__, "cpu": _cpu_name(), "cores": os.cpu_count(),
            "python": platform.python_version(), "iters": iters}
    return {"rows": rows, "meta": meta}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=3, help="timed calls per model, type and batch (median)")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 at 8 px, batches 1 and 4, 2 calls")
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print('onnxruntime is not installed: pip install -e ".[onnx]"', file=sys.stderr)
        return 2
    if args.quick:
        result = run((("resnet20", 8),), (1, 4), 2)
    else:
        result = run(MODELS, BATCHES, args.iters)
    print(f"onnxruntime {result['meta']['onnxruntime']} on {result['meta']['cpu']} ({result['meta']['cores']} cores)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
