"""Distillation features of the zoo: count and shapes per model (abstract evaluation), nothing
recorded unless requested, the embedding feeds the classifier, pre-activations are the
features before their ReLU, and the logits do not change when features are requested.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.models import get_model, list_models
from qkd_jax.models.features import apply_with_features, read_features
from qkd_jax.models.layers import FEATURES
from tests.models.test_models import random_variables, small_size

BATCH = 2

# Per-sample feature shapes at the small input (32 for CIFAR models, 64 otherwise), worked
# out from the architectures: stem, stages, embedding.
_CIFAR_RESNET = [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]
_CIFAR_VGG = [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]  # no pool after stage 4 at 32
_RESNET_BASIC = [(32, 32, 64), (16, 16, 64), (8, 8, 128), (4, 4, 256), (2, 2, 512), (512,)]
EXPECTED: dict[str, list[tuple]] = {
    "resnet20": _CIFAR_RESNET,
    "resnet32": _CIFAR_RESNET,
    "resnet56": _CIFAR_RESNET,
    "vgg8": _CIFAR_VGG,
    "vgg11": _CIFAR_VGG,
    "vgg13": _CIFAR_VGG,
    "resnet18": _RESNET_BASIC,
    "resnet34": _RESNET_BASIC,
    "resnet50": [(32, 32, 64), (16, 16, 256), (8, 8, 512), (4, 4, 1024), (2, 2, 2048), (2048,)],
    "vgg11_bn": [(64, 64, 64), (32, 32, 128), (16, 16, 256), (8, 8, 512), (4, 4, 512), (4096,)],
    # released Tiny-ImageNet VGG: no pool after stage 4 even at 64 px
    "vgg11_bn_tiny": [(64, 64, 64), (32, 32, 128), (16, 16, 256), (8, 8, 512), (8, 8, 512), (512,)],
    "mobilenet_v2": [(32, 32, 32), (32, 32, 16), (16, 16, 24), (8, 8, 32), (4, 4, 64), (4, 4, 96), (2, 2, 160),
                     (2, 2, 320), (1280,)],
    "efficientnet_b0": [(32, 32, 32), (32, 32, 16), (16, 16, 24), (8, 8, 40), (4, 4, 80), (4, 4, 112), (2, 2, 192),
                        (2, 2, 320), (1280,)],
    "shufflenet_v2_x0_5": [(32, 32, 24), (8, 8, 48), (4, 4, 96), (2, 2, 192), (1024,)],
    "shufflenet_v2_x1_0": [(32, 32, 24), (8, 8, 116), (4, 4, 232), (2, 2, 464), (1024,)],
    # 64 -> 7x7/2 valid conv: 29; ceil-mode 3x3/2 pools: 14, 7, 3.
    "squeezenet1_0": [(29, 29, 96), (14, 14, 256), (7, 7, 512), (3, 3, 512), (512,)],
}


def test_every_model_has_expected_shapes():
    assert sorted(EXPECTED) == list_models()


def abstract(name: str):
    model = get_model(name, 10)
    size = small_size(name)
    x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
    return model, jax.eval_shape(model.init, jax.random.key(0), x), x


@pytest.mark.parametrize("name", list_models())
def test_feature_count_and_shapes(name):
    model, variables, x = abstract(name)
    assert FEATURES not in variables  # init records nothing
    expected = [(BATCH, *s) for s in EXPECTED[name]]
    for train in (False, True):
        for preact in (False, True):
            logits, feats = jax.eval_shape(
                lambda v, x: apply_with_features(model, v, x, train=train, preact=preact), variables, x
            )
            assert logits.shape == (BATCH, 10)
            assert [f.shape for f in feats] == expected, (train, preact)


def test_nothing_recorded_unless_named_mutable():
    model, variables, x = abstract("resnet20")
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert set(state) == {"batch_stats"}
    _, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=True), variables, x)
    assert FEATURES not in state
    with pytest.raises(ValueError, match="mutable"):
        read_features({})


def _bn(x, p, s, eps=1e-5):
    return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


# model -> the classifier input computed with numpy from the embedding feature
COMPILED = {
    "resnet20": lambda e, p, s: _bn(e, p["head_bn"], s["head_bn"]),
    "vgg8": lambda e, p, s: e,
    "resnet18": lambda e, p, s: e,
}


@pytest.mark.parametrize("name", sorted(COMPILED))
def test_features_of_a_forward_pass(name):
    model = get_model(name, 10)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, 32, 32, 3)), jnp.float32)
    variables = random_variables(model, x)

    @jax.jit
    def with_features(v, x):
        logits, state = model.apply(v, x, train=False, mutable=[FEATURES])
        return logits, read_features(state), read_features(state, preact=True)

    logits, post, pre = with_features(variables, x)
    plain = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    # Same computation compiled twice: equal up to float32 rounding of a reordered fusion.
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)

    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables.get("batch_stats", {}))
    head = COMPILED[name](np.asarray(post[-1], np.float64), params, stats)
    expected = head @ params["classifier"]["kernel"] + params["classifier"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    for i, (a, b) in enumerate(zip(post, pre)):
        np.testing.assert_allclose(np.maximum(np.asarray(b), 0.0), a, rtol=1e-6, atol=1e-6)
        stage = 0 < i < len(post) - 1  # stem (VGG: stage 1) and embedding stay post-activation
        assert np.any(np.asarray(b) < 0) == stage, i

    _, train_feats = jax.jit(lambda v, x: apply_with_features(model, v, x, train=True))(variables, x)
    assert all(np.all(np.isfinite(f)) for f in train_feats)
