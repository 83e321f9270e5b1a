"""Weight decay of the quantizer-parameter group: off by default, on with quant_decay=True
(the released SQAKD Tiny-ImageNet setting: one SGD with weight decay over every parameter)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.train.optim import GroupSpec, build_optimizer


def _step(quant_decay: bool):
    spec = GroupSpec(optimizer="sgd", learning_rate=0.1, weight_decay=0.5, schedule="constant")
    params = {"conv": {"kernel": jnp.full((2,), 2.0), "quant": {"a_released_step": jnp.float32(4.0)}}}
    tx = build_optimizer(spec, spec, steps_per_epoch=1, total_steps=10, quant_decay=quant_decay)
    zero = {"conv": {"kernel": jnp.zeros((2,)), "quant": {"a_released_step": jnp.float32(0.0)}}}
    updates, _ = tx.update(zero, tx.init(params), params)
    return updates["conv"]


def test_quant_decay_on():
    # Coupled decay with a zero gradient: update = -lr * wd * p for both groups.
    up = _step(True)
    np.testing.assert_allclose(np.asarray(up["kernel"]), [-0.1, -0.1], rtol=1e-6)
    assert float(up["quant"]["a_released_step"]) == pytest.approx(-0.1 * 0.5 * 4.0, rel=1e-6)


def test_quant_decay_off_by_default_warns():
    with pytest.warns(UserWarning, match="no weight decay"):
        up = _step(False)
    np.testing.assert_allclose(np.asarray(up["kernel"]), [-0.1, -0.1], rtol=1e-6)
    assert float(up["quant"]["a_released_step"]) == 0.0
