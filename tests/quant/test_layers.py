"""QConv / QDense against nn.Conv / nn.Dense and against NumPy fake quantization."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from qkd_jax.quant.layers import QConv, QDense, quantized_layers
from qkd_jax.quant.rules import LayerPrecision, Rule, full_precision, rule_set, uniform

# unsafe_rbg keys: the default threefry RNG costs seconds of XLA compile per shape on CPU
KEY = functools.partial(jax.random.key, impl="unsafe_rbg")

# ----------------------------------------------------------------- NumPy reference quantizers
# Written from docs/method.md section 2, independently of qkd_jax (np.round rounds half to even).


def np_disc(xn, levels):
    return np.round(xn * (levels - 1)) / (levels - 1)


def np_interval(x, lo, hi, bits, signed):
    xq = np_disc(np.clip((x - lo) / (hi - lo), 0, 1), 2**bits)
    return 2 * (xq - 0.5) if signed else xq


def np_signed_grid(x, alpha, bits):
    """Signed PACT / DoReFa (alpha = 1): step alpha / (2^(b-1) - 1), round(clip(x) / step) step;
    1 bit: +-alpha (x = 0 goes to -alpha, the half-to-even tie of the [0, 1] grid)."""
    if bits == 1:
        return np.where(x > 0, alpha, -alpha)
    step = alpha / (2 ** (bits - 1) - 1)
    return step * np.round(np.clip(x, -alpha, alpha) / step)


def np_pact(x, alpha, bits, signed=False):
    if signed:
        return np_signed_grid(x, alpha, bits)
    return alpha * np_disc(np.clip(x, 0, alpha) / alpha, 2**bits)


def np_lsq(x, s, bits, signed):
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return s * np.round(np.clip(x / s, -qn, qp))


def np_dorefa_w(w, bits):
    t = np.tanh(w)
    return 2 * np_disc(t / (2 * np.abs(t).max()) + 0.5, 2**bits) - 1


def np_dorefa_a(x, bits, signed=False):
    return np_signed_grid(x, 1.0, bits) if signed else np_disc(np.clip(x, 0, 1), 2**bits)


def np_qkd(x, interval, bits, signed):
    if signed:
        c = np.clip(x / interval, -1, 1)
        return interval * (2 * np_disc((c + 1) / 2, 2**bits - 1) - 1)
    return interval * np_disc(np.clip(x / interval, 0, 1), 2**bits)


def np_fake_quant(method, w, x, q, w_bits, a_bits, a_signed=False):
    """(w_hat, a_hat, output scale factor) of a layer, in float64 NumPy."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    q = {k: float(v) for k, v in q.items()}
    if method == "interval":
        return (np_interval(w, q["w_lower"], q["w_upper"], w_bits, True),
                np_interval(x, q["a_lower"], q["a_upper"], a_bits, False), abs(q["output_scale"]))
    if method == "pact":
        return np_dorefa_w(w, w_bits), np_pact(x, q["a_alpha"], a_bits, a_signed), 1.0
    if method == "lsq":
        return np_lsq(w, q["w_step"], w_bits, True), np_lsq(x, q["a_step"], a_bits, a_signed), 1.0
    if method == "dorefa":
        return np_dorefa_w(w, w_bits), np_dorefa_a(x, a_bits, a_signed), 1.0
    if method == "qkd":
        return np_qkd(w, q["w_interval"], w_bits, True), np_qkd(x, q["a_interval"], a_bits, a_signed), 1.0
    raise ValueError(method)


def np_conv(x, w, b=None, stride=1, pad=1, groups=1):
    """NHWC x HWIO convolution with symmetric zero padding, by explicit windows (float64)."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, cin_g, cout = w.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    # win: (N, Ho, Wo, C, kh, kw)
    outs = []
    cout_g = cout // groups
    for g in range(groups):
        xs = win[..., g * cin_g:(g + 1) * cin_g, :, :]
        ws = np.asarray(w, np.float64)[..., g * cout_g:(g + 1) * cout_g]
        outs.append(np.einsum("nhwcij,ijco->nhwo", xs, ws))
    y = np.concatenate(outs, axis=-1)
    return y if b is None else y + np.asarray(b, np.float64)


# Known quantizer parameters per method (output_scale negative: the layer uses its absolute value).
KNOWN = {
    "interval": {"w_lower": -0.3, "w_upper": 0.25, "a_lower": -0.5, "a_upper": 1.5, "output_scale": -1.7},
    "pact": {"a_alpha": 1.3},
    "lsq": {"w_step": 0.07, "a_step": 0.3},
    "dorefa": {},
    "qkd": {"w_interval": 0.4, "a_interval": 1.8},
}
NAMES = {m: sorted(v) for m, v in KNOWN.items()}


def _with_quant(variables, q, path=()):
    flat = traverse_util.flatten_dict(variables["params"])
    for k, v in q.items():
        assert path + ("quant", k) in flat
        flat[path + ("quant", k)] = jnp.asarray(v, jnp.float32)
    return {**variables, "params": traverse_util.unflatten_dict(flat)}


@pytest.fixture(scope="module")
def x_img():
    return jax.random.normal(KEY(0), (2, 6, 6, 4)) * 1.2 + 0.3


# --------------------------------------------------------------------------- full precision


@pytest.mark.parametrize("rules", [None, full_precision(), uniform("none", None, None)])
def test_full_precision_conv_equals_nn_conv(x_img, rules):
    kw = dict(features=6, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=2)
    ref = nn.Conv(**kw)
    v = ref.init(KEY(1), x_img)
    qv = QConv(**kw, rules=rules).init(KEY(1), x_img)
    assert jax.tree.structure(qv) == jax.tree.structure(v)
    np.testing.assert_array_equal(qv["params"]["kernel"], v["params"]["kernel"])
    np.testing.assert_array_equal(QConv(**kw, rules=rules).apply(v, x_img), ref.apply(v, x_img))


def test_full_precision_dense_equals_nn_dense():
    x = jax.random.normal(KEY(2), (3, 5))
    ref = nn.Dense(7, use_bias=False)
    v = ref.init(KEY(1), x)
    q = QDense(7, use_bias=False, rules=full_precision())
    assert jax.tree.structure(q.init(KEY(1), x)) == jax.tree.structure(v)
    np.testing.assert_array_equal(q.apply(v, x), ref.apply(v, x))


# ------------------------------------------------------------------- quantized vs reference


@pytest.mark.parametrize("method", sorted(KNOWN))
def test_quantized_conv_matches_numpy(x_img, method):
    layer = QConv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=2,
                  rules=LayerPrecision(method=method, w_bits=2, a_bits=3, output_scale=method == "interval"))
    v = _with_quant(layer.init(KEY(1), x_img), KNOWN[method])
    assert sorted(v["params"].get("quant", {})) == NAMES[method]
    w, b = np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
    w_hat, a_hat, scale = np_fake_quant(method, w, x_img, KNOWN[method], 2, 3)
    want = np_conv(a_hat, w_hat, b, stride=2, pad=1, groups=2) * scale
    np.testing.assert_allclose(layer.apply(v, x_img), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["interval", "lsq", "qkd", "pact", "dorefa"])
def test_quantized_dense_matches_numpy(method):
    x = jax.random.normal(KEY(3), (4, 5))
    layer = QDense(3, rules=uniform(method, 3, 4, a_signed=method != "interval"))
    v = _with_quant(layer.init(KEY(1), x), KNOWN[method])
    w, b = np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
    w_hat, a_hat, scale = np_fake_quant(method, w, x, KNOWN[method], 3, 4, a_signed=True)
    np.testing.assert_allclose(layer.apply(v, x), (a_hat @ w_hat + b) * scale, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- params and paths


class _Net(nn.Module):
    conv: type = nn.Conv
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(4, (3, 3), use_bias=False, name="stem")(x))
        x = nn.relu(self.conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="body")(x))
        return self.dense(3, name="classifier")(x.mean(axis=(1, 2)))


def test_param_tree_matches_nn_conv_plus_quant(x_img):
    teacher = traverse_util.flatten_dict(_Net().init(KEY(0), x_img))
    conv, dense = quantized_layers(uniform("interval", 2, 2))
    student = _Net(conv=conv, dense=dense).init(KEY(0), x_img)
    assert set(student) == {"params", "quant_delta"}  # no 'perturbations' / 'intermediates' at init
    flat = traverse_util.flatten_dict(student)
    plain = {k: v for k, v in flat.items() if "quant" not in k and k[0] != "quant_delta"}
    assert set(plain) == set(teacher)
    for k in teacher:
        assert plain[k].shape == teacher[k].shape
    for layer in ("stem", "body", "classifier"):
        assert sorted(student["params"][layer]["quant"]) == NAMES["interval"]
        assert sorted(student["quant_delta"][layer]) == ["a", "w"]
    # perturbations ('w_q', 'a_q') sit at the same layer paths as the deltas ('w', 'a')
    _, created = _Net(conv=conv, dense=dense).apply(student, x_img, mutable=["perturbations"])
    pert = {k[:-1] + (k[-1][0],) for k in traverse_util.flatten_dict(created["perturbations"])}
    assert pert == set(traverse_util.flatten_dict(student["quant_delta"]))


@pytest.mark.parametrize("method", sorted(KNOWN))
def test_per_method_parameter_names(x_img, method):
    v = QConv(3, (3, 3), rules=uniform(method, 4, 4)).init(KEY(0), x_img)
    assert sorted(v["params"].get("quant", {})) == NAMES[method]
    # weight-only / activation-only rules create only that side's parameters and deltas
    vw = QConv(3, (3, 3), rules=uniform(method, 4, None, output_scale=False)).init(KEY(0), x_img)
    assert sorted(vw["params"].get("quant", {})) == [n for n in NAMES[method] if n.startswith("w_")]
    assert sorted(vw["quant_delta"]) == ["w"]
    va = QConv(3, (3, 3), rules=uniform(method, None, 4, output_scale=False)).init(KEY(0), x_img)
    assert sorted(va["params"].get("quant", {})) == [n for n in NAMES[method] if n.startswith("a_")]
    assert sorted(va["quant_delta"]) == ["a"]


# ---------------------------------------------------------------- delta, perturbations, jit


def _setup_interval(x_img, bits=2):
    layer = QConv(5, (3, 3), rules=LayerPrecision(method="interval", w_bits=bits, a_bits=bits, output_scale=True))
    v = _with_quant(layer.init(KEY(1), x_img), KNOWN["interval"])
    r = jax.random.normal(KEY(7), layer.apply(v, x_img).shape)
    return layer, v, r


def test_quant_delta_changes_gradients_only(x_img):
    layer, v, r = _setup_interval(x_img)

    def loss(params, delta):
        return jnp.sum(layer.apply({"params": params, "quant_delta": delta}, x_img) * r)

    zero = {"w": jnp.float32(0.0), "a": jnp.float32(0.0)}
    half = {"w": jnp.float32(0.5), "a": jnp.float32(0.5)}
    np.testing.assert_array_equal(loss(v["params"], zero), loss(v["params"], half))
    grad = jax.jit(jax.grad(loss))
    g0, g5 = grad(v["params"], zero), grad(v["params"], half)
    assert not np.allclose(g0["kernel"], g5["kernel"])
    assert not np.allclose(g0["quant"]["a_upper"], g5["quant"]["a_upper"])
    # without the collection the layer uses delta = 0 (STE)
    g_none = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x_img) * r)))(v["params"])
    jax.tree.map(np.testing.assert_array_equal, g_none, g0)
    assert jax.grad(loss, argnums=1)(v["params"], half)["w"] == 0.0  # no gradient to delta


def test_perturbations_give_grad_wrt_xq(x_img):
    layer, v, r = _setup_interval(x_img)
    _, created = layer.apply(v, x_img, mutable=["perturbations"])
    pert = jax.tree.map(jnp.zeros_like, created["perturbations"])
    assert set(pert) == {"w_q", "a_q"}

    def loss(p):
        return jnp.sum(layer.apply({**v, "perturbations": p}, x_img) * r)

    g = jax.grad(loss)(pert)
    # reference: y = |s| * conv(a_hat, w_hat) + b-term, w_hat = 2 x_q - 1, a_hat = x_q
    w_hat, a_hat, scale = np_fake_quant("interval", v["params"]["kernel"], x_img, KNOWN["interval"], 2, 2)
    dims = ("NHWC", "HWIO", "NHWC")
    conv = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), "SAME", dimension_numbers=dims)
    _, vjp = jax.vjp(conv, jnp.asarray(a_hat, jnp.float32), jnp.asarray(w_hat, jnp.float32))
    ga, gw = vjp(r * scale)
    np.testing.assert_allclose(g["a_q"], ga, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["w_q"], 2 * gw, rtol=1e-4, atol=1e-5)
    # a zero perturbation leaves the output unchanged
    np.testing.assert_array_equal(layer.apply({**v, "perturbations": pert}, x_img), layer.apply(v, x_img))


@pytest.mark.parametrize("method", sorted(KNOWN))
def test_jit_and_grad(x_img, method):
    rules = rule_set(Rule(pattern="stem", fp=True), Rule(pattern=".*", method=method, w_bits=3, a_bits=3))
    conv, dense = quantized_layers(rules)
    model = _Net(conv=conv, dense=dense)
    v = model.init(KEY(0), x_img)
    for layer in ("body", "classifier"):
        v = _with_quant(v, KNOWN[method], path=(layer,))

    def loss(params):
        return jnp.sum(model.apply({**v, "params": params}, x_img) ** 2)

    np.testing.assert_allclose(jax.jit(model.apply)(v, x_img), model.apply(v, x_img), rtol=1e-6, atol=1e-6)
    grads = jax.jit(jax.grad(loss))(v["params"])
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for layer in ("stem", "body", "classifier"):
        assert float(jnp.abs(grads[layer]["kernel"]).sum()) > 0
    for path, g in traverse_util.flatten_dict(grads).items():
        if "quant" in path and path[0] == "body":
            assert float(jnp.abs(g)) > 0, path


def test_intermediates_record_fake_quantized_tensors(x_img):
    layer, v, _ = _setup_interval(x_img)
    _, st = layer.apply(v, x_img, mutable=["intermediates"])
    (w_hat,), (a_hat,) = st["intermediates"]["w_hat"], st["intermediates"]["a_hat"]
    w_ref, a_ref, _ = np_fake_quant("interval", v["params"]["kernel"], x_img, KNOWN["interval"], 2, 2)
    np.testing.assert_allclose(w_hat, w_ref, atol=1e-6)
    np.testing.assert_allclose(a_hat, a_ref, atol=1e-6)


def test_factories_are_drop_in():
    conv, dense = quantized_layers(full_precision())
    assert isinstance(conv(4, (3, 3)), nn.Conv) and isinstance(dense(2), nn.Dense)
    assert conv.func is QConv and dense.func is QDense and isinstance(conv, functools.partial)
