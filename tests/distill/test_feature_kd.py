"""The stateless feature criteria read the released layers (kaiqi123/SQAKD CIFAR/utils_distill.py
get_loss_kd): AT and NST every stage output, SP the last stage, RKD and PKT the embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.distill import feature_kd
from qkd_jax.distill import feature_losses as fl


def _feats(seed):
    rng = np.random.default_rng(seed)
    shapes = [(4, 8, 8, 3), (4, 8, 8, 4), (4, 4, 4, 6), (4, 2, 2, 8), (4, 8)]
    return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


@pytest.mark.parametrize("name, reference", [
    ("attention", lambda s, t: sum(fl.attention(a, b) for a, b in zip(s[1:4], t[1:4]))),
    ("nst", lambda s, t: sum(fl.nst(a, b) for a, b in zip(s[1:4], t[1:4]))),
    ("similarity", lambda s, t: fl.similarity(s[3], t[3])),
    ("rkd", lambda s, t: fl.rkd(s[4], t[4])),
    ("pkt", lambda s, t: fl.pkt(s[4], t[4])),
])
def test_stateless_criteria_use_the_released_layers(name, reference):
    feats_s, feats_t = _feats(0), _feats(1)
    criterion = feature_kd.get_feature(name)
    aux = criterion.init(jax.random.key(0), feats_s, feats_t, num_examples=10)
    assert aux == feature_kd.empty_aux()
    value, state = criterion.loss(aux["params"], aux["state"], feats_s, feats_t, rng=jax.random.key(1))
    np.testing.assert_allclose(value, reference(feats_s, feats_t), rtol=1e-6)
    assert state == {}
    # Changing a layer the criterion does not read leaves the loss unchanged.
    unread = {"attention": 0, "nst": 4, "similarity": 2, "rkd": 3, "pkt": 0}[name]
    moved = list(feats_s)
    moved[unread] = moved[unread] + 1.0
    np.testing.assert_allclose(criterion.loss({}, {}, moved, feats_t, rng=jax.random.key(1))[0], value, rtol=1e-6)


def test_mismatched_feature_lists_are_a_clear_error():
    feats = _feats(0)
    with pytest.raises(ValueError, match="same family"):
        feature_kd.get_feature("attention").loss({}, {}, feats, feats[:-1], rng=jax.random.key(0))
