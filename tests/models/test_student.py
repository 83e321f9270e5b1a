"""Quantized students built from the model registry, initialised from their FP teachers.

To stay fast, variables are built from `jax.eval_shape(model.init)` and filled in NumPy (no
compiled init), and each model compiles one fused function (calibrate + forward).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from qkd_jax.models import copy_teacher_to_student, get_model
from qkd_jax.quant.calibration import calibrate
from qkd_jax.quant.layer_quant import PLACEHOLDER_VALUES
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.quant.rules import describe, first_last_8bit, full_precision, resolve, sqakd_cifar, sqakd_cifar_vgg

# unsafe_rbg keys: the default threefry RNG costs seconds of XLA compile per shape on CPU
KEY = functools.partial(jax.random.key, impl="unsafe_rbg")

X = jax.random.normal(KEY(0), (8, 32, 32, 3))  # 8: the BatchNorm1d head needs a few samples
N_LAYERS = {"resnet20": 20, "vgg8": 6}  # conv + dense layers
RULES = {
    "fp": full_precision(),
    "resnet20-qkd8": sqakd_cifar("qkd", 8, 8),
    "resnet20-int2": sqakd_cifar("interval", 2, 2),
    "vgg8-qkd8": sqakd_cifar_vgg("qkd", 8, 8),
    "vgg8-fl-int2": first_last_8bit("interval", 2, 2),
}


def _fill(shapes, seed):
    """Variables of the given shapes: He-scaled truncated-normal kernels, small random biases / BN affine,
    unit running statistics, quantizer placeholders, zero deltas."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        names = [p.key for p in path]
        if "quant" in names:
            return jnp.full(s.shape, PLACEHOLDER_VALUES[names[-1]], s.dtype)
        if names[0] == "quant_delta" or names[-1] == "mean":
            return jnp.zeros(s.shape, s.dtype)
        if names[-1] == "var":
            return jnp.ones(s.shape, s.dtype)
        if names[-1] == "kernel":
            z = rng.normal(size=s.shape)
            z = np.where(np.abs(z) > 2, rng.uniform(-2, 2, size=s.shape), z)  # truncated, as flax's default
            return jnp.asarray(z * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
        base = 1.0 if names[-1] == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def teacher(name):
    """(model, variables whose running statistics are those of the batch X, eval-mode logits)."""
    model = get_model(name, 10)
    variables = _fill(jax.eval_shape(model.init, KEY(0), X), 1)

    @jax.jit
    def run(v):
        # running statistics -> the batch's statistics (momentum updates until converged), so the
        # eval-mode teacher computes what a train-mode pass does, as a trained teacher would
        def update(_, stats):
            _, new = model.apply({**v, "batch_stats": stats}, X, train=True, mutable=["batch_stats"])
            return new["batch_stats"]

        v = {**v, "batch_stats": jax.lax.fori_loop(0, 150, update, v["batch_stats"])}
        return v, model.apply(v, X, train=False)

    return (model, *run(variables))


@functools.lru_cache(maxsize=None)
def student(name, key):
    """(model, calibrated variables, eval-mode logits, intermediates) of the student RULES[key]."""
    conv, dense = quantized_layers(RULES[key])
    model = get_model(name, 10, conv=conv, dense=dense)
    _, t_vars, _ = teacher(name)
    variables = copy_teacher_to_student(t_vars, _fill(jax.eval_shape(model.init, KEY(0), X), 2))

    @jax.jit
    def run(v):
        v = calibrate(model, v, X, train=True)
        logits, st = model.apply(v, X, train=False, mutable=["intermediates"])
        return v, logits, st.get("intermediates", {})

    return (model, *run(variables))


def _rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("name", ["resnet20", "vgg8"])
def test_full_precision_student_reproduces_teacher(name):
    _, t_vars, t_logits = teacher(name)
    _, variables, logits, inter = student(name, "fp")
    assert "quant_delta" not in variables and not inter
    jax.tree.map(np.testing.assert_array_equal, variables, t_vars)
    np.testing.assert_allclose(logits, t_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, key8, key2", [
    ("resnet20", "resnet20-qkd8", "resnet20-int2"),
    ("vgg8", "vgg8-qkd8", "vgg8-fl-int2"),
])
def test_8bit_student_stays_close(name, key8, key2):
    """QKD's max-based intervals clip nothing, so its 8-bit layers are each < 1% off (EWGS's
    interval init clips activations at 3 std / sqrt(1 - 2/pi) and LSQ's 8-bit init step is
    coarse: a few % per layer). A random (untrained) teacher amplifies layer errors with depth
    (and its BatchNorm1d head, fitted on 8 samples, once more), hence the 15% bound."""
    _, _, t_logits = teacher(name)
    err8 = _rel_err(student(name, key8)[2], t_logits)
    err2 = _rel_err(student(name, key2)[2], t_logits)
    assert err8 < 0.15
    assert err2 > 5 * err8  # 2 bits is far away: the comparison measures something


@pytest.mark.parametrize("name, key, n_quant", [
    ("resnet20", "resnet20-int2", 18),
    ("vgg8", "vgg8-fl-int2", 6),
])
def test_2bit_weights_take_four_values(name, key, n_quant):
    _, variables, _, inter = student(name, key)
    resolved = resolve(RULES[key], variables)
    assert describe(RULES[key], variables).splitlines()[-1] == f"{n_quant} of {N_LAYERS[name]} layers quantized"
    inter = traverse_util.flatten_dict(inter)
    for path, lp in resolved.items():
        w_key = tuple(path.split("/")) + ("w_hat",)
        if not lp.quantized:
            assert w_key not in inter
            continue
        values = np.unique(np.asarray(inter[w_key][0]))
        if lp.w_bits == 2:
            np.testing.assert_allclose(values, [-1, -1 / 3, 1 / 3, 1], atol=1e-6, err_msg=path)
        else:  # the 8-bit first / last layers
            assert 4 < len(values) <= 2**lp.w_bits, path


@pytest.mark.parametrize("name, key, n_quant_params", [
    ("resnet20", "resnet20-int2", 18 * 5),  # w_lower, w_upper, a_lower, a_upper, output_scale each
    ("vgg8", "vgg8-fl-int2", 6 * 5),
])
def test_gradients_reach_every_weight_and_quantizer_parameter(name, key, n_quant_params):
    """Every kernel and quantizer parameter gets a gradient in a training-mode pass, except
    `output_scale`: every quantized conv here feeds a BatchNorm, and a training-mode BatchNorm
    normalises its input's scale away (BN(c y) = BN(y) up to its epsilon), so the training
    gradient of output_scale is mathematically ~eps / var (measured 1e-7..1e-3 against ~10 in
    eval mode) and its float32 value, zero included, is rounding noise. Its gradient is checked
    in eval mode, where the running statistics make the scale matter."""
    model, variables, _, _ = student(name, key)
    r = jax.random.normal(KEY(3), (X.shape[0], 10))

    def grads_of(train):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, X, train=train, mutable=["batch_stats"])
            return jnp.sum(logits * r)

        return traverse_util.flatten_dict(jax.jit(jax.grad(loss))(variables["params"]))

    grads, eval_grads = grads_of(True), grads_of(False)
    quant = [k for k in grads if "quant" in k]
    kernels = [k for k in grads if k[-1] == "kernel"]
    assert len(kernels) == N_LAYERS[name] and len(quant) == n_quant_params
    for k in quant + kernels:
        g = eval_grads[k] if k[-1] == "output_scale" else grads[k]
        assert float(jnp.abs(g).max()) > 0, "/".join(k)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())


def test_imagenet_style_student_traces_with_depthwise_convs():
    """MobileNetV2 (depthwise convs, every layer quantized, 8-bit first/last) through init and
    calibration, abstractly (jax.eval_shape: no compile)."""
    rules = first_last_8bit("lsq", 4, 4)
    conv, dense = quantized_layers(rules)
    model = get_model("mobilenet_v2", 10, conv=conv, dense=dense)
    x = jnp.zeros((2, 32, 32, 3))
    shapes = jax.eval_shape(model.init, KEY(0), x)
    assert describe(rules, shapes).splitlines()[-1] == "53 of 53 layers quantized"
    new = jax.eval_shape(lambda v: calibrate(model, v, x, train=True), shapes)
    assert jax.tree.structure(new) == jax.tree.structure(shapes)
