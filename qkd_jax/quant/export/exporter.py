"""From a trained student (variables, or a phase checkpoint) to an `IntegerExport`.

    exported = export_variables(student, variables, input_shape=(16, 16, 1))
    exported = export_checkpoint('/tmp/qkd_digits', 'sqakd')      # newest completed step
    exported.save('student.npz')

What goes in (see fileformat.py for the file and codes.py for the grids):
  * every quantized QConv / QDense: weight codes (bit-packed), the weight grid (scale, integer
    offset) and the float32 codebook, the activation quantizer's parameters and grid, the
    output scale, the bias;
  * every BatchNorm as a per-channel affine y = (x - mean) * mul + add, mul = scale /
    sqrt(var + eps), add = bias (flax's inference expression). It stays a float op after the
    layer's dequantized int32 accumulator: folding it into integer weights would change the
    codes (not exact);
  * everything else (FP stem / classifier, any other variable) as float arrays.
No float copy of a quantized kernel is stored.

The fake-quantized weights are read from the student's own compiled forward pass (the
'intermediates' it sows), so the codebook holds exactly the float32 values the student computes
with; the model is traced once on a zero batch to find its conv / dense / BatchNorm layers
(flax method interception), with BatchNorm on running statistics.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

from qkd_jax.quant.export import codes as qcodes
from qkd_jax.quant.export.fileformat import FORMAT, INT32_MAX, VERSION, IntegerExport
from qkd_jax.quant.export.packing import PACKING, UNPACKED, pack_codes
from qkd_jax.quant.layer_quant import QUANT
from qkd_jax.quant.layers import layer_precision
from qkd_jax.quant.rules import FULL_PRECISION, LayerPrecision

#: Weights of up to this many bits are bit-packed; wider codes are stored one per byte.
PACK_MAX_BITS = 4


class ExportError(ValueError):
    """The model or checkpoint cannot be exported."""


class FullPrecisionModelError(ExportError):
    """The model has no quantized layer (e.g. the 'teacher' phase)."""


class ConfigMismatchError(ExportError):
    """The config builds a model whose variables differ from the checkpoint's."""


@dataclasses.dataclass
class LayerCall:
    path: str
    kind: str  # 'conv' | 'dense'
    lp: LayerPrecision
    calls: int = 0


@dataclasses.dataclass
class NormCall:
    path: str
    axis: tuple[int, ...]
    epsilon: float
    use_scale: bool
    use_bias: bool


def _bn_running_average(mod: nn.BatchNorm, args: tuple, kwargs: dict) -> bool:
    call_value = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    return bool(nn.module.merge_param("use_running_average", mod.use_running_average, call_value))


def canonical_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def survey(model: nn.Module, variables: Mapping[str, Any], input_shape, apply_kwargs: Mapping[str, Any]):
    """Traces the model once on zeros: its conv/dense layers (with their precision) and
    BatchNorms, in call order, and the 'intermediates' the quantized layers sow (w_hat)."""
    layers: dict[str, LayerCall] = {}
    norms: dict[str, NormCall] = {}

    def interceptor(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__":
            mod = ctx.module
            path = "/".join(mod.path)
            if isinstance(mod, (nn.Conv, nn.Dense)):
                rules = getattr(mod, "rules", None)
                lp = layer_precision(mod, rules) if rules is not None else FULL_PRECISION
                call = layers.setdefault(path, LayerCall(path, "conv" if isinstance(mod, nn.Conv) else "dense", lp))
                call.calls += 1
                if lp.quantized and isinstance(mod, nn.Conv) and mod.mask is not None:
                    raise ExportError(f"layer {path}: masked convolutions are not supported by the export")
            elif isinstance(mod, nn.BatchNorm):
                if not _bn_running_average(mod, args, kwargs):
                    raise ExportError(f"BatchNorm {path} runs on batch statistics: export in inference mode "
                                      f"(apply_kwargs={dict(apply_kwargs)} must select running averages)")
                norms[path] = NormCall(path, canonical_axes(args[0].ndim, mod.axis), float(mod.epsilon),
                                       bool(mod.use_scale), bool(mod.use_bias))
        return next_fun(*args, **kwargs)

    def forward(v, x):
        with nn.intercept_methods(interceptor):
            _, state = model.apply(v, x, mutable=["intermediates"], **apply_kwargs)
        # Only the fake-quantized weights leave the function: XLA drops the rest of the forward
        # pass (convolutions, activations), which keeps the compile small.
        flat = traverse_util.flatten_dict(unfreeze(state.get("intermediates", {})))
        return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] == "w_hat"})

    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    inter = jax.device_get(jax.jit(forward)(dict(variables), dummy))
    return layers, norms, unfreeze(inter)


def _subtree(tree: Mapping[str, Any], path: str) -> Any:
    node = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _f32(value: Any) -> float:
    """A float32 value as a Python float (exact; JSON writes it back exactly)."""
    return float(np.asarray(value, np.float32).reshape(()))


def _ref(arrays: dict, key: str, value: np.ndarray) -> dict:
    arrays[key] = value
    return {"key": key, "shape": list(value.shape), "dtype": str(value.dtype)}


def _layer_entry(call: LayerCall, node: Mapping[str, Any], w_hat: Optional[np.ndarray], arrays: dict) -> dict:
    lp, path = call.lp, call.path
    unknown = set(node) - {"kernel", "bias", QUANT}
    if unknown:
        raise ExportError(f"layer {path} holds variables the export does not know: {sorted(unknown)}")
    kernel = np.asarray(node["kernel"], np.float32)
    q = {k: np.asarray(v) for k, v in dict(node.get(QUANT, {})).items()}
    entry: dict[str, Any] = {
        "type": call.kind,
        "kernel_shape": list(kernel.shape),
        "method": lp.method,
        "w_bits": lp.w_bits,
        "a_bits": lp.a_bits,
        "a_signed": bool(lp.a_signed),
    }
    prefix = f"layers/{path}"
    max_q_w = max_q_a = None
    if lp.w_bits is not None:
        if w_hat is None:
            raise ExportError(f"layer {path}: its fake-quantized weights were not recorded")
        try:
            wc = qcodes.encode_weight(lp, q, w_hat)
        except ValueError as err:
            raise ExportError(f"layer {path}: {err}") from None
        packing = PACKING if lp.w_bits <= PACK_MAX_BITS else UNPACKED
        packed = pack_codes(wc.codes, lp.w_bits) if packing == PACKING else wc.codes.reshape(-1).astype(np.uint8)
        codes_ref = _ref(arrays, f"{prefix}/codes", packed)
        entry["weight"] = {
            "bits": lp.w_bits,
            "codes": {**codes_ref, "packing": packing, "count": int(wc.codes.size)},
            "levels": _ref(arrays, f"{prefix}/levels", wc.levels),
            "grid": wc.grid.to_json(),
            "quantizer_params": {k: _f32(q[k]) for k in qcodes.WEIGHT_PARAMS[lp.method]},
        }
        max_q_w = wc.grid.max_abs_q
    else:
        entry["weight"] = {"bits": None, "kernel": _ref(arrays, f"{prefix}/kernel", kernel)}
    if lp.a_bits is not None:
        grid = qcodes.activation_grid(lp, q)
        entry["activation"] = {
            "bits": lp.a_bits,
            "signed": bool(lp.a_signed),
            "params": {k: _f32(q[k]) for k in qcodes.ACTIVATION_PARAMS[lp.method]},
            "grid": grid.to_json(),
        }
        max_q_a = grid.max_abs_q
    else:
        entry["activation"] = None
    entry["output_scale"] = _f32(q["output_scale"]) if lp.output_scale else None
    entry["bias"] = _ref(arrays, f"{prefix}/bias", np.asarray(node["bias"], np.float32)) if "bias" in node else None
    bound = 0
    if max_q_w is not None and max_q_a is not None:
        bound = int(np.prod(kernel.shape[:-1])) * max_q_w * max_q_a
        if bound > INT32_MAX:
            raise ExportError(f"layer {path}: |sum q_a q_w| can reach {bound}, beyond int32 accumulation")
    entry["accumulator_bound"] = bound
    return entry


def _fold_batchnorm(norm: NormCall, params: Mapping[str, Any],
                    stats: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, mul, add) of y = (x - mean) * mul + add: flax's own inference expression and ops,
    mul = rsqrt(var + eps) * scale, add = bias (0 without one), all float32. Keeping flax's
    expression (rather than x * mul + (bias - mean * mul)) makes the integer reference compute
    exactly what the fake-quant model computes, so activation codes downstream stay identical."""
    mean = jnp.asarray(stats["mean"], jnp.float32)
    var = jnp.asarray(stats["var"], jnp.float32)
    mul = jax.lax.rsqrt(var + norm.epsilon)
    if norm.use_scale:
        mul = mul * jnp.asarray(params["scale"], jnp.float32)
    add = jnp.asarray(params["bias"], jnp.float32) if norm.use_bias else jnp.zeros_like(mean)
    return tuple(np.asarray(a, np.float32) for a in (mean, mul, add))


def _count(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def export_variables(
    model: nn.Module,
    variables: Mapping[str, Any],
    input_shape,
    *,
    config_json: Optional[str] = None,
    source: Optional[dict] = None,
    apply_kwargs: Optional[Mapping[str, Any]] = None,
) -> IntegerExport:
    """Exports a quantized flax model (QConv / QDense layers) with its variables.

    Args:
      model: the student module (built with quantized layer factories).
      variables: its 'params' and 'batch_stats' (other collections are ignored).
      input_shape: one example's shape, e.g. (16, 16, 1); the model is traced on zeros of it.
      config_json: the run config, stored so `load_model` can rebuild the model.
      source: provenance written to the manifest.
      apply_kwargs: keyword arguments for inference (default {'train': False}).

    Raises:
      FullPrecisionModelError: the model has no quantized layer.
      ExportError: a layer cannot be represented exactly (see codes.encode_weight).
    """
    apply_kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    variables = {k: unfreeze(v) for k, v in dict(variables).items() if k in ("params", "batch_stats")}
    params = variables.get("params", {})
    stats = variables.get("batch_stats", {})
    layers, norms, inter = survey(model, variables, tuple(input_shape), apply_kwargs)
    quantized = [c for c in layers.values() if c.lp.quantized]
    if not quantized:
        raise FullPrecisionModelError(
            "the model has no quantized layer (every conv/dense layer is full precision): there "
            "is nothing to export as integers. Export a quantized student (e.g. the 'calibrate', "
            "'sqakd' or 'qat' phase), not the FP teacher.")
    full_range = [c.path for c in quantized if c.lp.full_range]
    if full_range:
        raise ExportError(
            f"layers {full_range} are released 'full-range' (32-bit) layers: they apply float transforms "
            f"(tanh / max normalisation, a +-6 clip) that have no integer grid, so the model cannot be "
            f"exported as integers. Use a preset without them (e.g. quant.preset='uniform'), or export "
            f"the student of a textbook-variant run.")
    arrays: dict[str, np.ndarray] = {}
    manifest_layers: dict[str, Any] = {}
    consumed: set[tuple[str, ...]] = set()
    for call in quantized:
        node = _subtree(params, call.path)
        if node is None or "kernel" not in node:
            raise ExportError(f"params hold no kernel for quantized layer {call.path}")
        recorded = _subtree(inter, call.path) or {}
        w_hat = recorded.get("w_hat", (None,))[0] if call.lp.w_bits is not None else None
        manifest_layers[call.path] = _layer_entry(call, node, None if w_hat is None else np.asarray(w_hat), arrays)
        consumed.add(("params", *call.path.split("/")))
    manifest_norms: dict[str, Any] = {}
    for norm in norms.values():
        p = _subtree(params, norm.path) or {}
        s = _subtree(stats, norm.path)
        if s is None or "mean" not in s or "var" not in s:
            raise ExportError(f"batch_stats hold no running statistics for BatchNorm {norm.path}")
        if set(p) - {"scale", "bias"} or set(s) - {"mean", "var"}:
            raise ExportError(f"BatchNorm {norm.path} holds unexpected variables")
        mean, mul, add = _fold_batchnorm(norm, p, s)
        manifest_norms[norm.path] = {
            "axis": list(norm.axis),
            "epsilon": norm.epsilon,
            "use_scale": norm.use_scale,
            "use_bias": norm.use_bias,
            "mean": _ref(arrays, f"bn/{norm.path}/mean", mean),
            "mul": _ref(arrays, f"bn/{norm.path}/mul", mul),
            "add": _ref(arrays, f"bn/{norm.path}/add", add),
        }
        consumed.add(("params", *norm.path.split("/")))
        consumed.add(("batch_stats", *norm.path.split("/")))
    fp: dict[str, Any] = {}
    for collection in ("params", "batch_stats"):
        for key, value in traverse_util.flatten_dict(variables.get(collection, {})).items():
            full = (collection, *key)
            if any(full[: len(c)] == c for c in consumed):
                continue
            name = "/".join(full)
            fp[name] = _ref(arrays, f"fp/{name}", np.asarray(value))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"input_shape": [int(d) for d in input_shape], "apply_kwargs": apply_kwargs},
        "config": config_json,
        "source": source,
        "layers": manifest_layers,
        "batchnorm": manifest_norms,
        "fp": fp,
        "reference": {"params_count": _count(params), "batch_stats_count": _count(stats)},
    }
    try:
        json.dumps(manifest)
    except TypeError as err:
        raise ExportError(f"apply_kwargs/source must be JSON serialisable: {err}") from None
    return IntegerExport(manifest, arrays).validate()
