"""LSQ's step-gradient scale under shard_map: per-replica element count (docs/method.md section 2).

One LSQ W4A4 dense layer trained with cross-entropy on the same global batch of 8 on R = 1 and
R = 4 devices. The step's gradient scale 1 / sqrt(n Q_P) counts the elements each replica sees,
so an activation step (n = local batch x features) gets sqrt(R) times the single-device
gradient after the pmean, a weight step (n = kernel size on every replica) the same gradient.
The expected values come from a float64 NumPy closed form of LSQ's gradients.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkd_jax import distill
from qkd_jax.quant import QDense, uniform
from qkd_jax.train import parallel
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import train_step

BATCH, IN, OUT = 8, 5, 3
A_STEP, W_STEP = float(np.float32(0.3)), float(np.float32(0.1))  # the float32 values the layer uses
A_QP, W_QN, W_QP = 15, 8, 7  # 4-bit unsigned inputs, 4-bit signed weights
EPS32 = float(np.finfo(np.float32).eps)


class LSQLayer(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        return QDense(OUT, rules=uniform("lsq", 4, 4))(x)


def _grad_recorder() -> optax.GradientTransformation:
    """An 'optimizer' whose state is the last (pmean'd) gradient and whose update is zero."""
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    return optax.GradientTransformation(zeros, lambda grads, state, params=None: (zeros(grads), grads))


def _data():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(BATCH, IN)) * 2.5).astype(np.float32)
    kernel = (rng.normal(size=(IN, OUT)) * 0.6).astype(np.float32)
    bias = (rng.normal(size=(OUT,)) * 0.1).astype(np.float32)
    labels = rng.integers(0, OUT, BATCH).astype(np.int32)
    for v in (x / np.float32(A_STEP), kernel / np.float32(W_STEP)):
        frac = np.abs(v - np.floor(v) - 0.5)  # far from rounding ties, so float32 rounds as float64
        assert frac.min() > 1e-3
    return x, kernel, bias, labels


def _recorded_grads(n_devices: int, x, kernel, bias, labels) -> dict:
    model = LSQLayer()
    params = jax.device_get(model.init(jax.random.key(0), jnp.zeros((BATCH, IN)))["params"])
    params["QDense_0"].update(kernel=kernel, bias=bias,
                              quant={"w_step": np.float32(W_STEP), "a_step": np.float32(A_STEP)})
    state = create_train_state(apply_fn=model.apply, variables={"params": params}, tx=_grad_recorder(),
                               rng=jax.random.key(1))
    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    step = parallel.compile_train_step(functools.partial(train_step, objective=distill.task()), mesh, donate=False)
    new_state, _ = step(parallel.replicate(state, mesh), parallel.shard_batch({"image": x, "label": labels}, mesh))
    return jax.device_get(new_state.opt_state["QDense_0"]["quant"])


def _lsq_np(v: np.ndarray, step: float, q_n: int, q_p: int) -> tuple[np.ndarray, np.ndarray]:
    """(v_hat, d v_hat / d step) of LSQ without the gradient scale (no element on a bound)."""
    u = v / step
    r = np.round(np.clip(u, -q_n, q_p))
    dstep = np.where(u < -q_n, -q_n, np.where(u > q_p, q_p, r - u))
    return step * r, dstep


def _expected(n_devices: int, x, kernel, bias, labels) -> tuple[dict, dict]:
    """The pmean over replicas of each replica's step gradients (float64), and the sums of the
    absolute values of their terms (the scale of float32 rounding errors)."""
    w_hat, dw_step = _lsq_np(kernel.astype(np.float64), W_STEP, W_QN, W_QP)
    grads, mags = {"a_step": 0.0, "w_step": 0.0}, {"a_step": 0.0, "w_step": 0.0}
    for xs, ys in zip(np.split(x.astype(np.float64), n_devices), np.split(labels, n_devices)):
        a_hat, da_step = _lsq_np(xs, A_STEP, 0, A_QP)
        logits = a_hat @ w_hat + bias
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        g = (p - np.eye(OUT)[ys]) / len(xs)  # d mean-CE / d logits
        terms = {
            "a_step": (g @ w_hat.T) * da_step / math.sqrt(xs.size * A_QP),  # n = this replica's elements
            "w_step": (a_hat.T @ g) * dw_step / math.sqrt(kernel.size * W_QP),
        }
        for k, t in terms.items():
            grads[k] += t.sum() / n_devices
            mags[k] += np.abs(t).sum() / n_devices
    return grads, mags


@pytest.mark.parametrize("n_devices", [1, 4])
def test_lsq_step_gradients_match_closed_form(n_devices):
    data = _data()
    got = _recorded_grads(n_devices, *data)
    want, mag = _expected(n_devices, *data)
    for k in ("a_step", "w_step"):
        # float32 forward and backward (logits, softmax, sums of at most 40 products): a few eps
        # per term; 64 eps times the sum of |terms| bounds it with margin
        assert abs(float(got[k]) - want[k]) <= 64 * EPS32 * mag[k] + 1e-12, (k, float(got[k]), want[k])


def test_activation_step_gradient_grows_by_sqrt_replicas_weight_step_does_not():
    data = _data()
    one, four = _recorded_grads(1, *data), _recorded_grads(4, *data)
    _, mag1 = _expected(1, *data)
    _, mag4 = _expected(4, *data)
    for k, ratio in (("a_step", 2.0), ("w_step", 1.0)):  # sqrt(4) for activations, 1 for weights
        tol = 64 * EPS32 * (mag4[k] + ratio * mag1[k])
        assert abs(float(four[k]) - ratio * float(one[k])) <= tol, (k, float(four[k]), float(one[k]))
        assert abs(float(one[k])) > 1000 * tol  # the gradient is not vacuously near zero
