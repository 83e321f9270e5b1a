"""EWGS delta from the Hessian: compared with a dense Hessian of the loss w.r.t. each x_q."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from qkd_jax.train.ewgs_update import _batch_loss_fn, compute_ewgs_deltas, layer_traces_and_grads
from qkd_jax.train.state import create_train_state
from tests.train.toy_models import ToyQuantMLP, init_toy


@dataclasses.dataclass(frozen=True)
class MeanCE:
    needs_labels: bool = True
    needs_teacher: bool = False

    def __call__(self, s, t, labels):
        ce = optax.softmax_cross_entropy_with_integer_labels(s, labels).mean()
        return ce, {"ce": ce}


def _setup(delta=0.3):
    model = ToyQuantMLP(hidden=5, num_classes=3)
    variables = init_toy(model, batch=6, in_dim=4)
    variables["quant_delta"] = {"qdense": {"w": jnp.asarray(delta), "a": jnp.asarray(delta)}}
    state = create_train_state(
        apply_fn=model.apply, variables=variables, tx=optax.sgd(0.1), rng=jax.random.key(0)
    )
    rng = np.random.default_rng(0)
    batches = [
        {"image": jnp.asarray(rng.normal(size=(6, 4)) * 2, jnp.float32),
         "label": jnp.asarray(rng.integers(0, 3, 6), jnp.int32)}
        for _ in range(2)
    ]
    return state, batches


def _dense_reference(state, batch):
    """Exact per-layer Tr(H) and gradient from the dense Hessian (jacrev of jacrev)."""
    loss_fn, zeros = _batch_loss_fn(state, batch, MeanCE())
    flat, unravel = ravel_pytree(zeros)
    hess = jax.jacrev(jax.jacrev(lambda z: loss_fn(unravel(z))))(flat)
    grad = jax.grad(lambda z: loss_fn(unravel(z)))(flat)
    # Index ranges of each leaf inside the flat vector.
    sizes = [x.size for x in jax.tree.leaves(zeros)]
    bounds = np.cumsum([0] + sizes)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(zeros)[0]]
    out = {}
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        block = np.asarray(hess)[lo:hi, lo:hi]
        offdiag_rows = np.asarray(hess)[lo:hi]
        out[name] = dict(
            trace=float(np.trace(block)),
            grad=np.asarray(grad)[lo:hi],
            # variance of one probe of v_l . (H v)_l with Rademacher v: 2 * sum_{i in l, j != i} H_ij^2
            # bounds it from above (pairs inside the block are counted twice, cross-block once).
            probe_var=2.0 * float(np.sum(offdiag_rows**2) - np.sum(np.diag(block) ** 2)),
            n=hi - lo,
        )
    return out, hess


def test_layer_traces_match_dense_hessian():
    state, batches = _setup()
    ref, hess = _dense_reference(state, batches[0])
    assert np.abs(np.asarray(hess)).max() > 0  # the loss is curved in x_q
    loss_fn, zeros = _batch_loss_fn(state, batches[0], MeanCE())
    n_probes = 4000
    traces, grads, used = jax.jit(
        lambda z, k: layer_traces_and_grads(loss_fn, z, k, max_probes=n_probes, rtol=0.0)
    )(zeros, jax.random.key(1))
    assert int(used) == n_probes
    flat_traces = {jax.tree_util.keystr(p): float(v) for p, v in jax.tree_util.tree_flatten_with_path(traces)[0]}
    flat_grads = {jax.tree_util.keystr(p): np.asarray(v).ravel() for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for name, r in ref.items():
        tol = 5.0 * np.sqrt(max(r["probe_var"], 1e-12) / n_probes) + 1e-5
        assert abs(flat_traces[name] - r["trace"]) < tol, (name, flat_traces[name], r["trace"], tol)
        np.testing.assert_allclose(flat_grads[name], r["grad"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("probe", ["per_layer", "joint"])
def test_delta_formula_against_dense_hessian(probe):
    """delta = max(0, mean_k (Tr(H_k)/N) / (3 std(g_k) + eps)) with the exact traces, for both probes."""
    state, batches = _setup()
    eps = 1e-8
    expected = {}
    for batch in batches:
        ref, _ = _dense_reference(state, batch)
        for name, r in ref.items():
            ratio = (r["trace"] / r["n"]) / (3.0 * np.std(r["grad"], ddof=1) + eps)
            expected.setdefault(name, []).append(ratio)
    deltas = compute_ewgs_deltas(state, batches, MeanCE(), jax.random.key(2), max_probes=4000, rtol=0.0,
                                 probe=probe)
    got = {"w_q": float(deltas["qdense"]["w"]), "a_q": float(deltas["qdense"]["a"])}
    for name, ratios in expected.items():
        key = "w_q" if "w_q" in name else "a_q"
        want = max(0.0, float(np.mean(ratios)))
        assert abs(got[key] - want) <= 0.05 * abs(want) + 1e-4, (key, got[key], want)


def test_delta_update_keeps_other_layers_and_dtypes():
    state, batches = _setup(delta=0.0)
    deltas = compute_ewgs_deltas(state, batches[:1], MeanCE(), jax.random.key(0), max_probes=5)
    assert set(deltas) == {"qdense"} and set(deltas["qdense"]) == {"w", "a"}
    assert deltas["qdense"]["w"].dtype == jnp.float32 and deltas["qdense"]["w"].shape == ()
    assert float(deltas["qdense"]["w"]) >= 0.0


def test_per_layer_traces_match_dense_hessian_blocks():
    """The released per-layer probe: each x_q's trace within 5 sigma of the dense block's trace, with
    sigma from the in-block off-diagonal entries only (no cross-layer terms), and one count per leaf."""
    state, batches = _setup()
    loss_fn, zeros = _batch_loss_fn(state, batches[0], MeanCE())
    flat, unravel = ravel_pytree(zeros)
    hess = np.asarray(jax.jacrev(jax.jacrev(lambda z: loss_fn(unravel(z))))(flat), np.float64)
    n_probes = 3000
    traces, _, used = jax.jit(lambda z, k: layer_traces_and_grads(
        loss_fn, z, k, max_probes=n_probes, rtol=0.0, probe="per_layer"))(zeros, jax.random.key(5))
    assert [int(u) for u in jax.tree.leaves(used)] == [n_probes] * len(jax.tree.leaves(zeros))
    lo = 0
    for leaf, trace in zip(jax.tree.leaves(zeros), jax.tree.leaves(traces)):
        block = hess[lo:lo + leaf.size, lo:lo + leaf.size]
        sigma = np.sqrt(2.0 * (np.sum(block**2) - np.sum(np.diag(block) ** 2)) / n_probes)
        assert abs(float(trace) - np.trace(block)) < 5 * sigma + 1e-5
        lo += leaf.size


def test_unknown_probe_is_refused():
    state, batches = _setup()
    loss_fn, zeros = _batch_loss_fn(state, batches[0], MeanCE())
    with pytest.raises(ValueError, match="unknown Hessian probe 'blockwise'"):
        layer_traces_and_grads(loss_fn, zeros, jax.random.key(0), probe="blockwise")
