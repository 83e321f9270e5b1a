"""Integer export: exact dequantization, integer inference against the fake-quant student,
the file format and its validator, the size report, and checkpoint / CLI errors.

Reference values are written here from docs/method.md section 3 (grid scales), independently of
qkd_jax.quant.export.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkd_jax.quant import export as qexport
from qkd_jax.quant.calibration import calibrate
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.quant.rules import Rule, first_last_8bit, rule_set, with_signed_inputs
from qkd_jax.run.export_checkpoint import export_checkpoint, load_model

ROOT = pathlib.Path(__file__).resolve().parents[2]

# unsafe_rbg keys: the default threefry RNG costs seconds of XLA compile per shape on CPU
KEY = functools.partial(jax.random.key, impl="unsafe_rbg")

# Logit tolerance, relative to the largest |logit|. The integer accumulator is exact; the
# fake-quant student sums float32 products of float32-rounded grid values (relative error ~1e-7
# each, 8 to 576 products per output here) in float32, and both paths round the rescaling and the
# BatchNorm affine (folded here, not in the student) once or twice: a few 1e-7 relative per
# layer, measured <= 6e-7 relative after the 20 layers of the ResNet. 1e-5 leaves a margin of
# >10; an activation code flipping between the paths (an input within ~1e-7 of a rounding
# boundary) moves a logit by a grid step, far above it, and fails it.
RTOL = 1e-5

# (method, bits, a_signed, which sides are quantized)
SPECS = [(m, b, False, "wa") for m in ("interval", "pact", "lsq", "dorefa", "qkd") for b in range(1, 9)]
SPECS += [(m, b, True, "wa") for m in ("lsq", "qkd", "pact", "dorefa") for b in (1, 2, 5)]
SPECS += [("interval", 3, False, "w"), ("lsq", 4, False, "a")]


def _name(spec) -> str:
    m, b, signed, sides = spec
    return f"{m}{b}{'s' if signed else ''}{'' if sides == 'wa' else '_' + sides}"


def _rules(specs):
    out = []
    for spec in specs:
        m, b, signed, sides = spec
        out.append(Rule(pattern=f"{_name(spec)}_(c1|c2|fc)", method=m, w_bits=b if "w" in sides else None,
                        a_bits=b if "a" in sides else None, a_signed=signed))
    # every '_c1' reads the (signed) image: declared signed, as a model declares its stem
    return with_signed_inputs(rule_set(*out), ".*_c1")


def _signed(spec, path) -> bool:
    """Whether the layer's input grid is signed: '_c1' layers read the image, the rest ReLU outputs."""
    return spec[2] or path.endswith("_c1")


class Branches(nn.Module):
    """One small conv net per precision spec, side by side: logits of shape (branches, N, 5), or
    (N, 5 * branches) concatenated on the class axis with `concat` (one output for ONNX).

    Each branch: strided conv -> BN -> ReLU [-> grouped 'SAME' conv -> BN -> ReLU if deep] ->
    mean pool -> dense with bias; every conv/dense quantized by the branch's rule."""

    names: tuple
    conv: object
    dense: object
    deep: bool = False
    concat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        outs = []
        for n in self.names:
            y = self.conv(8, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"{n}_c1")(x)
            y = nn.relu(bn(name=f"{n}_bn1")(y))
            if self.deep:
                y = self.conv(8, (3, 3), padding="SAME", feature_group_count=2, name=f"{n}_c2")(y)
                y = nn.relu(bn(name=f"{n}_bn2")(y))
            outs.append(self.dense(5, name=f"{n}_fc")(jnp.mean(y, axis=(1, 2))))
        return jnp.concatenate(outs, axis=-1) if self.concat else jnp.stack(outs)


def _random_variables(model, x, seed):
    """params / batch_stats of the model's shapes, filled with NumPy (no init compile): kernels
    N(0, 1/fan_in), biases N(0, 0.1^2), non-trivial BatchNorm (init gives the identity);
    quantizer parameters are placeholders for `calibrate`."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(KEY(0), x[:1]))

    def fill(path, leaf):
        name = path[-1].key
        shape = leaf.shape
        if name == "kernel":
            return (rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if name in ("bias", "mean"):
            return rng.normal(0, 0.2, shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return np.ones(shape, np.float32)  # quantizer parameters (overwritten by calibrate)

    return {c: jax.tree_util.tree_map_with_path(fill, shapes[c]) for c in ("params", "batch_stats")}


def _student(model, x, seed=0, jit_calibrate=False):
    """Random variables, quantizers calibrated on x in eval mode; then the student's eval logits
    and its fake-quantized weights ('intermediates') from one compiled forward pass."""
    v = _random_variables(model, x, seed)
    if jit_calibrate:
        v = jax.jit(lambda v, x: calibrate(model, v, x, train=False))(v, x)
    else:  # op by op: cheaper than compiling many small branches
        v = calibrate(model, v, x, train=False)
    logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(v, x)
    return jax.device_get(v), np.asarray(logits), jax.device_get(state["intermediates"])


def _node(tree, path):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _assert_top1_agree(int_logits, fake_logits, tol):
    """Same top-1 class; where the fake logits tie (within tol), any of the tied classes."""
    top = fake_logits.max(axis=-1, keepdims=True)
    tied = fake_logits >= top - tol
    picked = np.take_along_axis(tied, int_logits.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    assert picked.all(), f"{(~picked).sum()} of {picked.size} predictions differ"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Every method at every bit width (plus signed-activation, weights-only and
    activations-only layers) in one model, exported, compared in one test (one compile)."""
    names = tuple(_name(s) for s in SPECS)
    conv, dense = quantized_layers(_rules(SPECS))
    model = Branches(names, conv, dense)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8, 8, 3)), jnp.float32)
    variables, fake, inter = _student(model, x)
    path = qexport.export_variables(model, variables, (8, 8, 3)).save(tmp_path_factory.mktemp("toy") / "toy.npz")
    exported = qexport.IntegerExport.load(path)  # everything below reads the file back
    int_logits = np.asarray(qexport.IntegerModel(model, exported)(x))
    return dict(variables=variables, fake=fake, inter=inter, exported=exported, int_logits=int_logits, names=names)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A three-branch deep model (strided and grouped convs, two BNs, dense with bias) exported,
    saved and loaded: for the file format, validator and size report tests."""
    specs = [("interval", 2, False, "wa"), ("pact", 2, False, "wa"), ("qkd", 2, False, "wa")]
    conv, dense = quantized_layers(_rules(specs))
    model = Branches(tuple(_name(s) for s in specs), conv, dense, deep=True)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables, fake, _ = _student(model, x, seed=5)
    exported = qexport.export_variables(model, variables, (8, 8, 3))
    path = exported.save(tmp_path_factory.mktemp("export") / "small.npz")
    return dict(model=model, x=x, variables=variables, fake=fake, exported=exported, path=path,
                loaded=qexport.IntegerExport.load(path))


def _expected_weight_scale(spec, kernel, q):
    """s of w_hat = s * q (docs/method.md section 3), q the signed integer of the code."""
    m, b = spec[0], spec[1]
    if m == "interval" or (m in ("pact", "dorefa") and b > 1):
        return 1.0 / (2**b - 1)  # 2 x_q - 1 = (2k - (L-1)) / (L-1)
    if m in ("pact", "dorefa"):
        return float(np.mean(np.abs(kernel)))  # sign(w) * E
    if m == "lsq":
        return float(q["w_step"])
    return float(q["w_interval"]) / (1 if b == 1 else 2 ** (b - 1) - 1)  # qkd


def _expected_activation_scale(spec, q, signed):
    """s of a_hat = s * q: width / (2^b - 1) unsigned, width / (2^(b-1) - 1) signed (1 bit: width);
    width = 1 (DoReFa), alpha (PACT), I (QKD); LSQ: its step; interval: 1 / (2^b - 1) always."""
    m, b = spec[0], spec[1]
    if m == "interval":
        return 1.0 / (2**b - 1)
    if m == "lsq":
        return float(q["a_step"])
    width = {"dorefa": 1.0, "pact": float(q.get("a_alpha", 0)), "qkd": float(q.get("a_interval", 0))}[m]
    if not signed:
        return width / (2**b - 1)
    return width / (1 if b == 1 else 2 ** (b - 1) - 1)


def _check_spec(toy, spec) -> None:
    """Every check of one precision spec (raises AssertionError)."""
    exp, name = toy["exported"], _name(spec)
    for path in (f"{name}_c1", f"{name}_fc"):
        node = _node(toy["variables"]["params"], path)
        q = node.get("quant", {})
        entry = exp.layers[path]
        assert (entry["w_bits"] is not None) == ("w" in spec[3]) and (entry["a_bits"] is not None) == ("a" in spec[3])
        if "w" in spec[3]:
            # exported-then-dequantized == the student's fake-quantized weights, exactly (float32)
            w_hat = np.asarray(_node(toy["inter"], path)["w_hat"][0])
            deq = exp.dequantize(path)
            assert deq.dtype == np.float32 and deq.shape == w_hat.shape
            np.testing.assert_array_equal(deq, w_hat, err_msg=path)
            grid = exp.weight_grid(path)
            np.testing.assert_allclose(grid.scale, _expected_weight_scale(spec, node["kernel"], q), rtol=1e-6)
            codes = exp.weight_codes(path)
            assert codes.dtype == np.uint8 and codes.max() < grid.levels <= 2 ** spec[1]
            # levels are float32 roundings of s * q (a few ulps of the largest level: 2 x_q - 1 cancels)
            ideal = grid.scale * exp.q_weights(path).astype(np.float64)
            np.testing.assert_allclose(deq, ideal, rtol=0, atol=4 * 2**-23 * np.abs(ideal).max())
            assert entry["weight"]["codes"]["packing"] == ("bitstream_le" if spec[1] <= 4 else "none")
            packed_bytes = -(-codes.size * spec[1] // 8) if spec[1] <= 4 else codes.size
            assert exp.arrays[entry["weight"]["codes"]["key"]].size == packed_bytes
        if "a" in spec[3]:
            grid = exp.activation_grid(path)
            assert entry["a_signed"] == _signed(spec, path)
            np.testing.assert_allclose(grid.scale, _expected_activation_scale(spec, q, _signed(spec, path)), rtol=1e-6)
            for k, value in entry["activation"]["params"].items():
                assert np.float32(value) == np.asarray(q[k])  # exact float32 round trip
        if entry["output_scale"] is not None:
            assert np.float32(entry["output_scale"]) == np.asarray(q["output_scale"])
    i = toy["names"].index(name)
    fake, got = toy["fake"][i], toy["int_logits"][i]
    tol = RTOL * max(np.abs(fake).max(), 1e-3)
    np.testing.assert_allclose(got, fake, rtol=0, atol=tol)
    _assert_top1_agree(got, fake, tol)


def test_every_method_and_bit_width(toy):
    """For interval, pact, lsq, dorefa, qkd at 1..8 bits (and signed activations, one-sided
    layers): dequantized weights equal the student's fake-quantized weights exactly; grids follow
    docs/method.md section 2; integer logits match the fake-quant eval logits within RTOL; same top-1."""
    failures = []
    for spec in SPECS:
        try:
            _check_spec(toy, spec)
        except AssertionError as err:
            failures.append(f"{_name(spec)}: {str(err).strip().splitlines()[0]}")
    assert not failures, "\n".join(failures)
    spread = toy["fake"].std(axis=1).max(axis=-1)  # the branches compute varied outputs
    assert (spread > 0).mean() > 0.9


def test_no_float_copy_of_quantized_weights(small):
    exp = small["exported"]
    for path, entry in exp.layers.items():
        floats = {k.rsplit("/", 1)[1]: a for k, a in exp.arrays.items()
                  if k.startswith(f"layers/{path}/") and a.dtype.kind == "f"}
        assert set(floats) <= {"levels", "bias"}  # a codebook of <= 2^b values and the bias
        assert floats["levels"].size <= 2 ** entry["w_bits"]
        assert exp.arrays[f"layers/{path}/codes"].dtype == np.uint8
        assert not any(key.startswith(f"fp/params/{path}/") for key in exp.arrays)


def test_file_round_trip(small):
    a, b = small["exported"], small["loaded"]
    checksums = b.manifest.pop("checksums")
    try:
        assert a.manifest == b.manifest  # the file's manifest is the export's plus the checksums
    finally:
        b.manifest["checksums"] = checksums
    # sha256 of every array's bytes (hashlib here, independently of the writer)
    assert checksums == {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
                         for k, v in a.arrays.items()}
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        assert a.arrays[k].dtype == b.arrays[k].dtype
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    sidecar = json.loads(small["path"].with_suffix(".json").read_text())
    assert sidecar == b.manifest
    assert sidecar["format"] == qexport.FORMAT and sidecar["version"] == qexport.VERSION
    got = np.asarray(qexport.IntegerModel(small["model"], b)(small["x"]))
    np.testing.assert_allclose(got, small["fake"], rtol=0, atol=RTOL * np.abs(small["fake"]).max())


def test_batchnorm_is_a_per_channel_affine(small):
    """y = (x - mean) * mul + add with mul = scale / sqrt(var + eps) (float64 reference; float32
    rsqrt and product: a few ulps), add = bias and mean stored as they are."""
    exp, params, stats = small["exported"], small["variables"]["params"], small["variables"]["batch_stats"]
    for name in ("interval2_bn1", "qkd2_bn2"):
        p, s = params[name], stats[name]
        entry = exp.manifest["batchnorm"][name]
        mul = p["scale"].astype(np.float64) / np.sqrt(s["var"].astype(np.float64) + 1e-5)
        np.testing.assert_allclose(exp.arrays[entry["mul"]["key"]], mul, rtol=1e-6)
        np.testing.assert_array_equal(exp.arrays[entry["add"]["key"]], p["bias"])
        np.testing.assert_array_equal(exp.arrays[entry["mean"]["key"]], s["mean"])


def test_size_report(small):
    exp = small["exported"]
    report = qexport.size_report(exp, str(small["path"]))
    n_params = sum(np.size(v) for v in jax.tree.leaves(small["variables"]["params"]))
    n_stats = sum(np.size(v) for v in jax.tree.leaves(small["variables"]["batch_stats"]))
    assert report.fp32_bytes == 4 * (n_params + n_stats)  # every variable accounted once
    assert report.params_fp32_bytes == 4 * n_params
    rows = {r.name: r for r in report.rows}
    row = rows["interval2_c1"]  # 3x3x3x8 = 216 codes of 2 bits = 54 bytes, 4 levels, 8 biases,
    # 4 scalars (weight scale, a_lower, a_upper, output scale)
    assert row.export_bytes == 54 + 4 * 4 + 8 * 4 + 4 * 4
    # kernel, bias, w_lower, w_upper, a_lower, a_upper, output_scale
    assert row.fp32_bytes == 4 * (216 + 8 + 5)
    assert rows["qkd2_c2"].export_bytes == 72 + 3 * 4 + 8 * 4 + 4 * 2  # 3x3x4x8 codes; 3 levels; I_X
    # mean, mul, add of 8 channels; the checkpoint holds mean, var, scale, bias
    assert rows["pact2_bn1"].export_bytes == 3 * 8 * 4 and rows["pact2_bn1"].fp32_bytes == 4 * 8 * 4
    text = report.format()
    assert "interval2_c1" in text and "total" in text and "export file on disk" in text
    assert report.file_bytes == pathlib.Path(small["path"]).stat().st_size  # save() returns an epath.Path


def test_zero_point_expansion_gives_the_same_accumulators():
    """'expand' (unsigned codes + zero-point correction convs) == 'fold' (signed q), exactly."""
    specs = [("interval", 3, False, "wa"), ("lsq", 4, True, "wa"), ("qkd", 3, True, "wa")]
    conv, dense = quantized_layers(_rules(specs))
    model = Branches(tuple(_name(s) for s in specs), conv, dense, deep=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 3)), jnp.float32)
    variables, fake, _ = _student(model, x, seed=1)
    exported = qexport.export_variables(model, variables, (8, 8, 3))
    fold = np.asarray(qexport.IntegerModel(model, exported, zero_points="fold")(x))
    expand = np.asarray(qexport.IntegerModel(model, exported, zero_points="expand")(x))
    np.testing.assert_array_equal(fold, expand)
    np.testing.assert_allclose(fold, fake, rtol=0, atol=RTOL * np.abs(fake).max())


def _layer_by_layer(model, integer_model, variables, x):
    """(fake output, integer output) of every exported layer on the *same* input: the fake-quant
    student runs as usual and each exported layer is also computed by the integer path on the
    input the student gave it (so no code can flip between the two)."""
    def forward(v, x):
        pairs = {}

        def interceptor(next_fun, args, kwargs, ctx):
            y = next_fun(*args, **kwargs)
            path = "/".join(ctx.module.path)
            if ctx.method_name == "__call__" and path in integer_model.layers:
                pairs[path] = (y, integer_model.integer_layer(ctx.module, args[0]))
            return y

        with nn.intercept_methods(interceptor):
            model.apply(v, x, train=False)
        return pairs

    return jax.device_get(jax.jit(forward)(variables, x))


def test_resnet20_first_last_8bit(tmp_path):
    """ResNet-20 (8x8 input): quantized stem with a signed input grid, 8-bit quantized classifier
    (a Dense with bias), W3A3 LSQ elsewhere.

    Layer by layer on identical inputs the integer path matches to float rounding. End to end
    an activation can lie within float rounding of a rounding boundary of its quantizer; then
    its code differs by one between the two paths (seen while writing this test with another
    initialisation: x / step = 2.5000002 in the student, exactly 2.5 in the integer path) and
    that example's later activations and logits move by a grid step (~4% there). That is a
    property of rounding two float evaluations, not an export error (chance ~1e-6 per activation
    here), so one example of 16 may differ beyond RTOL; the top-1 class of all must agree."""
    from qkd_jax.models import get_model, signed_inputs

    conv, dense = quantized_layers(with_signed_inputs(first_last_8bit("lsq", 3, 3), signed_inputs("resnet20")))
    model = get_model("resnet20", 10, conv=conv, dense=dense)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 8, 8, 3)), jnp.float32)
    variables, fake, inter = _student(model, x, seed=2, jit_calibrate=True)
    exported = qexport.export_variables(model, variables, (8, 8, 3))
    assert len(exported.layers) == 20 and exported.layers["stem"]["a_signed"]
    assert exported.layers["classifier"]["a_signed"]  # it reads head_bn, a BatchNorm of the pooled features
    assert exported.layers["classifier"]["w_bits"] == 8 and exported.layers["classifier"]["bias"] is not None
    for path in exported.layers:
        np.testing.assert_array_equal(exported.dequantize(path), np.asarray(_node(inter, path)["w_hat"][0]))
    integer_model = qexport.IntegerModel(model, exported)
    for path, (f, g) in _layer_by_layer(model, integer_model, variables, x).items():
        np.testing.assert_allclose(g, f, rtol=0, atol=RTOL * np.abs(f).max(), err_msg=path)
    got = np.asarray(integer_model(x))
    tol = RTOL * np.abs(fake).max()
    close = np.all(np.abs(got - fake) <= tol, axis=-1)
    assert close.sum() >= len(close) - 1, f"{(~close).sum()} examples differ"
    _assert_top1_agree(got, fake, tol)


# ---------------------------------------------------------------- manifest validation


def _corrupt(exp, edit):
    manifest, arrays = copy.deepcopy(exp.manifest), dict(exp.arrays)
    edit(manifest, arrays)
    return manifest, arrays


@pytest.mark.parametrize("edit, message", [
    (lambda m, a: m.update(version=1), r"version: this reader understands versions \(2, 3\)"),
    (lambda m, a: m.update(format="other"), r"format"),
    (lambda m, a: m["layers"]["interval2_c1"]["weight"].pop("grid"),
     r"layers\['interval2_c1'\]\.weight\.grid: missing"),
    (lambda m, a: m["layers"]["interval2_c1"]["weight"]["codes"].update(count=7), r"codes\.count: expected 216"),
    (lambda m, a: m["layers"]["interval2_c1"]["weight"]["grid"].update(zero_point=1), r"grid\.zero_point"),
    (lambda m, a: m["layers"]["interval2_c1"].update(method="ternary"), r"\.method: expected one of"),
    (lambda m, a: m["layers"]["interval2_c1"].update(w_bits=9), r"w_bits: expected an integer in \[1, 8\]"),
    (lambda m, a: m["layers"]["pact2_c1"]["activation"]["params"].update(a_alpha=-1.0),
     r"a_alpha: expected a finite positive"),
    (lambda m, a: m["layers"]["interval2_c1"].update(accumulator_bound=1), r"accumulator_bound: expected"),
    (lambda m, a: a.update({"layers/interval2_c1/levels": np.zeros(4, np.float64)}),
     r"float64\[4\], manifest says float32"),
    (lambda m, a: a.pop("layers/interval2_c1/codes"), r"is not in the archive"),
    (lambda m, a: a.update(stray=np.zeros(1)), r"not described by the manifest"),
    (lambda m, a: a.update({"layers/qkd2_c1/codes": np.full_like(a["layers/qkd2_c1/codes"], 0xFF)}),
     r"outside the grid's 3 levels"),
    (lambda m, a: m["layers"].clear(), r"layers: expected a non-empty object"),
])
def test_corrupted_manifest_fails_clearly(small, edit, message):
    qexport.validate_manifest(small["exported"].manifest, small["exported"].arrays)  # the original is valid
    manifest, arrays = _corrupt(small["exported"], edit)
    with pytest.raises(qexport.ManifestError, match=message):
        qexport.validate_manifest(manifest, arrays)


def test_corrupted_file_fails_clearly(small, tmp_path):
    with np.load(small["path"]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["__manifest__"] = np.frombuffer(b'{"format": "qkd_jax.integer_export", "vers', np.uint8)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(qexport.ManifestError, match="not valid JSON"):
        qexport.IntegerExport.load(bad)
    del arrays["__manifest__"]
    np.savez(bad, **arrays)
    with pytest.raises(qexport.ManifestError, match="not a qkd_jax export"):
        qexport.IntegerExport.load(bad)


def _archive(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _manifest(arrays) -> dict:
    return json.loads(arrays["__manifest__"].tobytes().decode("utf-8"))


def _write(path, arrays, manifest=None) -> pathlib.Path:
    """An .npz with `arrays` (and `manifest` as its embedded manifest when given)."""
    if manifest is not None:
        arrays = {**arrays, "__manifest__": np.frombuffer(json.dumps(manifest).encode(), np.uint8)}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "random", "npy", "pickle"])
def test_unreadable_file_is_a_manifest_error(small, tmp_path, damage):
    """numpy's own errors (BadZipFile, EOFError, the pickle refusal) become one ManifestError
    that names the file."""
    bad = tmp_path / "bad.npz"
    data = small["path"].read_bytes()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "npy":
        np.save(bad.with_suffix(".npy"), np.zeros(3))
        bad.with_suffix(".npy").rename(bad)
    else:
        import pickle

        bad.write_bytes(pickle.dumps({"not": "an export"}))
    with pytest.raises(qexport.ManifestError, match=f"{bad} is not a readable export archive"):
        qexport.IntegerExport.load(bad)


def test_flipped_code_fails_its_checksum(small, tmp_path):
    """One code changed to another valid code (same shape, inside the grid): only the checksum
    can tell, and it does."""
    arrays = _archive(small["path"])
    key = "layers/interval2_c1/codes"  # 2-bit codes, 4 levels: every bit pattern is a valid code
    codes = arrays[key].copy()
    codes[0] ^= 0b01
    arrays[key] = codes
    bad = _write(tmp_path / "flipped.npz", arrays)
    with pytest.raises(qexport.ManifestError, match=rf"{bad}: .*checksums\['{key}'\]: .*does not match"):
        qexport.IntegerExport.load(bad)


@pytest.mark.parametrize("key_of, value", [
    (lambda m: m["layers"]["interval2_c1"]["weight"]["levels"]["key"], np.nan),
    (lambda m: m["batchnorm"]["interval2_bn1"]["mul"]["key"], np.inf),
])
def test_non_finite_arrays_are_rejected(small, tmp_path, key_of, value):
    """A NaN level or an inf BatchNorm factor, with a checksum that matches the damaged array
    (so the finiteness check alone must catch it)."""
    arrays = _archive(small["path"])
    manifest = _manifest(arrays)
    key = key_of(manifest)
    damaged = arrays[key].copy()
    damaged[1] = value
    arrays[key] = damaged
    manifest["checksums"][key] = hashlib.sha256(damaged.tobytes()).hexdigest()
    bad = _write(tmp_path / "nonfinite.npz", {k: v for k, v in arrays.items() if k != "__manifest__"}, manifest)
    with pytest.raises(qexport.ManifestError, match=rf"{bad}: .*array '{key}': 1 non-finite value"):
        qexport.IntegerExport.load(bad)


def test_version_3_needs_checksums_and_version_2_loads_with_a_warning(small, tmp_path):
    arrays = _archive(small["path"])
    manifest = _manifest(arrays)
    plain = {k: v for k, v in arrays.items() if k != "__manifest__"}
    del manifest["checksums"]
    bad = _write(tmp_path / "v3.npz", plain, manifest)
    with pytest.raises(qexport.ManifestError, match=rf"{bad}: .*checksums: missing"):
        qexport.IntegerExport.load(bad)
    old = _write(tmp_path / "v2.npz", plain, {**manifest, "version": 2})
    with pytest.warns(UserWarning, match="version 2 export without checksums"):
        loaded = qexport.IntegerExport.load(old)
    for key, value in small["exported"].arrays.items():
        np.testing.assert_array_equal(loaded.arrays[key], value)


# ---------------------------------------------------------------- checkpoints and the CLI


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A run directory with a 'teacher' (FP) and a 'student' phase checkpoint of the digits demo
    (ResNet-20, interval W2A2; 8x8 inputs to keep it small), saved with the run's checkpointer."""
    from qkd_jax.run import build
    from qkd_jax.train.checkpoint import PhaseCheckpointer
    from qkd_jax.train.state import create_train_state

    root = tmp_path_factory.mktemp("run")
    spec = importlib.util.spec_from_file_location("_digits_demo", ROOT / "configs" / "digits_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.dataset.image_size = 8
    shape = build.input_shape(config)
    for phase, network in (("teacher", build.teacher_network), ("student", build.student_network)):
        model = network(config).local_model
        v = jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape)), train=False))(KEY(3))
        v = {k: v[k] for k in ("params", "batch_stats")}
        state = create_train_state(apply_fn=model.apply, variables=v, tx=optax.sgd(0.1), rng=KEY(0))
        ckpt = PhaseCheckpointer(root / phase)
        kind = "teacher" if phase == "teacher" else "student"
        ckpt.save(state, meta={"phase": phase, "kind": kind, "completed": True, "config": config.to_json()})
        ckpt.close()
    (root / "config.json").write_text(config.to_json())
    return root, config


def test_export_checkpoint_and_cli(workdir, tmp_path, capsys):
    from qkd_jax.export import main

    root, _ = workdir
    out = tmp_path / "student.npz"
    assert main([f"--workdir={root}", "--phase=student", f"--out={out}"]) == 0
    text = capsys.readouterr().out
    assert "layer1_0/conv1" in text and "interval W2A2" in text and "total" in text
    loaded = qexport.IntegerExport.load(out)
    assert loaded.manifest["source"]["phase"] == "student" and len(loaded.layers) == 18
    assert out.with_suffix(".json").is_file()
    model = load_model(loaded)  # rebuilt from the stored config
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8, 1)), jnp.float32)
    assert qexport.IntegerModel(model, loaded)(x).shape == (2, 10)


def test_teacher_phase_is_rejected(workdir, tmp_path, capsys):
    from qkd_jax.export import main

    root, _ = workdir
    with pytest.raises(qexport.FullPrecisionModelError, match="full-precision model"):
        export_checkpoint(root, "teacher")
    assert main([f"--workdir={root}", "--phase=teacher", f"--out={tmp_path / 't.npz'}"]) == 2
    assert "teacher" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


def test_fp_params_under_a_student_phase_are_rejected(workdir, tmp_path):
    """Detection from the variables too: an FP tree saved as a 'student' phase."""
    import shutil

    root, _ = workdir
    other = tmp_path / "run"
    shutil.copytree(root / "teacher", other / "fp_student")
    meta_file = next((other / "fp_student").glob("*/meta/metadata"))
    meta = json.loads(meta_file.read_text())
    meta["kind"] = "student"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(qexport.FullPrecisionModelError, match="no quantizer parameters"):
        export_checkpoint(other, "fp_student")


def test_missing_phase_is_rejected(workdir, tmp_path, capsys):
    from qkd_jax.export import main

    root, _ = workdir
    with pytest.raises(qexport.ExportError, match=r"no phase directory .*sqakd.*\['student', 'teacher'\]"):
        export_checkpoint(root, "sqakd")
    assert main([f"--workdir={root}", "--phase=sqakd", f"--out={tmp_path / 'x.npz'}"]) == 2
    assert "no phase directory" in capsys.readouterr().err


def test_mismatched_config_is_rejected(workdir, tmp_path, capsys):
    from qkd_jax.export import main

    root, config = workdir
    other = copy.deepcopy(config)
    other.model.num_classes = 7
    expected = r"classifier/kernel: config \(64, 7\), checkpoint \(64, 10\)"
    with pytest.raises(qexport.ConfigMismatchError, match=expected):
        export_checkpoint(root, "student", config=other)
    other = copy.deepcopy(config)
    other.quant.method = "lsq"
    path = tmp_path / "lsq.json"
    path.write_text(other.to_json())
    assert main([f"--workdir={root}", "--phase=student", f"--out={tmp_path / 'x.npz'}", f"--config={path}"]) == 2
    err = capsys.readouterr().err
    assert "does not describe the checkpoint" in err and "quant/w_step: in the config's model" in err
