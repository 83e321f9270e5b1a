"""freeze_top_level: frozen subtrees get exactly zero updates (weight decay included), the rest
the SGD closed form -lr (g + wd p) on the first step (momentum buffer starts at the gradient)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qkd_jax.train.freeze import freeze_top_level


def _params():
    rng = np.random.default_rng(0)
    return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
            "classifier": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}


def test_frozen_subtree_gets_zero_update_the_rest_sgd_with_decay():
    lr, wd = 0.1, 5e-4
    params = _params()
    grads = {k: {n: jnp.full_like(v, 0.5) for n, v in sub.items()} for k, sub in params.items()}
    tx = optax.chain(optax.add_decayed_weights(wd), optax.trace(decay=0.9), optax.scale_by_learning_rate(lr))
    frozen = freeze_top_level(tx, params)
    updates, _ = frozen.update(grads, frozen.init(params), params)
    for leaf in updates["classifier"].values():
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    expected = -lr * (0.5 + wd * np.asarray(params["conv"]["kernel"], np.float64))
    np.testing.assert_allclose(updates["conv"]["kernel"], expected, rtol=1e-6, atol=1e-7)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match=r"no top-level parameter named \['fc'\]"):
        freeze_top_level(optax.sgd(0.1), _params(), names=("fc",))
