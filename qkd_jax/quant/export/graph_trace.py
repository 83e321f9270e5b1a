"""The exported student as a jaxpr whose quantized layers are single opaque equations.

    traced = trace_export(model, exported)          # model: the flax student (load_model(exported))
    traced.jaxpr                                     # ClosedJaxpr, input NHWC, a batch of one
    traced.layers['layer1_0/conv1'].linear           # the layer's conv / matmul as a jaxpr on floats

Format writers that need the graph (onnx_format.py) read it from here. The graph is the one the
reference integer inference runs (integer_inference.IntegerModel: the student's own flax graph,
BatchNorm as the export's per-channel affine, FP layers with the export's FP arrays), traced with
`jax.make_jaxpr`; each quantized QConv / QDense call becomes one `qkd_quantized_layer` equation
(params: the layer's path), so a writer emits the layer from the export record (codes, grids,
scales) instead of from traced arithmetic. Everything else (ReLU, pooling, residual adds, reshapes,
the BatchNorm affine, FP stem / classifier) stays as ordinary jax primitives with the export's arrays
as constants. Only the export record and the model's structure go in: no second path from a
checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from qkd_jax.quant.export.fileformat import IntegerExport
from qkd_jax.quant.export.integer_inference import IntegerModel, _float_op, _Layer

#: The primitive standing for one quantized layer in the traced graph.
quantized_layer_p = jex_core.Primitive("qkd_quantized_layer")


def _abstract_eval(x, *, path: str, out_shape: tuple, **_: Any):
    del x, path
    return jax.core.ShapedArray(out_shape, jnp.float32)


quantized_layer_p.def_abstract_eval(_abstract_eval)


@dataclasses.dataclass(frozen=True)
class TracedLayer:
    """One quantized layer of the traced graph: its export entry and its linear op (conv / matmul,
    no bias) as a jaxpr on (x, kernel), which carries the padding, strides, dilation and groups."""

    info: _Layer
    linear: Any  # jax ClosedJaxpr


@dataclasses.dataclass(frozen=True)
class TracedExport:
    jaxpr: Any  # jax ClosedJaxpr: images (1, H, W, C) float32 -> logits
    layers: dict[str, TracedLayer]
    input_shape: tuple[int, ...]


class _TracingModel(IntegerModel):
    """IntegerModel whose quantized layers bind `quantized_layer_p` instead of computing."""

    def __init__(self, model: nn.Module, exported: IntegerExport):
        super().__init__(model, exported)
        self.traced: dict[str, TracedLayer] = {}

    def _quantized_layer(self, mod, info, arrs, x):
        base = nn.Conv if info.kind == "conv" else nn.Dense
        if not isinstance(mod, base):
            raise ValueError(f"layer {info.path} is a {type(mod).__name__} in the model, a {info.kind} in the export")
        kernel_shape = tuple(self.exported.layers[info.path]["kernel_shape"])
        op = _float_op(mod, base, False)
        linear = jax.make_jaxpr(lambda v, k: op(v, k, None))(
            jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(kernel_shape, jnp.float32))
        self.traced[info.path] = TracedLayer(info, linear)
        out_shape = tuple(linear.out_avals[0].shape)
        return quantized_layer_p.bind(x, path=info.path, out_shape=out_shape)


def trace_export(model: nn.Module, exported: IntegerExport) -> TracedExport:
    """Traces the export's inference graph (see the module docstring) on a batch of one image.

    A writer gives the batch dimension back (axis 0 of every activation: the zoo's models never
    move it); a symbolic batch would turn strided slices (the option-A shortcut) into gathers."""
    tracer = _TracingModel(model, exported)
    input_shape = tuple(int(d) for d in exported.manifest["model"]["input_shape"])
    spec = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    closed = jax.make_jaxpr(lambda images: tracer._forward(tracer.runtime, images))(spec)
    return TracedExport(closed, dict(tracer.traced), input_shape)
