"""ONNX writer: the exported student (an IntegerExport) as an ONNX model onnxruntime runs.

    model_proto = to_onnx(load_model(exported), exported, types='container')
    save_onnx(model_proto, 'student.onnx')          # temporary name, then rename

Reads the same export record as the .npz (fileformat.py): codes, grids, scales, BatchNorm affines
and FP arrays; the graph's structure comes from tracing the reference integer inference
(graph_trace.py, onnx_graph.py). Input 'images' (N, H, W, C) float32 as the JAX student takes it
(normalised), output 'logits' (N, classes); N is dynamic.

Each quantized layer (activation grid s_a, zero point z_a, codes k_a = q_a + z_a; weights
q_w = m_w k_w - z_w with scale s_w), by `types`:

  'container' (default): integer kernels in onnxruntime.
      [interval method: (x - lower) / width, the quantizer's normalisation]
      Clip(x, s_a q_min, s_a q_max) -> QuantizeLinear(s_a, z_a, uint8) = k_a
      ConvInteger / MatMulInteger(k_a, q_w int8, x_zero_point=z_a) = sum q_a q_w   (int32, exact)
      Cast -> Mul(s_a s_w) -> Add(bias) [-> Mul(|output_scale|)]
    the expression of integer_inference.IntegerModel, op for op: the accumulator is the exact
    integer sum and the float tail uses the same float32 constants. The Clip keeps the codes on
    the b-bit grid inside the 8-bit container.
  'strict': QuantizeLinear / DequantizeLinear with the narrowest ONNX integer type holding the grid
    (UINT2 / UINT4 / UINT8 activations, INT2 / INT4 / INT8 weights; opset 21, 25 with 2-bit
    types) around a float Conv / Gemm: the standard Q/DQ form, smallest file. onnxruntime 1.32
    dequantizes these types and runs float convolutions (no integer kernels).
  'float': the fake-quant student in float32: activations through QuantizeLinear ->
    DequantizeLinear (uint8), weights stored as float32 (the codebook values the student uses).
    The float reference for sizes and speed.

Not representable (refused with the layer and the reason, ExportError): 1-bit signed activations
(values +-s: no integer zero point), weights whose integers leave int8 (W8 of the interval,
DoReFa, PACT weight grids: odd integers up to 255). Layers with only one side quantized run as
float convolutions in every mode (as in IntegerModel). BatchNorm is the export's affine
(x - mean) * mul + add, a float op, as in the .npz.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from qkd_jax.quant.export.exporter import ExportError
from qkd_jax.quant.export.atomic import write_bytes_atomic
from qkd_jax.quant.export.fileformat import IntegerExport
from qkd_jax.quant.positive import MIN_WIDTH

TYPES = ("container", "strict", "float")
OPSET = 21
OPSET_2BIT = 25  # INT2 / UINT2 arrived in opset 25

INSTALL_HINT = 'pip install -e ".[onnx]"  (onnx and onnxruntime)'


class OnnxNotInstalledError(ExportError):
    """The optional `onnx` package is missing."""


def require_onnx():
    """The onnx module, or an OnnxNotInstalledError naming the pip command."""
    try:
        import onnx
    except ImportError:
        raise OnnxNotInstalledError(f"the ONNX format needs the 'onnx' package: {INSTALL_HINT}") from None
    return onnx


def _find_linear(closed) -> Any:
    """The one conv_general_dilated / dot_general equation of a layer's linear jaxpr."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found.append(eqn)
            for sub in ("jaxpr", "call_jaxpr"):
                if sub in eqn.params:
                    walk(eqn.params[sub].jaxpr)
            if eqn.primitive.name not in ("conv_general_dilated", "dot_general", "jit", "pjit"):
                raise ExportError(f"a quantized layer's linear op holds {eqn.primitive.name!r} (expected a "
                                  f"single convolution or matmul)")

    walk(closed.jaxpr)
    if len(found) != 1:
        raise ExportError(f"a quantized layer's linear op holds {len(found)} convolutions / matmuls")
    return found[0]


def _int_type_for(lo: int, hi: int, signed: bool, strict: bool) -> tuple[Optional[str], Any]:
    """(ONNX type name, numpy container dtype) of the narrowest type holding [lo, hi], or (None, None)."""
    widths = (2, 4, 8) if strict else (8,)
    for bits in widths:
        tmin, tmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if tmin <= lo and hi <= tmax:
            return (f"{'INT' if signed else 'UINT'}{bits}", np.int8 if signed else np.uint8)
    return None, None


class _LayerWriter:
    """Emits the quantized layers of one export (the `quantized_layer` callback of JaxprWriter)."""

    def __init__(self, writer, traced, exported: IntegerExport, types: str, debug_inputs: dict):
        self.w, self.b = writer, writer.b
        self.traced, self.exported, self.types = traced, exported, types
        self.debug_inputs = debug_inputs
        self.debug_codes: dict[str, str] = {}
        self.narrow_types: set[str] = set()
        self.counts = {"integer": 0, "qdq": 0, "float": 0}

    def _onnx_type(self, name: str) -> int:
        from onnx import TensorProto

        return getattr(TensorProto, name)

    def _activation(self, path: str, entry: dict, grid, x: str) -> tuple[str, str, str]:
        """(codes, scale, zero point) names: the layer's activation quantizer as Clip + QuantizeLinear."""
        lp_signed = entry["a_signed"]
        if grid.multiplier != 1:
            raise ExportError(
                f"layer {path}: {entry['method']} {entry['a_bits']}-bit {'signed ' if lp_signed else ''}activations "
                f"take the values +-s (q = 2k - 1): no integer zero point holds them in ONNX; use "
                f"--format=npz, or unsigned / wider activations for this layer")
        if entry["method"] == "interval":
            p = entry["activation"]["params"]
            lower = np.float32(p["a_lower"])
            width = np.maximum(np.float32(p["a_upper"]) - lower, np.float32(MIN_WIDTH))
            x = self.b.node("Sub", [x, self.b.const(lower, "a_lower")])
            x = self.b.node("Div", [x, self.b.const(np.float32(width), "a_width")])
        s = np.float32(grid.scale)
        lo, hi = np.float32(s * np.float32(grid.q_min)), np.float32(s * np.float32(grid.q_max))
        type_name, dtype = _int_type_for(0, grid.levels - 1, False, self.types == "strict")
        if type_name == "UINT8":
            x = self.b.node("Clip", [x, self.b.const(lo, "a_min"), self.b.const(hi, "a_max")])
        else:  # Min / Max: onnxruntime 1.32's Clip -> QuantizeLinear fusion fails on 2- / 4-bit types
            x = self.b.node("Max", [self.b.node("Min", [x, self.b.const(hi, "a_max")]), self.b.const(lo, "a_min")])
        scale = self.b.const(s, "a_scale")
        if type_name == "UINT8":
            zp = self.b.const(np.asarray(grid.zero_point, np.uint8), "a_zero")
        else:
            self.narrow_types.add(type_name)
            zp = self.b.typed_const(np.asarray(grid.zero_point), type_name, "a_zero")
        codes = self.b.node("QuantizeLinear", [x, scale, zp], hint=f"codes_{path.replace('/', '_')}")
        if path in self.debug_inputs and type_name == "UINT8":
            self.debug_codes[path] = codes
        return codes, scale, zp

    def _weights(self, path: str, entry: dict, grid, kind: str) -> tuple[np.ndarray, str, Any]:
        q = self.exported.q_weights(path).astype(np.int64)
        type_name, dtype = _int_type_for(grid.q_min, grid.q_max, True, self.types == "strict")
        if type_name is None:
            raise ExportError(
                f"layer {path}: {entry['method']} W{entry['w_bits']} weights take integers in "
                f"[{grid.q_min}, {grid.q_max}], beyond an int8 container; use --format=npz or fewer weight bits")
        return q, type_name, dtype

    @staticmethod
    def _layout(kernel: np.ndarray, kind: str) -> np.ndarray:
        nd = kernel.ndim
        return np.transpose(kernel, (nd - 1, nd - 2, *range(nd - 2))) if kind == "conv" else kernel

    def _linear(self, eqn, kind: str, x: str, w: str, **kwargs) -> str:
        if kind == "conv":
            return self.w.conv(eqn, x, w, **kwargs)
        if kwargs.get("integer"):
            za, zw = kwargs["zero_points"]
            return self.b.node("MatMulInteger", [x, w, za, zw], hint="acc")
        return self.b.node("MatMul", [x, w])

    def __call__(self, path: str, x) -> str:
        x = self.w.name(x)
        if path in self.debug_inputs:
            self.debug_inputs[path] = self.b.node("Identity", [x], hint="input")
        layer = self.traced.layers[path]
        info, entry = layer.info, self.exported.layers[path]
        eqn = _find_linear(layer.linear)
        bias = self.exported.arrays[entry["bias"]["key"]] if entry["bias"] is not None else None
        if info.w_grid is not None and info.a_grid is not None and self.types == "container":
            codes, _, za = self._activation(path, entry, info.a_grid, x)
            q, _, dtype = self._weights(path, entry, info.w_grid, info.kind)
            w = self.b.const(self._layout(q.astype(dtype), info.kind), "w_q")
            zw = self.b.const(np.asarray(0, np.int8), "w_zero")
            acc = self._linear(eqn, info.kind, codes, w, integer=True, zero_points=(za, zw))
            y = self.b.node("Cast", [acc], to=self._onnx_type("FLOAT"))
            scale = np.float32(np.float32(info.a_grid.scale) * np.float32(info.w_grid.scale))
            y = self.b.node("Mul", [y, self.b.const(scale, "acc_scale")])
            self.counts["integer"] += 1
        else:
            if info.a_grid is not None:
                codes, scale, zp = self._activation(path, entry, info.a_grid, x)
                x = self.b.node("DequantizeLinear", [codes, scale, zp])
            if info.w_grid is not None and info.a_grid is not None and self.types == "strict":
                q, type_name, _ = self._weights(path, entry, info.w_grid, info.kind)
                if type_name != "INT8":
                    self.narrow_types.add(type_name)
                w_q = self.b.typed_const(self._layout(q, info.kind), type_name, "w_q")
                w = self.b.node("DequantizeLinear", [w_q, self.b.const(np.float32(info.w_grid.scale), "w_scale"),
                                                     self.b.typed_const(np.asarray(0), type_name, "w_zero")])
                self.counts["qdq"] += 1
            else:  # float weights: the codebook values (exact) or the layer's FP kernel
                w = self.b.const(self._layout(self.exported.dequantize(path).astype(np.float32), info.kind), "w")
                self.counts["float"] += 1
            y = self._linear(eqn, info.kind, x, w)
        if bias is not None:
            y = self.b.node("Add", [y, self.b.const(np.asarray(bias, np.float32), "bias")])
        if entry["output_scale"] is not None:
            y = self.b.node("Mul", [y, self.b.const(np.abs(np.float32(entry["output_scale"])), "output_scale")])
        return y


def to_onnx(model, exported: IntegerExport, *, types: str = "container", debug_inputs: bool = False):
    """The ONNX ModelProto of an export (see the module docstring), checked with onnx.checker.

    Args:
      model: the flax student (e.g. run.export_checkpoint.load_model(exported)).
      exported: the IntegerExport (the .npz's record).
      types: 'container' | 'strict' | 'float'.
      debug_inputs: also output each quantized layer's float input as 'input:<path>' and its uint8
        activation codes as 'codes:<path>' (for tests comparing activation codes with the integer
        inference).
    """
    if types not in TYPES:
        raise ExportError(f"--onnx-types must be one of {TYPES[:2]} (or 'float' from the library), got {types!r}")
    onnx = require_onnx()
    from onnx import TensorProto, helper

    from qkd_jax.quant.export.graph_trace import trace_export
    from qkd_jax.quant.export.onnx_graph import GraphBuilder, JaxprWriter

    traced = trace_export(model, exported)
    builder = GraphBuilder()
    writer = JaxprWriter(builder)
    inputs = {p: None for p in exported.layers} if debug_inputs else {}
    layers = _LayerWriter(writer, traced, exported, types, inputs)
    writer.quantized_layer = layers
    (out,) = writer.emit_jaxpr(traced.jaxpr.jaxpr, traced.jaxpr.consts, ["images"])
    logits = builder.node("Identity", [writer.name(out)], hint="logits")
    out_shape = traced.jaxpr.out_avals[0].shape
    outputs = [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", *out_shape[1:]])]
    builder.nodes[-1].output[0] = "logits"
    outputs[0].name = "logits"
    for path, name in inputs.items():
        shape = ["batch", *traced.layers[path].linear.in_avals[0].shape[1:]]
        builder.nodes.append(helper.make_node("Identity", [name], [f"input:{path}"], name=f"debug_{path}"))
        outputs.append(helper.make_tensor_value_info(f"input:{path}", TensorProto.FLOAT, shape))
        if path in layers.debug_codes:
            builder.nodes.append(helper.make_node("Identity", [layers.debug_codes[path]], [f"codes:{path}"],
                                                  name=f"debug_codes_{path}"))
            outputs.append(helper.make_tensor_value_info(f"codes:{path}", TensorProto.UINT8, shape))
    graph = helper.make_graph(
        builder.nodes, "qkd_jax_student",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *traced.input_shape])],
        outputs, builder.initializers)
    opset = OPSET_2BIT if {"INT2", "UINT2"} & layers.narrow_types else OPSET
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qkd_jax")
    proto.ir_version = 13 if opset >= OPSET_2BIT else 10  # the IR versions that came with opsets 25 and 21
    meta = {"types": types, "integer_layers": layers.counts["integer"], "qdq_layers": layers.counts["qdq"],
            "float_layers": layers.counts["float"], "source": str(exported.manifest.get("source"))}
    helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    onnx.checker.check_model(proto)
    return proto


def save_onnx(proto, path: str | os.PathLike) -> str:
    """Writes the model to `path` through a temporary name and a rename (never half-written)."""
    return write_bytes_atomic(path, proto.SerializeToString())
