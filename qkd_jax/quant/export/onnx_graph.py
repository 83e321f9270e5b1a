"""A jaxpr (the traced student, graph_trace.py) written as ONNX nodes, primitive by primitive.

The builder holds the node list and initializers; `emit_jaxpr` walks a jaxpr's equations and
writes each as ONNX ops. Conventions:
  * activations are NHWC as in JAX; convolutions and pooling transpose to ONNX's NCHW and back
    (onnxruntime's transpose optimizer cancels the pairs between consecutive layers);
  * the graph was traced on one image: axis 0 of every activation is the batch, which the writer
    keeps dynamic (a reshape copies it with ONNX's 0, a broadcast keeps it with 1); an op that
    would move or reduce axis 0 is refused;
  * equations whose inputs are all constants are evaluated here (constant folding), so the
    exported arrays reach the graph as initializers in their final form;
  * `jit` and `custom_jvp_call` (e.g. ReLU) are inlined.
Equations of `graph_trace.quantized_layer_p` go to the `quantized_layer` callback (onnx_format.py).
A primitive with no rule here is refused with its name (one line, the CLI's exit 2).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from qkd_jax.quant.export.exporter import ExportError
from qkd_jax.quant.export.graph_trace import quantized_layer_p


class UnsupportedOpError(ExportError):
    """The traced graph holds an operation the ONNX writer has no rule for."""


class GraphBuilder:
    """ONNX nodes and initializers under construction (names are unique strings)."""

    def __init__(self):
        import onnx  # noqa: F401  (the caller checked it is installed)

        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self._const_names: dict[int, str] = {}

    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        """An initializer holding `value` (its NumPy dtype kept)."""
        from onnx import numpy_helper

        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def typed_const(self, value: np.ndarray, type_name: str, hint: str = "c") -> str:
        """An initializer of an integer type by name ('INT8', 'INT4', 'UINT4', 'INT2', 'UINT2'),
        bit-packed by onnx through the ml_dtypes NumPy types."""
        import ml_dtypes

        dtype = {"INT8": np.int8, "UINT8": np.uint8}.get(type_name) or getattr(ml_dtypes, type_name.lower())
        return self.const(np.asarray(value).astype(dtype), hint)

    def node(self, op: str, inputs: list[str], hint: str = "t", outputs: int = 1, **attrs: Any):
        from onnx import helper

        names = [self.fresh(hint) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=self.fresh(op), **attrs))
        return names[0] if outputs == 1 else names


def _to_nchw(ndim: int) -> list[int]:
    return [0, ndim - 1, *range(1, ndim - 1)]


def _to_nhwc(ndim: int) -> list[int]:
    return [0, *range(2, ndim), 1]


def _keep_batch_axis(prim: str, axes) -> None:
    if 0 in tuple(axes):
        raise UnsupportedOpError(f"{prim} over the batch axis: the ONNX export keeps axis 0 as the batch")


class JaxprWriter:
    """Writes jaxpr equations into a GraphBuilder (see the module docstring)."""

    def __init__(self, builder: GraphBuilder, quantized_layer: Optional[Callable] = None):
        self.b = builder
        self.quantized_layer = quantized_layer

    # ------------------------------------------------------------------ values

    def emit_jaxpr(self, jaxpr, consts, args: list) -> list:
        """Emits `jaxpr` (a core Jaxpr) with `consts` for its constvars and `args` for its invars; each
        value is an ONNX name (str) or a NumPy constant. Returns the outputs, same convention."""
        env: dict = {}

        def read(v):
            if isinstance(v, jex_core.Literal):
                return np.asarray(v.val)
            return env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = np.asarray(value)
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.emit_eqn(eqn, ins)
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def name(self, value, hint: str = "c") -> str:
        """An ONNX name for a value (an initializer for a constant)."""
        return value if isinstance(value, str) else self.b.const(np.asarray(value), hint)

    # ------------------------------------------------------------------ equations

    def emit_eqn(self, eqn, ins: list) -> list:
        prim, params = eqn.primitive, eqn.params
        if prim is quantized_layer_p:
            return [self.quantized_layer(params["path"], ins[0])]
        if prim.name in ("jit", "pjit", "closed_call", "core_call"):
            closed = params["jaxpr"]
            return self.emit_jaxpr(closed.jaxpr, closed.consts, ins)
        if prim.name == "custom_jvp_call":
            closed = params["call_jaxpr"]
            return self.emit_jaxpr(closed.jaxpr, closed.consts, ins)
        if prim.name == "custom_vjp_call":
            closed = params.get("call_jaxpr") or params["fun_jaxpr"]
            return self.emit_jaxpr(closed.jaxpr, closed.consts, ins)
        if all(not isinstance(x, str) for x in ins):  # constant folding
            out = prim.bind(*[jnp.asarray(x) for x in ins], **params)
            return [np.asarray(o) for o in out] if prim.multiple_results else [np.asarray(out)]
        rule = getattr(self, "_" + prim.name, None)
        if rule is None:
            raise UnsupportedOpError(
                f"the ONNX export has no rule for the jax operation {prim.name!r} in this model; "
                f"export it with --format=npz or --format=stablehlo")
        out = rule(eqn, ins, params)
        return out if isinstance(out, list) else [out]

    def _binary(self, op: str, ins) -> str:
        a, c = ins
        return self.b.node(op, [self.name(a), self.name(c)])

    def _add(self, eqn, ins, p):
        return self._binary("Add", ins)

    def _sub(self, eqn, ins, p):
        return self._binary("Sub", ins)

    def _mul(self, eqn, ins, p):
        return self._binary("Mul", ins)

    def _div(self, eqn, ins, p):
        if np.issubdtype(eqn.outvars[0].aval.dtype, np.integer):
            raise UnsupportedOpError("integer division in the model's graph")
        return self._binary("Div", ins)

    def _max(self, eqn, ins, p):
        return self._binary("Max", ins)

    def _min(self, eqn, ins, p):
        return self._binary("Min", ins)

    def _pow(self, eqn, ins, p):
        return self._binary("Pow", ins)

    def _unary(self, op: str, ins) -> str:
        return self.b.node(op, [self.name(ins[0])])

    def _neg(self, eqn, ins, p):
        return self._unary("Neg", ins)

    def _exp(self, eqn, ins, p):
        return self._unary("Exp", ins)

    def _tanh(self, eqn, ins, p):
        return self._unary("Tanh", ins)

    def _logistic(self, eqn, ins, p):
        return self._unary("Sigmoid", ins)

    def _abs(self, eqn, ins, p):
        return self._unary("Abs", ins)

    def _sqrt(self, eqn, ins, p):
        return self._unary("Sqrt", ins)

    def _rsqrt(self, eqn, ins, p):
        return self.b.node("Reciprocal", [self._unary("Sqrt", ins)])

    def _integer_pow(self, eqn, ins, p):
        return self.b.node("Pow", [self.name(ins[0]), self.b.const(np.float32(p["y"]))])

    def _clamp(self, eqn, ins, p):
        lo, x, hi = ins
        return self.b.node("Max", [self.b.node("Min", [self.name(x), self.name(hi)]), self.name(lo)])

    def _stop_gradient(self, eqn, ins, p):
        return ins[0]

    def _copy(self, eqn, ins, p):
        return ins[0]

    def _copy_p(self, eqn, ins, p):
        return ins[0]

    def _convert_element_type(self, eqn, ins, p):
        from onnx import helper

        src, dst = eqn.invars[0].aval.dtype, np.dtype(p["new_dtype"])
        if src == dst:
            return ins[0]
        return self.b.node("Cast", [ins[0]], to=helper.np_dtype_to_tensor_dtype(dst))

    def _reshape(self, eqn, ins, p):
        in_shape, new = eqn.invars[0].aval.shape, tuple(p["new_sizes"])
        if p.get("dimensions") not in (None, ()):
            raise UnsupportedOpError("reshape with dimensions=")
        if not in_shape or not new or in_shape[0] != new[0]:
            raise UnsupportedOpError(f"reshape {in_shape} -> {new} moves the batch axis")
        shape = np.asarray([0, *new[1:]], np.int64)  # 0: copy the batch dimension
        return self.b.node("Reshape", [ins[0], self.b.const(shape, "shape")])

    def _squeeze(self, eqn, ins, p):
        _keep_batch_axis("squeeze", p["dimensions"])
        return self.b.node("Squeeze", [ins[0], self.b.const(np.asarray(p["dimensions"], np.int64), "axes")])

    def _expand_dims(self, eqn, ins, p):
        _keep_batch_axis("expand_dims", p["dimensions"])
        return self.b.node("Unsqueeze", [ins[0], self.b.const(np.asarray(p["dimensions"], np.int64), "axes")])

    def _broadcast_in_dim(self, eqn, ins, p):
        in_shape, shape, dims = eqn.invars[0].aval.shape, tuple(p["shape"]), tuple(p["broadcast_dimensions"])
        if not dims or dims[0] != 0:
            raise UnsupportedOpError(f"broadcast of an activation {in_shape} -> {shape} onto a new batch axis")
        expanded = [1] * len(shape)
        for d, size in zip(dims, in_shape):
            expanded[d] = size
        expanded[0] = 0  # copy the batch dimension
        x = self.b.node("Reshape", [ins[0], self.b.const(np.asarray(expanded, np.int64), "shape")])
        target = np.asarray([1, *shape[1:]], np.int64)  # 1: keep the input's batch dimension
        return self.b.node("Expand", [x, self.b.const(target, "shape")])

    def _transpose(self, eqn, ins, p):
        perm = [int(a) for a in p["permutation"]]
        if perm[0] != 0:
            raise UnsupportedOpError(f"transpose {perm} moves the batch axis")
        return self.b.node("Transpose", [ins[0]], perm=perm)

    def _concatenate(self, eqn, ins, p):
        _keep_batch_axis("concatenate", (p["dimension"],))
        return self.b.node("Concat", [self.name(x) for x in ins], axis=int(p["dimension"]))

    def _split(self, eqn, ins, p):
        _keep_batch_axis("split", (p["axis"],))
        sizes = self.b.const(np.asarray(p["sizes"], np.int64), "split")
        return list(self.b.node("Split", [ins[0], sizes], outputs=len(p["sizes"]), axis=int(p["axis"]))) \
            if len(p["sizes"]) > 1 else [ins[0]]

    def _slice(self, eqn, ins, p):
        start, limit = list(p["start_indices"]), list(p["limit_indices"])
        strides = list(p["strides"] or [1] * len(start))
        shape = eqn.invars[0].aval.shape
        if start[0] != 0 or limit[0] != shape[0] or strides[0] != 1:
            raise UnsupportedOpError("slice along the batch axis")
        axes = list(range(len(start)))
        consts = [self.b.const(np.asarray(v[1:], np.int64), n) for v, n in
                  ((start, "starts"), (limit, "ends"), (axes, "axes"), (strides, "steps"))]
        return self.b.node("Slice", [ins[0], *consts])

    def _pad(self, eqn, ins, p):
        config = p["padding_config"]
        if any(i != 0 for _, _, i in config) or any(lo < 0 or hi < 0 for lo, hi, _ in config):
            raise UnsupportedOpError("interior or negative padding")
        _keep_batch_axis("pad", [a for a, (lo, hi, _) in enumerate(config) if lo or hi])
        pads = np.asarray([lo for lo, _, _ in config] + [hi for _, hi, _ in config], np.int64)
        value = np.asarray(ins[1], eqn.invars[0].aval.dtype).reshape(())
        return self.b.node("Pad", [ins[0], self.b.const(pads, "pads"), self.b.const(value, "pad_value")])

    def _reduce(self, op: str, eqn, ins, p):
        axes = tuple(p["axes"])
        _keep_batch_axis(op, axes)
        return self.b.node(op, [ins[0], self.b.const(np.asarray(axes, np.int64), "axes")], keepdims=0)

    def _reduce_sum(self, eqn, ins, p):
        return self._reduce("ReduceSum", eqn, ins, p)

    def _reduce_max(self, eqn, ins, p):
        return self._reduce("ReduceMax", eqn, ins, p)

    def _reduce_window_max(self, eqn, ins, p):
        return self._pool("MaxPool", eqn, ins, p)

    def _reduce_window_sum(self, eqn, ins, p):
        # sum pooling = average pooling (padding counted) times the window size
        window = int(np.prod(p["window_dimensions"]))
        avg = self._pool("AveragePool", eqn, ins, p, count_include_pad=1)
        return self.b.node("Mul", [avg, self.b.const(np.asarray(window, eqn.invars[0].aval.dtype))])

    def _pool(self, op: str, eqn, ins, p, **attrs):
        ndim = len(p["window_dimensions"])
        window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        if window[0] != 1 or window[-1] != 1 or strides[0] != 1 or strides[-1] != 1:
            raise UnsupportedOpError(f"{op} window {window} over the batch or channel axis")
        if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            raise UnsupportedOpError(f"dilated {op}")
        spatial = range(1, ndim - 1)
        pads = [padding[i][0] for i in spatial] + [padding[i][1] for i in spatial]
        x = self.b.node("Transpose", [ins[0]], perm=_to_nchw(ndim))
        y = self.b.node(op, [x], kernel_shape=[int(window[i]) for i in spatial],
                        strides=[int(strides[i]) for i in spatial], pads=[int(v) for v in pads], **attrs)
        return self.b.node("Transpose", [y], perm=_to_nhwc(ndim))

    # ------------------------------------------------------------------ conv / matmul

    def conv(self, eqn, x: str, w_oihw: str, *, integer: bool = False, zero_points=(None, None)) -> str:
        """The conv_general_dilated `eqn` (NHWC / HWIO / NHWC) on x, with an OIHW kernel; integer:
        ConvInteger (uint8 codes, int8 weights, with zero points) giving an int32 accumulator."""
        p = eqn.params
        ndim = len(eqn.invars[0].aval.shape)
        dn = p["dimension_numbers"]
        nhwc = (0, ndim - 1, *range(1, ndim - 1))
        hwio = (ndim - 1, ndim - 2, *range(0, ndim - 2))
        if tuple(dn.lhs_spec) != nhwc or tuple(dn.rhs_spec) != hwio or tuple(dn.out_spec) != nhwc:
            raise UnsupportedOpError(f"convolution with dimension numbers {dn} (the export reads NHWC / HWIO)")
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise UnsupportedOpError("transposed or batch-grouped convolution")
        pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
        attrs = dict(strides=[int(s) for s in p["window_strides"]], pads=[int(v) for v in pads],
                     dilations=[int(d) for d in p["rhs_dilation"]], group=int(p["feature_group_count"]))
        xt = self.b.node("Transpose", [x], perm=_to_nchw(ndim))
        if integer:
            za, zw = zero_points
            y = self.b.node("ConvInteger", [xt, w_oihw, za, zw], hint="acc", **attrs)
        else:
            y = self.b.node("Conv", [xt, w_oihw], **attrs)
        return self.b.node("Transpose", [y], perm=_to_nhwc(ndim))

    def _conv_general_dilated(self, eqn, ins, p):
        x, w = ins
        if isinstance(w, str):
            raise UnsupportedOpError("a convolution whose kernel is computed in the graph")
        ndim = w.ndim
        return self.conv(eqn, self.name(x), self.b.const(np.transpose(w, (ndim - 1, ndim - 2, *range(ndim - 2))),
                                                         "kernel"))

    def _dot_general(self, eqn, ins, p):
        x, w = ins
        ((lc, rc), (lb, rb)) = p["dimension_numbers"]
        xdim = len(eqn.invars[0].aval.shape)
        if lb or rb or tuple(lc) != (xdim - 1,) or tuple(rc) != (0,) or isinstance(w, str):
            raise UnsupportedOpError(f"dot_general with dimension numbers {p['dimension_numbers']} "
                                     f"(the export reads x @ kernel)")
        return self.b.node("MatMul", [self.name(x), self.name(np.asarray(w), "kernel")])
