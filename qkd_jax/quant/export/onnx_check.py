"""Runs an exported ONNX model in onnxruntime and reports what it runs as integers.

    check = check_onnx(proto, images, reference_logits)
    print(check.format())       # agreement with the JAX integer inference, integer nodes counted

`optimized_ops` counts the node types of the graph onnxruntime actually executes (its optimized
graph, written with SessionOptions.optimized_model_filepath): QLinearConv / QLinearMatMul /
ConvInteger / MatMulInteger nodes are integer kernels; Conv / FusedConv / MatMul / Gemm are float.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import tempfile
from typing import Optional

import numpy as np

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul")
FLOAT_OPS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "Gemm", "FusedMatMul", "FusedGemm")


def require_onnxruntime():
    from qkd_jax.quant.export.onnx_format import INSTALL_HINT, OnnxNotInstalledError

    try:
        import onnxruntime
    except ImportError:
        raise OnnxNotInstalledError(f"running ONNX models needs 'onnxruntime': {INSTALL_HINT}") from None
    return onnxruntime


def session(model_bytes: bytes, optimized_path: Optional[str] = None, threads: int = 0):
    """An onnxruntime CPU InferenceSession (all graph optimizations), optionally saving the optimized graph."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def optimized_ops(model_bytes: bytes) -> collections.Counter:
    """Node types of onnxruntime's optimized graph of the model."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model_bytes, path)
        graph = onnx.load(path).graph
    return collections.Counter(n.op_type for n in graph.node)


@dataclasses.dataclass
class OnnxCheck:
    images: int
    top1_equal: int
    max_abs_diff: float
    logit_scale: float
    ops: collections.Counter

    @property
    def integer_nodes(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k in INTEGER_OPS}

    @property
    def float_nodes(self) -> dict[str, int]:
        return {k: v for k, v in self.ops.items() if k in FLOAT_OPS}

    def format(self) -> str:
        integer = ", ".join(f"{v} {k}" for k, v in sorted(self.integer_nodes.items())) or "none"
        floats = ", ".join(f"{v} {k}" for k, v in sorted(self.float_nodes.items())) or "none"
        return (f"onnxruntime check on {self.images} inputs: top-1 equal to the JAX integer inference on "
                f"{self.top1_equal}/{self.images}, max |logit difference| {self.max_abs_diff:.3g} "
                f"(largest |logit| {self.logit_scale:.3g})\n"
                f"onnxruntime's optimized graph: integer kernels: {integer}; float conv/matmul: {floats}")


def run_onnx(model_bytes: bytes, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of the ONNX model on NHWC float32 images."""
    sess = session(model_bytes)
    images = np.asarray(images, np.float32)
    outs = [sess.run(["logits"], {"images": images[i:i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(outs)


def check_onnx(model_bytes: bytes, images: np.ndarray, reference_logits: np.ndarray) -> OnnxCheck:
    """onnxruntime's logits against the JAX integer inference's on `images`, and the optimized graph's ops."""
    got = run_onnx(model_bytes, images)
    ref = np.asarray(reference_logits)
    return OnnxCheck(images=len(images), top1_equal=int(np.sum(got.argmax(-1) == ref.argmax(-1))),
                     max_abs_diff=float(np.abs(got - ref).max()), logit_scale=float(np.abs(ref).max()),
                     ops=optimized_ops(model_bytes))
