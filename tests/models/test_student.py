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

X = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
N_LAYERS = {"resnet20": 20, "vgg8": 6}  # conv + dense layers
RULES = {
    "fp": full_precision(),
    "resnet20-int8": sqakd_cifar("interval", 8, 8),
    "resnet20-int2": sqakd_cifar("interval", 2, 2),
    "vgg8-lsq8": sqakd_cifar_vgg("lsq", 8, 8),
    "vgg8-lsq2": sqakd_cifar_vgg("lsq", 2, 2),
    "vgg8-fl-lsq2": first_last_8bit("lsq", 2, 2),
}


def _fill(shapes, seed):
    """Variables of the given shapes: He-normal kernels, small random biases / BN affine,
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
            return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
        base = 1.0 if names[-1] == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.lru_cache(maxsize=None)
def teacher(name):
    """(model, variables with the batch's running statistics, eval-mode logits)."""
    model = get_model(name, 10)
    variables = _fill(jax.eval_shape(model.init, jax.random.key(0), X), 1)

    @jax.jit
    def run(v):
        _, stats = model.apply(v, X, train=True, mutable=["batch_stats"])
        v = {**v, **stats}
        return v, model.apply(v, X, train=False)

    return (model, *run(variables))


@functools.lru_cache(maxsize=None)
def student(name, key):
    """(model, calibrated variables, eval-mode logits, intermediates) of the student RULES[key]."""
    conv, dense = quantized_layers(RULES[key])
    model = get_model(name, 10, conv=conv, dense=dense)
    _, t_vars, _ = teacher(name)
    variables = copy_teacher_to_student(t_vars, _fill(jax.eval_shape(model.init, jax.random.key(0), X), 2))

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


@pytest.mark.parametrize("name, key8, key2, tol", [
    ("resnet20", "resnet20-int8", "resnet20-int2", 0.05),
    ("vgg8", "vgg8-lsq8", "vgg8-lsq2", 0.1),  # LSQ's init step 2 mean|w| / sqrt(Q_P) is coarser
])
def test_8bit_student_stays_close(name, key8, key2, tol):
    _, _, t_logits = teacher(name)
    err8 = _rel_err(student(name, key8)[2], t_logits)
    err2 = _rel_err(student(name, key2)[2], t_logits)
    assert err8 < tol
    assert err2 > 3 * err8  # 2 bits is clearly further away: the comparison measures something


@pytest.mark.parametrize("name, key, n_quant", [
    ("resnet20", "resnet20-int2", 18),
    ("vgg8", "vgg8-lsq2", 4),
    ("vgg8", "vgg8-fl-lsq2", 6),
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
            assert len(values) == 4, (path, values)
            if lp.method == "interval":
                np.testing.assert_allclose(values, [-1, -1 / 3, 1 / 3, 1], atol=1e-6)
        else:  # the 8-bit first / last layers
            assert 4 < len(values) <= 2**lp.w_bits, path


@pytest.mark.parametrize("name, key, n_quant_params", [
    ("resnet20", "resnet20-int2", 18 * 5),  # w_lower, w_upper, a_lower, a_upper, output_scale
    ("vgg8", "vgg8-fl-lsq2", 6 * 2),  # w_step, a_step
])
def test_gradients_reach_every_weight_and_quantizer_parameter(name, key, n_quant_params):
    model, variables, _, _ = student(name, key)
    r = jax.random.normal(jax.random.key(3), (2, 10))

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, X, train=True, mutable=["batch_stats"])
        return jnp.sum(logits * r)

    grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(variables["params"]))
    quant = [k for k in grads if "quant" in k]
    kernels = [k for k in grads if k[-1] == "kernel"]
    assert len(kernels) == N_LAYERS[name] and len(quant) == n_quant_params
    for k in quant + kernels:
        assert float(jnp.abs(grads[k]).max()) > 0, "/".join(k)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
