"""How much of each QKD-quantized tensor falls in the zero bin right after calibration.

    python experiments/qkd_zero_bins.py WORKDIR [WORKDIR ...] [--phase=calibrate] [--images=256]

WORKDIR is a run directory of the 'qkd' quantizer (e.g. a QKD run of
`experiments/reproduce_digits.py`). For its `--phase` checkpoint (default the calibration) this
prints, over the quantized layers: the fraction of weights that round to zero on the signed grid
(|w| < s_w / 2, s_w = I_W / (2^(b-1) - 1)), and, on `--images` training images (normalised, no
augmentation), the fraction of the layers' inputs in the zero bin of the unsigned activation grid
(x < s_a / 2, s_a = I_X / (2^b - 1)), of all inputs and of the non-zero ones (post-ReLU inputs are
exactly zero in large part whatever the interval). Layer inputs are captured with
`flax.linen.intercept_methods` during one forward pass in eval mode.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def zero_bins(workdir: pathlib.Path, phase: str, n_images: int) -> dict:
    import flax.linen as nn
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from flax import traverse_util

    from qkd_jax.data.info import dataset_info
    from qkd_jax.data.sources import get_source
    from qkd_jax.quant.layers import QConv, QDense
    from qkd_jax.run import build
    from qkd_jax.train.checkpoint import read_arrays

    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    if config.quant.method != "qkd":
        raise SystemExit(f"{workdir}: quant.method is {config.quant.method!r}, not 'qkd'")
    steps = sorted(int(p.name) for p in (workdir / phase).iterdir() if p.name.isdigit())
    variables = read_arrays(workdir / phase / str(steps[-1]), ("params", "batch_stats"))
    model = build.student_network(config).local_model
    info = dataset_info(config.dataset.name)
    source = get_source(config.dataset.name, "train", config.dataset.data_dir or None)
    images = np.stack([np.asarray(source[i]["image"], np.float32) / 255.0 for i in range(n_images)])
    images = (images - np.float32(info.mean)) / np.float32(info.std)

    inputs: dict[str, np.ndarray] = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, (QConv, QDense)) and context.method_name == "__call__":
            inputs["/".join(context.module.path)] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply(variables, jnp.asarray(images), train=False)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    w_bits, a_bits = config.quant.w_bits, config.quant.a_bits
    w_zero, a_zero, a_zero_nz = [], [], []
    for path, x in inputs.items():
        w_key, a_key = f"{path}/quant/w_interval", f"{path}/quant/a_interval"
        if w_key in flat:
            kernel = flat[f"{path}/kernel"]
            step = abs(float(flat[w_key])) / (2 ** (w_bits - 1) - 1 if w_bits > 1 else 1)
            w_zero.append(float(np.mean(np.abs(kernel) < step / 2)) if w_bits > 1 else 0.0)
        if a_key in flat:
            step = abs(float(flat[a_key])) / (2**a_bits - 1)
            a_zero.append(float(np.mean(x < step / 2)))
            nz = x[x != 0]
            a_zero_nz.append(float(np.mean(nz < step / 2)) if nz.size else float("nan"))
    return {"layers": len(w_zero), "w_zero": w_zero, "a_zero": a_zero, "a_zero_nonzero": a_zero_nz}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--phase", default="calibrate")
    p.add_argument("--images", type=int, default=256)
    a = p.parse_args(argv)
    import numpy as np

    for wd in a.workdirs:
        r = zero_bins(pathlib.Path(wd), a.phase, a.images)
        fmt = lambda v: f"mean {np.mean(v):.3f}, min {np.min(v):.3f}, max {np.max(v):.3f}"
        print(f"{wd} ({a.phase}, {r['layers']} quantized layers)")
        print(f"  weights in the zero bin:              {fmt(r['w_zero'])}")
        print(f"  inputs in the zero bin (all):         {fmt(r['a_zero'])}")
        print(f"  inputs in the zero bin (non-zero x):  {fmt(r['a_zero_nonzero'])}")


if __name__ == "__main__":
    main()
