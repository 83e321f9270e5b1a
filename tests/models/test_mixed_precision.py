"""bfloat16 compute (config.compute_dtype='bfloat16') against float32 compute.

What must be exact: the state (params, optimizer state, BatchNorm statistics, quantizer
parameters, EWGS deltas) stays float32; the logits and features reach the losses in float32; a
quantized layer's w_hat / a_hat are the float32 quantizers' outputs, so they lie on the same grid
as in float32 compute, and the integer operands of the integer conv are exact in bfloat16.
What is bounded: a bf16 train step against the fp32 one (bounds stated at each test).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import distill
from qkd_jax.models import get_model
from qkd_jax.quant import calibration
from qkd_jax.quant import rules as qrules
from qkd_jax.quant.layer_quant import input_scale, weight_scale
from qkd_jax.quant.layers import QConv, quantized_layers
from qkd_jax.quant.methods import QUANT_METHODS
from qkd_jax.quant.rules import LayerPrecision
from qkd_jax.train.optim import GroupSpec, build_optimizer
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import train_step

SIZE, BATCH = 16, 32


def _data():
    rng = np.random.default_rng(0)
    return {"image": jnp.asarray(rng.normal(size=(BATCH, SIZE, SIZE, 3)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)}


def _model(dtype, quant: bool):
    kw = {}
    if quant:
        conv, dense = quantized_layers(qrules.sqakd_cifar_vgg("lsq", 4, 4))
        kw = dict(conv=conv, dense=dense)
    return get_model("vgg8", 10, dtype=dtype, **kw)


def _variables(quant: bool, data) -> dict:
    """The same float32 variables for both compute dtypes (initialised and calibrated in fp32)."""
    model = _model(jnp.float32, quant)
    v = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    v = {k: x for k, x in v.items() if k in ("params", "batch_stats", "quant_delta")}
    return calibration.calibrate(model, v, data["image"]) if quant else v


def _run(dtype, quant: bool, steps: int, data, variables):
    model = _model(dtype, quant)
    tx = build_optimizer(GroupSpec(optimizer="sgd", learning_rate=0.01, momentum=0.9),
                         GroupSpec(optimizer="adam", learning_rate=1e-3), steps_per_epoch=10, total_steps=10)
    state = create_train_state(apply_fn=model.apply, variables=variables, tx=tx, rng=jax.random.key(1))
    step = jax.jit(functools.partial(train_step, objective=distill.task(), axis_name=None))
    losses, params = [], [state.params]
    for _ in range(steps):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
        params.append(state.params)
    return np.asarray(losses), params, state


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def test_every_integer_grid_is_exact_in_bfloat16():
    """The integer conv feeds q_a and q_w to the conv in the compute dtype: bfloat16 holds every
    integer of magnitude <= 2^8 exactly, and every registered grid of <= 8 bits stays within it."""
    for name, method in QUANT_METHODS.items():
        if name == "none":
            continue
        for bits in range(1, 9):
            try:
                grids = [method.weight_grid(bits)] + [method.input_grid(bits, s) for s in (False, True)]
            except ValueError:  # the released records take 2..8 bits
                continue
            for levels, mult, zero in grids:
                q = mult * np.arange(levels, dtype=np.int64) - zero
                assert np.abs(q).max() <= 256, (name, bits)
                assert np.array_equal(np.asarray(jnp.asarray(q, jnp.bfloat16), np.int64), q)


@pytest.mark.parametrize("method,signed", [("lsq", False), ("interval", True)])
def test_bf16_layer_quantizes_in_float32_on_the_same_grid(method, signed):
    """A bf16 QConv's w_hat / a_hat equal the fp32 layer's on the bf16-rounded input exactly (the
    quantizers run in float32), and its output is the fp32 output up to bfloat16 rounding."""
    lp = LayerPrecision(method=method, w_bits=8, a_bits=8, a_signed=signed)
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 16), jnp.float32)
    x = x if signed else jnp.abs(x)
    xb = jnp.asarray(x, jnp.bfloat16)
    layer = lambda dtype: QConv(8, (3, 3), padding=1, rules=lp, dtype=dtype)  # noqa: E731
    variables = layer(jnp.float32).init(jax.random.key(4), x)
    variables = calibration.calibrate(layer(jnp.float32), variables, x)
    y16, m16 = layer(jnp.bfloat16).apply(variables, xb, mutable=["intermediates"])
    y32, m32 = layer(jnp.float32).apply(variables, xb.astype(jnp.float32), mutable=["intermediates"])
    assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
    for name in ("w_hat", "a_hat"):
        a, b = m16["intermediates"][name][0], m32["intermediates"][name][0]
        assert a.dtype == jnp.float32 and np.array_equal(np.asarray(a), np.asarray(b)), name
    q = variables["params"]["quant"]
    s_a = np.asarray(input_scale(lp, q))
    a_hat = np.asarray(m16["intermediates"]["a_hat"][0])
    np.testing.assert_allclose(a_hat / s_a, np.round(a_hat / s_a), atol=1e-3)
    w_hat = m16["intermediates"]["w_hat"][0]
    s_w = np.asarray(weight_scale(lp, q, w_hat))
    np.testing.assert_allclose(np.asarray(w_hat) / s_w, np.round(np.asarray(w_hat) / s_w), atol=1e-3)
    # The integer sums are accumulated in float32 and rounded once to bfloat16 (<= 2^-9 relative),
    # then scaled by s_a s_w cast to bfloat16 (<= 2^-9) in one bf16 product (<= 2^-9), and for
    # 'interval' by |output_scale| (two more): <= 5 roundings of 2^-9, i.e. about 5 * 2^-9.
    y16, y32 = np.asarray(y16, np.float64), np.asarray(y32, np.float64)
    assert np.all(np.abs(y16 - y32) <= 5.1 * 2.0**-9 * np.abs(y32) + 1e-6)


@pytest.mark.slow  # calibrates and trains VGG-8 (the bf16 step's dtypes are also read from its lowered module: tests/train/test_lowering.py)
def test_bf16_train_step_keeps_the_state_float32():
    data = _data()
    _, _, state = _run(jnp.bfloat16, True, 1, data, _variables(True, data))
    dtypes = {str(a.dtype) for a in jax.tree.leaves((state.params, state.batch_stats, state.quant_delta))}
    dtypes |= {str(a.dtype) for a in jax.tree.leaves(state.opt_state) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert dtypes == {"float32"}
    assert "quant" in state.params["stage2_conv1"]
    logits = _model(jnp.bfloat16, True).apply(state.variables(), data["image"], train=False)
    assert logits.dtype == jnp.float32


@pytest.mark.slow  # six compiled VGG-8 train steps
def test_bf16_fp_steps_track_fp32_steps():
    """FP VGG-8, 3 SGD steps from the same fp32 variables.

    Loss: every activation is rounded to bf16 (relative error <= 2^-9) once per layer; over the
    ~10 roundings on each path of VGG-8 the logits move by at most ~10 * 2^-9 relative, so the
    loss by <= 2e-2 relative (measured on one CPU: 1.2e-3). Update: the gradients also pass bf16
    ReLU masks and BatchNorm backward cancellations; a 2^-9 input perturbation alone changes this
    network's fp32 gradient by ~10%, so the bound on the relative update difference is 0.35
    (measured: 0.10..0.14), far below the 1.0 of an unrelated update.
    """
    data = _data()
    variables = _variables(False, data)
    l32, p32, _ = _run(jnp.float32, False, 3, data, variables)
    l16, p16, _ = _run(jnp.bfloat16, False, 3, data, variables)
    assert np.all(np.abs(l16 - l32) <= 2e-2 * np.abs(l32))
    for t in range(1, 4):
        d32, d16 = _flat(p32[t]) - _flat(p32[0]), _flat(p16[t]) - _flat(p16[0])
        assert np.linalg.norm(d16 - d32) <= 0.35 * np.linalg.norm(d32), t


@pytest.mark.slow  # calibration and six compiled VGG-8 W4A4 train steps
def test_bf16_quantized_loss_tracks_fp32():
    """W4A4 LSQ VGG-8: a bf16 rounding moves an input across a 4-bit code boundary only when it
    lies within 2^-9 |x| of it, so the loss moves a little more than in FP: <= 5e-2 relative
    (measured: <= 1.4e-2). The updates are not compared: STE gradients change with each flipped code."""
    data = _data()
    variables = _variables(True, data)
    l32, _, _ = _run(jnp.float32, True, 3, data, variables)
    l16, _, _ = _run(jnp.bfloat16, True, 3, data, variables)
    assert np.all(np.abs(l16 - l32) <= 5e-2 * np.abs(l32))


def test_config_compute_dtype_is_validated_and_reaches_the_models():
    from qkd_jax.run import build
    from qkd_jax.run.config_schema import ConfigError, base_config, validate

    config = base_config()
    config.compute_dtype = "float16"
    with pytest.raises(ConfigError, match="compute_dtype.*bfloat16"):
        validate(config)
    config.compute_dtype = "bfloat16"
    validate(config)
    assert build.student_network(config).train_model.dtype == jnp.bfloat16
    assert build.teacher_network(config).local_model.dtype == jnp.bfloat16
    assert build.student_network(config, jnp.float32).local_model.dtype == jnp.float32
    del config["compute_dtype"]  # a config.json written before the key existed
    assert build.compute_dtype(config) == jnp.float32
