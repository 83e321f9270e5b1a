"""The demo's last step: the trained SQAKD student exported and run where it is deployed.

    print(deployment_report(workdir, config, results))

Exports the phase's checkpoint once (`export_checkpoint`), writes the record as .npz and as two ONNX
models (float: float32 weights; int8 container: uint8/int8 codes on ConvInteger / MatMulInteger),
runs the int8 model in onnxruntime on the whole evaluation split and prints its top-1 beside the
JAX student's (the phase's own evaluation) with the three file sizes. Without the optional onnx
packages it says how to install them instead (one line); the demo does not fail.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

import numpy as np

DEPLOY_DIR = "deploy"


def _eval_split(config) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation split's normalised images (N, H, W, C) and labels, as the run evaluates them."""
    from qkd_jax import data as qdata
    from qkd_jax.run import build

    info = qdata.dataset_info(config.dataset.name)
    source = qdata.get_source(config.dataset.name, info.eval_split, config.dataset.data_dir)
    loader = qdata.make_eval_loader(source, batch_size=len(source), augment=info.augment,
                                    image_size=build.input_shape(config)[0], mean=info.mean, std=info.std)
    batch = next(iter(loader))
    keep = np.asarray(batch["mask"], bool)
    return np.asarray(batch["image"], np.float32)[keep], np.asarray(batch["label"])[keep]


def deployment_report(workdir, config, results: Mapping[str, Any], phase: str = "sqakd") -> str:
    """The deployment lines the demo prints (see the module docstring)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return ('Deployment (ONNX) skipped: onnx / onnxruntime are not installed; install them with '
                'pip install -e ".[onnx]" and rerun the demo (finished phases are read back).')
    from qkd_jax.quant.export.onnx_check import optimized_ops, run_onnx
    from qkd_jax.quant.export.onnx_format import save_onnx, to_onnx
    from qkd_jax.run.export_checkpoint import export_checkpoint, load_model

    local = "://" not in str(workdir)
    out_dir = os.path.join(str(workdir), DEPLOY_DIR) if local else tempfile.mkdtemp(prefix="qkd_deploy_")
    os.makedirs(out_dir, exist_ok=True)
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's notes on checkpoint metadata, as the export CLI
    try:
        exported = export_checkpoint(workdir, phase)
    finally:
        absl_logging.set_verbosity(verbosity)
    model = load_model(exported)
    paths = {"npz": os.path.join(out_dir, f"{phase}.npz"), "float": os.path.join(out_dir, f"{phase}_float.onnx"),
             "int8": os.path.join(out_dir, f"{phase}_int8.onnx")}
    exported.save(paths["npz"], sidecar=False)
    int8 = to_onnx(model, exported, types="container")
    save_onnx(to_onnx(model, exported, types="float"), paths["float"])
    save_onnx(int8, paths["int8"])
    images, labels = _eval_split(config)
    data = int8.SerializeToString()
    top1_onnx = 100.0 * float(np.mean(run_onnx(data, images).argmax(-1) == labels))
    ops = optimized_ops(data)
    sizes = {k: os.path.getsize(p) for k, p in paths.items()}
    q = config.quant
    return "\n".join([
        f"Deployment of the W{q.w_bits}A{q.a_bits} {phase.upper()} student ({out_dir}):",
        f"  JAX student top-1 (its evaluation)   {results[phase].eval['top1']:6.2f} %",
        f"  onnxruntime int8 ONNX top-1          {top1_onnx:6.2f} %   ({len(labels)} images; "
        f"{ops['ConvInteger']} ConvInteger + {ops['MatMulInteger']} MatMulInteger nodes run the quantized layers)",
        f"  files: float ONNX {sizes['float']:,} B, int8-container ONNX {sizes['int8']:,} B, .npz {sizes['npz']:,} B",
    ])
