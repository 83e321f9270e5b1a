"""ONNX export (quant/export/onnx_format.py) run in onnxruntime against the JAX integer inference.

The reference is `IntegerModel` (integer_inference.py), itself checked against the fake-quant
student in test_export.py. The container ONNX computes the same expression (exact int32
accumulators of the same integers, the same float32 scales), so its activation codes must equal
the reference's except where a layer input lies within float rounding of a rounding boundary
(onnxruntime divides by the scale where the quantizer multiplies by 1 / scale, and compiles the
float BatchNorm / residual ops differently): the rule of tests/e2e/test_export_digits.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason='the ONNX tests need the extra: pip install -e ".[onnx]"')
ort = pytest.importorskip("onnxruntime", reason='the ONNX tests need the extra: pip install -e ".[onnx]"')

from qkd_jax.quant import export as qexport  # noqa: E402
from qkd_jax.quant.export import codes as qcodes  # noqa: E402
from qkd_jax.quant.export.onnx_check import optimized_ops, session  # noqa: E402
from qkd_jax.quant.export.onnx_format import to_onnx  # noqa: E402
from qkd_jax.quant.layers import quantized_layers  # noqa: E402
from qkd_jax.quant.rules import Rule, rule_set, with_signed_inputs  # noqa: E402
from tests.quant.test_export import Branches, _name  # noqa: E402  (deep=True, concat=True: one (N, 5 * branches) output)

KEY = functools.partial(jax.random.key, impl="unsafe_rbg")

# Every method at every width the int8 containers hold (W8 of the interval / DoReFa / PACT weight
# grids needs odd integers up to 255: refused, test below), signed activation grids, and layers
# with one side quantized. (method, bits, a_signed, sides)
SPECS = [(m, b, False, "wa") for m in ("interval", "pact", "lsq", "dorefa", "qkd") for b in range(1, 9)
         if not (b == 8 and m in ("interval", "pact", "dorefa"))]
SPECS += [(m, b, True, "wa") for m in ("lsq", "qkd", "pact", "dorefa") for b in (2, 5)]
SPECS += [("interval", 3, False, "w"), ("lsq", 4, False, "a")]
# The fast tier's subset: every method, widths 1 to 8, every grid family (odd / zero-point /
# unsigned, signed activations), one-sided layers.
FAST_SPECS = [("interval", 2, False, "wa"), ("pact", 3, False, "wa"), ("lsq", 8, False, "wa"),
              ("dorefa", 1, False, "wa"), ("qkd", 4, False, "wa"), ("lsq", 2, True, "wa"),
              ("qkd", 5, True, "wa"), ("pact", 2, True, "wa"), ("dorefa", 5, True, "wa"),
              ("interval", 3, False, "w"), ("lsq", 4, False, "a")]


def _rules(specs):
    return rule_set(*[Rule(pattern=f"{_name(s)}_(c1|c2|fc)", method=s[0], w_bits=s[1] if "w" in s[3] else None,
                           a_bits=s[1] if "a" in s[3] else None, a_signed=s[2]) for s in specs])


# Quantizer parameters set directly (no calibration pass: it costs ~30 s of op-by-op dispatch for
# the toy). Kernels are N(0, 1/fan_in), inputs O(1): every grid gets several codes in use.
QUANT_PARAMS = {"w_lower": -0.45, "w_upper": 0.4, "a_lower": -0.1, "a_upper": 2.3, "a_alpha": 2.1,
                "w_step": 0.07, "a_step": 0.33, "w_interval": 0.37, "a_interval": 2.2, "output_scale": 1.3}


def _variables(model, x, seed):
    """Kernels N(0, 1/fan_in), biases and BatchNorm means N(0, 0.2^2), scales and variances
    U(0.5, 2), quantizer parameters QUANT_PARAMS (test_export.py's filler, set directly)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(KEY(0), x[:1]))

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name in QUANT_PARAMS:
            return np.float32(QUANT_PARAMS[name])
        if name == "kernel":
            return (rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if name in ("bias", "mean"):
            return rng.normal(0, 0.2, shape).astype(np.float32)
        return rng.uniform(0.5, 2.0, shape).astype(np.float32)  # BatchNorm scale, var

    return {c: jax.tree_util.tree_map_with_path(fill, shapes[c]) for c in ("params", "batch_stats") if c in shapes}


def _code_units(x: np.ndarray, entry: dict, grid: qcodes.Grid) -> np.ndarray:
    """The activation quantizer's pre-rounding value in code units (float64): codes = round(u)."""
    x = x.astype(np.float64)
    if entry["method"] == "interval":
        p = entry["activation"]["params"]
        u = (x - p["a_lower"]) / max(p["a_upper"] - p["a_lower"], 2**-23) * (grid.levels - 1)
    else:
        u = x / grid.scale + grid.zero_point
    return np.clip(u, 0, grid.levels - 1)


def _reference(model, exported, x):
    """IntegerModel logits, and per quantized-activation layer its input and activation codes."""
    integer_model = qexport.IntegerModel(model, exported)
    logits, inputs = integer_model.with_layer_inputs(x)
    codes = {}
    for path, info in integer_model.layers.items():
        if info.a_grid is not None:
            params = integer_model.runtime["layers"][path]["a_params"]
            codes[path] = np.asarray(qcodes.activation_codes(info.lp, inputs[path], params, info.a_grid))
    return np.asarray(logits), {p: np.asarray(v) for p, v in inputs.items()}, codes


def _run(proto, x) -> dict:
    sess = session(proto.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"images": np.asarray(x)})))


def _assert_codes_match(exported, ref_inputs, ref_codes, got: dict) -> np.ndarray:
    """Walks the quantized layers in call order; returns `clean` (images whose codes all agree).

    At the first layer where an image's codes differ, each difference must be one code step with
    the two inputs (reference, onnxruntime) on either side of the rounding boundary between them;
    inputs of clean images agree to 1e-3 code units (a wrong scale, zero point or affine would
    move them by whole steps)."""
    n = len(next(iter(ref_inputs.values())))
    clean = np.ones(n, bool)
    for path, k_ref in ref_codes.items():
        entry, grid = exported.layers[path], exported.activation_grid(path)
        k_got = got[f"codes:{path}"].astype(np.int64)
        u_ref = _code_units(ref_inputs[path], entry, grid)
        u_got = _code_units(got[f"input:{path}"], entry, grid)
        assert np.abs(u_ref - u_got)[clean].max(initial=0) <= 1e-3, path
        assert np.array_equal(np.round(u_got), k_got), path  # the codes are the rounded inputs
        differs = (k_ref != k_got).reshape(n, -1)
        first = clean & differs.any(axis=1)
        if first.any():
            a, b = u_ref[first][differs[first]], u_got[first][differs[first]]
            boundary = np.floor(np.minimum(a, b)) + 0.5
            assert np.all(np.abs(np.round(a) - np.round(b)) == 1), path
            assert np.all((np.minimum(a, b) <= boundary) & (boundary <= np.maximum(a, b))), path
        clean &= ~first
    return clean


def _integer_layer_counts(exported) -> tuple[int, int]:
    both = [e for e in exported.layers.values() if e["w_bits"] is not None and e["a_bits"] is not None]
    return sum(e["type"] == "conv" for e in both), sum(e["type"] == "dense" for e in both)


def _toy(specs):
    names = tuple(_name(s) for s in specs)
    conv, dense = quantized_layers(_rules(specs))
    model = Branches(names, conv, dense, deep=True, concat=True)
    # non-negative images: the unsigned specs' first layers read them on their unsigned grids
    x = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=(16, 8, 8, 3))), jnp.float32)
    exported = qexport.export_variables(model, _variables(model, x, 0), (8, 8, 3))
    logits, inputs, codes = _reference(model, exported, x)
    return dict(model=model, x=x, exported=exported, logits=logits, inputs=inputs, codes=codes, specs=specs)


@pytest.fixture(scope="module")
def toy():
    return _toy(FAST_SPECS)


def test_every_method_runs_on_integer_kernels(toy):
    _check_container(toy)


def test_strict_and_float_types(toy):
    _check_strict_and_float(toy)


@pytest.mark.slow
def test_every_method_and_width():
    """The checks above for every method at every width the containers hold."""
    toy = _toy(SPECS)
    _check_container(toy)
    _check_strict_and_float(toy)


def _check_container(toy):
    """Container types, every method and width: activation codes equal the integer inference's
    (boundary rule), logits of clean images equal to float rounding, same top-1; onnxruntime's
    optimized graph runs every two-sided quantized conv as ConvInteger and dense as MatMulInteger,
    and only the one-sided layers as float convs."""
    proto = to_onnx(toy["model"], toy["exported"], types="container", debug_inputs=True)
    got = _run(proto, toy["x"])
    clean = _assert_codes_match(toy["exported"], toy["inputs"], toy["codes"], got)
    assert clean.sum() >= len(clean) - 2, f"{(~clean).sum()} images had a code flip"
    ref, logits = toy["logits"], got["logits"]
    np.testing.assert_allclose(logits[clean], ref[clean], rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.array_equal(logits.argmax(-1)[clean], ref.argmax(-1)[clean])
    ops = optimized_ops(proto.SerializeToString())
    convs, denses = _integer_layer_counts(toy["exported"])
    two_sided = len(toy["specs"]) - 2
    assert (ops["ConvInteger"], ops["MatMulInteger"]) == (convs, denses) == (2 * two_sided, two_sided)
    float_convs = ops["Conv"] + ops["FusedConv"] + ops["NchwcConv"]
    assert float_convs == 4  # the weights-only and activations-only branches' two convs
    assert ops["MatMul"] + ops["Gemm"] + ops["FusedGemm"] + ops["FusedMatMul"] == 2


def _check_strict_and_float(toy):
    """'strict': 2-bit grids in INT2/UINT2 and 3-4-bit in INT4/UINT4 initializers (opset 25), float
    Conv in onnxruntime, logits of the integer inference to float rounding (a flipped code allowed
    on a few images), a smaller file than 'container'. 'float': float32 weights, same logits."""
    container = to_onnx(toy["model"], toy["exported"], types="container").SerializeToString()
    strict = to_onnx(toy["model"], toy["exported"], types="strict")
    assert strict.opset_import[0].version == 25
    types = {t.data_type for t in strict.graph.initializer}
    assert {onnx.TensorProto.INT2, onnx.TensorProto.UINT2, onnx.TensorProto.INT4, onnx.TensorProto.UINT4} <= types
    assert len(strict.SerializeToString()) < len(container)
    floats = to_onnx(toy["model"], toy["exported"], types="float")
    assert not any(t.data_type == onnx.TensorProto.INT8 for t in floats.graph.initializer)
    ref = toy["logits"]
    for proto in (strict, floats):
        ops = optimized_ops(proto.SerializeToString())
        assert ops["ConvInteger"] == ops["MatMulInteger"] == ops["QLinearConv"] == 0
        logits = _run(proto, toy["x"])["logits"]
        close = np.all(np.abs(logits - ref) <= 1e-5 * np.abs(ref).max(), axis=-1)
        assert close.sum() >= len(close) - 2
        assert np.array_equal(logits.argmax(-1)[close], ref.argmax(-1)[close])


@pytest.mark.parametrize("spec, types, message", [
    (("lsq", 1, True, "wa"), "container", r"layer lsq1s_c1: lsq 1-bit signed activations take the values \+-s"),
    (("interval", 8, False, "wa"), "container", r"layer interval8_c1: interval W8 weights take integers in "
                                                r"\[-255, 255\], beyond an int8 container"),
    (("dorefa", 8, False, "wa"), "strict", r"layer dorefa8_c1: dorefa W8 weights"),
], ids=["signed-1-bit-activations", "interval-W8-container", "dorefa-W8-strict"])
def test_unrepresentable_layers_are_refused(spec, types, message):
    conv, dense = quantized_layers(_rules([spec]))
    model = Branches((_name(spec),), conv, dense, deep=True, concat=True)
    x = jnp.asarray(np.abs(np.random.default_rng(1).normal(size=(2, 8, 8, 3))), jnp.float32)
    exported = qexport.export_variables(model, _variables(model, x, 1), (8, 8, 3))
    with pytest.raises(qexport.ExportError, match=message):
        to_onnx(model, exported, types=types)


def _zoo_student(name: str, size: int, method: str = "lsq", bits: int = 3, batch: int = 8):
    from qkd_jax.models import get_model, signed_inputs
    from qkd_jax.quant.rules import first_last_8bit

    conv, dense = quantized_layers(with_signed_inputs(first_last_8bit(method, bits, bits), signed_inputs(name)))
    model = get_model(name, 10, conv=conv, dense=dense)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(batch, size, size, 3)), jnp.float32)
    return model, qexport.export_variables(model, _variables(model, x, 3), (size, size, 3)), x


def _check_zoo(model, exported, x):
    logits, inputs, codes = _reference(model, exported, x)
    proto = to_onnx(model, exported, types="container", debug_inputs=True)
    got = _run(proto, x)
    clean = _assert_codes_match(exported, inputs, codes, got)
    assert clean.sum() >= len(clean) - 1
    np.testing.assert_allclose(got["logits"][clean], logits[clean], rtol=0, atol=1e-5 * np.abs(logits).max())
    ops = optimized_ops(proto.SerializeToString())
    convs, denses = _integer_layer_counts(exported)
    assert (ops["ConvInteger"], ops["MatMulInteger"]) == (convs, denses) and convs + denses == len(exported.layers)
    return proto


def test_resnet20_round_trip_with_a_dynamic_batch():
    """ResNet-20 (first/last 8-bit, LSQ W3A3, 8x8 inputs, random weights): codes and logits as above,
    19 ConvInteger + 1 MatMulInteger, and the batch dimension is free (batches of 8 and 3 agree)."""
    model, exported, x = _zoo_student("resnet20", 8)
    proto = _check_zoo(model, exported, x)
    sess = session(proto.SerializeToString())
    full = sess.run(["logits"], {"images": np.asarray(x)})[0]
    np.testing.assert_array_equal(sess.run(["logits"], {"images": np.asarray(x[:3])})[0], full[:3])


@pytest.mark.slow
@pytest.mark.parametrize("name, size", [("resnet18", 32), ("resnet50", 32), ("mobilenet_v2", 32),
                                        ("shufflenet_v2_x0_5", 32), ("squeezenet1_0", 64),
                                        ("efficientnet_b0", 32), ("vgg8", 32), ("vgg11_bn_tiny", 32)])
def test_zoo_round_trip(name, size):
    """Every zoo family (depthwise, channel shuffle, fire modules, squeeze-excitation, VGG) exports
    with integer kernels for every quantized layer and matches the integer inference."""
    _check_zoo(*_zoo_student(name, size, batch=4))
