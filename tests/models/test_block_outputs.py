"""Per-block outputs (the released ``flatGroupOut=True`` ``block_out`` lists, read by CKTF): the
CIFAR ResNets and VGGs record them only on request, with the release's block counts and shapes,
the last block equal to the stage feature; parameters and the plain forward are unchanged; other
models record none, and CKTF on them is a one-line error naming the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.distill.feature_kd import get_feature, init_feature_aux
from qkd_jax.models import get_model
from qkd_jax.models.features import apply_with_features, read_block_outputs
from qkd_jax.models.layers import BLOCKS, FEATURES

X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
# model -> (pool rule, blocks per stage, per-sample block shape per stage) at 32x32 inputs
EXPECTED = {
    "resnet20": ("avg8", [3, 3, 3], [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    "resnet32": ("avg8", [5, 5, 5], [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    "resnet56": ("avg8", [9, 9, 9], [(32, 32, 16), (16, 16, 32), (8, 8, 64)]),
    "vgg8": ("global", [1, 1, 1, 1], [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]),
    "vgg13": ("global", [2, 2, 2, 2], [(16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512)]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_block_outputs_on_request(name):
    model = get_model(name, 10)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), X)
    assert BLOCKS not in variables
    pool, counts, shapes = EXPECTED[name]
    for train in (False, True):
        mutable = [FEATURES, BLOCKS] + (["batch_stats"] if train else [])
        _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=train, mutable=mutable), variables, X)
        rule, stages = read_block_outputs(state)
        assert rule == pool
        assert [len(s) for s in stages] == counts
        assert [{b.shape for b in s} for s in stages] == [{(2, *shape)} for shape in shapes]
        _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=train, mutable=mutable[:1] + mutable[2:]),
                                  variables, X)
        assert BLOCKS not in state


def test_last_block_is_the_stage_feature_and_the_forward_is_unchanged():
    for name in ("resnet20", "vgg13"):  # feats[1:-1]: ResNet stages 1-3, VGG stages 2-5 (block_out1..)
        model = get_model(name, 10)
        variables = model.init(jax.random.key(0), X, train=False)
        logits, state = model.apply(variables, X, train=False, mutable=[FEATURES, BLOCKS])
        _, stages = read_block_outputs(state)
        feats = apply_with_features(model, variables, X)[1]
        for stage, feat in zip(stages, feats[1:-1]):
            np.testing.assert_array_equal(stage[-1], feat)
        np.testing.assert_array_equal(logits, model.apply(variables, X, train=False))
        plain = str(jax.make_jaxpr(lambda v: model.apply(v, X, train=False))(variables))
        assert plain == str(jax.make_jaxpr(lambda v: model.apply(v, X, train=False, mutable=["intermediates"])[0])(
            variables))  # no collection named: the same program


def test_cktf_on_a_model_without_block_outputs_names_it():
    model = get_model("resnet18", 10)
    variables = model.init(jax.random.key(0), X, train=False)
    with pytest.raises(ValueError, match="model ResNet does not record"):
        init_feature_aux(get_feature("cktf", nce_k=4), jax.random.key(0), student_apply=model.apply,
                         student_variables=variables, teacher_apply=model.apply, teacher_variables=variables,
                         images=X, num_examples=20, dataset_labels=np.arange(20) % 10)
    with pytest.raises(ValueError, match="no per-block outputs"):
        read_block_outputs({})
