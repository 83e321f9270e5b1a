"""Parameter groups, torch-equivalent SGD/Adam updates (NumPy references) and schedules (closed forms)."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkd_jax.train import schedules
from qkd_jax.train.optim import GroupSpec, build_optimizer, current_learning_rates, param_labels


def toy_params() -> dict:
    rng = np.random.default_rng(0)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {
        "conv": {"kernel": f(2, 3), "bias": f(3), "quant": {"lower": f(1), "upper": f(1)}},
        "bn": {"scale": f(3), "bias": f(3)},
        "dense": {"kernel": f(3, 2), "quant_scale": f(2)},  # not exactly 'quant': a weight
        "quantizer": {"w": f(2)},  # not exactly 'quant': a weight
        "block": {"act": {"quant": {"alpha": f(1)}}},
    }


QUANT_LEAVES = {("conv", "quant", "lower"), ("conv", "quant", "upper"), ("block", "act", "quant", "alpha")}


def leaf_paths(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def random_grads(params, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def run(tx: optax.GradientTransformation, params, grads_list):
    """Applies the updates under jit; returns the params after each step."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for grads in grads_list:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history


def test_param_labels_exactly_quant_leaves():
    labels = leaf_paths(param_labels(toy_params()))
    assert {p for p, lab in labels.items() if lab == "quant"} == QUANT_LEAVES
    assert all(lab == "weights" for p, lab in labels.items() if p not in QUANT_LEAVES)


def np_adam(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam(weight_decay=wd): decay added to the gradient before the moments."""
    p = np.asarray(p, np.float64)
    m = v = 0.0
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64) + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def test_adam_coupled_l2_weights_and_undecayed_quant():
    params = toy_params()
    grads = [random_grads(params, seed) for seed in range(3)]
    wd, lr_w, lr_q = 0.1, 1e-3, 1e-5
    tx = build_optimizer(
        GroupSpec(optimizer="adam", learning_rate=lr_w, weight_decay=wd),
        GroupSpec(optimizer="adam", learning_rate=lr_q),
        steps_per_epoch=10,
        total_steps=100,
    )
    history = run(tx, params, grads)
    p0, first, third = leaf_paths(params), leaf_paths(history[0]), leaf_paths(history[2])
    g0 = leaf_paths(grads[0])
    for path, p in p0.items():
        quant = path in QUANT_LEAVES
        g = np.asarray(g0[path], np.float64) + (0.0 if quant else wd * np.asarray(p, np.float64))
        lr = lr_q if quant else lr_w
        # first step: m_hat = g', v_hat = g'^2  ->  p -= lr * g' / (|g'| + eps)
        np.testing.assert_allclose(first[path], np.asarray(p) - lr * g / (np.abs(g) + 1e-8), rtol=1e-6, atol=1e-9)
        ref = np_adam(p, [leaf_paths(gr)[path] for gr in grads], lr, 0.0 if quant else wd)
        np.testing.assert_allclose(third[path], ref, rtol=1e-6, atol=1e-8)


def test_quant_group_never_decays():
    params = toy_params()
    grads = [random_grads(params, 7)]
    quant_spec = GroupSpec(optimizer="sgd", learning_rate=0.1, weight_decay=0.5)
    with pytest.warns(UserWarning, match="no weight decay"):
        tx = build_optimizer(GroupSpec(optimizer="sgd", learning_rate=0.1), quant_spec, steps_per_epoch=1, total_steps=10)
    new = leaf_paths(run(tx, params, grads)[0])
    p0, g0 = leaf_paths(params), leaf_paths(grads[0])
    for path in QUANT_LEAVES:
        np.testing.assert_allclose(new[path], p0[path] - 0.1 * g0[path], rtol=1e-6)


def np_torch_sgd(p, grads, lr, mu, wd, nesterov):
    """torch.optim.SGD(momentum=mu, dampening=0, weight_decay=wd, nesterov=nesterov)."""
    p = np.asarray(p, np.float64)
    buf = None
    for g in grads:
        d_p = np.asarray(g, np.float64) + wd * p
        buf = d_p.copy() if buf is None else mu * buf + d_p
        d_p = d_p + mu * buf if nesterov else buf
        p = p - lr * d_p
    return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_momentum_and_coupled_decay(nesterov):
    params = toy_params()
    grads = [random_grads(params, seed) for seed in range(3)]
    lr, mu, wd = 0.05, 0.9, 0.05
    tx = build_optimizer(
        GroupSpec(optimizer="sgd", learning_rate=lr, momentum=mu, nesterov=nesterov, weight_decay=wd),
        GroupSpec(optimizer="sgd", learning_rate=lr, momentum=mu, nesterov=nesterov),
        steps_per_epoch=10,
        total_steps=100,
    )
    final = leaf_paths(run(tx, params, grads)[-1])
    for path, p in leaf_paths(params).items():
        decay = 0.0 if path in QUANT_LEAVES else wd
        ref = np_torch_sgd(p, [leaf_paths(g)[path] for g in grads], lr, mu, decay, nesterov)
        np.testing.assert_allclose(final[path], ref, rtol=1e-5, atol=1e-7)


def test_adamw_decoupled_first_step():
    params = toy_params()
    grads = random_grads(params, 3)
    lr, wd = 1e-2, 0.1
    tx = build_optimizer(
        GroupSpec(optimizer="adamw", learning_rate=lr, weight_decay=wd),
        GroupSpec(optimizer="adam", learning_rate=lr),
        steps_per_epoch=1,
        total_steps=10,
    )
    new = leaf_paths(run(tx, params, [grads])[0])
    path = ("conv", "kernel")
    p, g = np.asarray(leaf_paths(params)[path]), np.asarray(leaf_paths(grads)[path])
    np.testing.assert_allclose(new[path], p - lr * (g / (np.abs(g) + 1e-8) + wd * p), rtol=1e-5)


def test_schedule_drives_updates_per_epoch():
    params = {"w": jnp.zeros(()), "quant": {"a": jnp.zeros(())}}
    ones = jax.tree.map(jnp.ones_like, params)
    tx = build_optimizer(
        GroupSpec(optimizer="sgd", learning_rate=0.1, schedule="cosine_epoch"),
        GroupSpec(optimizer="sgd", learning_rate=0.01),
        steps_per_epoch=2,
        total_steps=6,
    )
    history = run(tx, params, [ones] * 6)
    w = np.array([h["w"] for h in history])
    lrs = [0.1 * (1 + math.cos(math.pi * (s // 2) / 3)) / 2 for s in range(6)]
    np.testing.assert_allclose(-np.diff(np.concatenate([[0.0], w])), lrs, rtol=1e-6)
    np.testing.assert_allclose(history[-1]["quant"]["a"], -0.06, rtol=1e-6)


def test_clip_norm_is_per_group():
    params = {"w": jnp.zeros(4), "quant": {"a": jnp.zeros(2)}}
    grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0]), "quant": {"a": jnp.array([30.0, 40.0])}}
    tx = build_optimizer(
        GroupSpec(optimizer="sgd", learning_rate=1.0, clip_norm=1.0),
        GroupSpec(optimizer="sgd", learning_rate=1.0),
        steps_per_epoch=1,
        total_steps=1,
    )
    new = run(tx, params, [grads])[0]
    np.testing.assert_allclose(new["w"], [-0.6, -0.8, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(new["quant"]["a"], [-30.0, -40.0], rtol=1e-6)


def test_schedules_closed_forms():
    lr0 = 0.1
    ce = schedules.make_schedule("cosine_epoch", lr0, steps_per_epoch=10, total_steps=100)
    assert float(ce(0)) == pytest.approx(lr0) and float(ce(9)) == pytest.approx(lr0)
    assert float(ce(15)) == pytest.approx(lr0 * (1 + math.cos(math.pi / 10)) / 2, rel=1e-6)
    assert float(ce(99)) == pytest.approx(lr0 * (1 + math.cos(math.pi * 9 / 10)) / 2, rel=1e-5)
    cs = schedules.make_schedule("cosine_step", lr0, steps_per_epoch=10, total_steps=100)
    assert float(cs(25)) == pytest.approx(lr0 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-6)
    assert float(cs(100)) == pytest.approx(0.0, abs=1e-9) and float(cs(150)) == pytest.approx(0.0, abs=1e-9)
    wc = schedules.make_schedule("warmup_cosine", 0.01, steps_per_epoch=10, total_steps=110, warmup_steps=10, warmup_init_lr=1e-4)
    assert float(wc(0)) == pytest.approx(1e-4, rel=1e-6)
    assert float(wc(5)) == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.5, rel=1e-6)
    assert float(wc(10)) == pytest.approx(0.01, rel=1e-6)
    assert float(wc(60)) == pytest.approx(0.005, rel=1e-5)
    assert float(wc(110)) == pytest.approx(0.0, abs=1e-9)
    st = schedules.make_schedule("step", lr0, steps_per_epoch=10, total_steps=100, decay_epochs=(3, 6), decay_factor=0.1)
    assert [float(st(s)) for s in (29, 30, 59, 60)] == pytest.approx([lr0, 0.01, 0.01, 0.001], rel=1e-6)
    assert float(schedules.make_schedule("constant", lr0, steps_per_epoch=1, total_steps=1)(12345)) == pytest.approx(lr0)
    assert float(jax.jit(ce)(jnp.int32(15))) == pytest.approx(float(ce(15)))


def test_current_learning_rates():
    w = GroupSpec(optimizer="adam", learning_rate=1e-3, schedule="cosine_step")
    q = GroupSpec(optimizer="adam", learning_rate=1e-5)
    lrs = current_learning_rates(w, q, 50, steps_per_epoch=10, total_steps=100)
    assert float(lrs["lr/weights"]) == pytest.approx(5e-4, rel=1e-5)
    assert float(lrs["lr/quant"]) == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("optimizer", dict(optimizer="rmsprop")),
        ("learning_rate", dict(learning_rate=-1.0)),
        ("learning_rate", dict(learning_rate=float("nan"))),
        ("schedule", dict(schedule="linear")),
        ("momentum", dict(momentum=1.0)),
        ("momentum", dict(optimizer="adam", momentum=0.9)),
        ("nesterov", dict(nesterov=True)),
        ("b1", dict(b1=1.0)),
        ("b2", dict(b2=-0.1)),
        ("eps", dict(eps=-1.0)),
        ("weight_decay", dict(weight_decay=-1e-4)),
        ("decay", dict(decay="l2")),
        ("decay", dict(optimizer="adamw", decay="coupled")),
        ("warmup_steps", dict(warmup_steps=1.5)),
        ("warmup_init_lr", dict(warmup_init_lr=-1.0)),
        ("decay_epochs", dict(decay_epochs=(5, 3))),
        ("decay_epochs", dict(decay_epochs=(0,))),
        ("decay_factor", dict(decay_factor=0.0)),
        ("clip_norm", dict(clip_norm=0.0)),
    ],
)
def test_invalid_specs_raise_naming_the_field(field, kwargs):
    spec = dict(optimizer="sgd", learning_rate=0.1)
    spec.update(kwargs)
    with pytest.raises(ValueError, match=f"GroupSpec.{field}="):
        GroupSpec(**spec)


def test_invalid_build_arguments_raise():
    ok = GroupSpec(optimizer="sgd", learning_rate=0.1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_optimizer(ok, ok, steps_per_epoch=0, total_steps=10)
    warm = GroupSpec(optimizer="sgd", learning_rate=0.1, schedule="warmup_cosine", warmup_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_optimizer(warm, ok, steps_per_epoch=1, total_steps=10)
    with pytest.raises(ValueError, match="unknown GroupSpec key.*lr"):
        GroupSpec.from_mapping({"optimizer": "sgd", "lr": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = GroupSpec.from_mapping({"optimizer": "sgd", "learning_rate": 0.1, "decay_epochs": [30, 60]})
    assert spec.decay_epochs == (30, 60)
