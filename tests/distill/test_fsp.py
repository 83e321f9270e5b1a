"""FSP ('fsp'): the criterion's loss is the sum of the FSP losses over feats[:-1] (the embedding
excluded), against the NumPy reference of test_feature_losses.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.distill.feature_kd import get_feature
from tests.distill.test_feature_losses import np_fsp


def test_fsp_criterion_sums_the_pairs_of_all_but_the_embedding():
    rng = np.random.default_rng(0)
    shapes = [(3, 8, 8, 4), (3, 8, 8, 4), (3, 4, 4, 6), (3, 5)]
    f_s = [rng.normal(size=s) for s in shapes]
    f_t = [rng.normal(size=s) for s in shapes]
    value, state = get_feature("fsp").loss({}, {}, [jnp.asarray(x, jnp.float32) for x in f_s],
                                           [jnp.asarray(x, jnp.float32) for x in f_t], rng=jax.random.key(0))
    expected = sum(np_fsp(f_s[:-1], f_t[:-1]))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert state == {}
