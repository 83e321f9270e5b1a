"""Each model's signed-input declaration (models/registry.py) against measurement.

Every conv / dense input of a network with random weights and random BatchNorm statistics is
recorded (flax method interception, full-precision model, eval mode): a layer the model declares
unsigned must see only values >= 0 (exactly: ReLU outputs and pools / concatenations of them),
a layer it declares signed must see some negative value. So the declaration is proved from
the model's forward pass, independently of how it was written down.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.models import get_model, image_size, list_models, signed_inputs
from qkd_jax.quant.rules import (
    full_precision,
    quantizable_paths,
    resolve,
    uniform,
    with_signed_inputs,
)

# One model per architecture file (the others differ only in depth or width). vgg11_bn (torchvision
# VGG) is left out for its 25088 x 4096 dense layer; its layers are conv + BN + ReLU, max pools
# and dense + ReLU, as in vgg11_bn_tiny (checked) and its stem is declared alike.
MEASURED = ["resnet20", "vgg8", "vgg11_bn_tiny", "resnet18", "resnet50", "mobilenet_v2",
            "shufflenet_v2_x0_5", "squeezenet1_0", "efficientnet_b0"]


def _size(name: str) -> int:
    return 32 if image_size(name) == 32 else 64


def _random_variables(model: nn.Module, x: jax.Array, seed: int) -> dict[str, Any]:
    """N(0, 1/fan_in) kernels, N(0, 0.1^2) conv / dense biases; BatchNorm with random running
    statistics (mean N(0, 0.3^2), var U(0.5, 2)) and affine parameters (scale U(0.5, 1.5),
    bias N(0, 0.5^2)), so that a BN output feeding a layer has values of both signs."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        keys = [p.key for p in path]
        name, is_bn = keys[-1], keys[0] == "batch_stats" or "scale" in _siblings(shapes, keys)
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / math.sqrt(math.prod(leaf.shape[:-1])), leaf.shape)
        elif name == "mean":
            value = rng.normal(0.0, 0.3, leaf.shape)
        elif name == "var":
            value = rng.uniform(0.5, 2.0, leaf.shape)
        elif name == "scale":
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias
            value = rng.normal(0.0, 0.5 if is_bn else 0.1, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _siblings(tree: Any, keys: list) -> Any:
    for k in keys[:-1]:
        tree = tree[k]
    return tree


def measured_input_minima(name: str, seed: int = 0) -> dict[str, float]:
    """{layer path: min of its input} for every nn.Conv / nn.Dense call of model `name`."""
    model = get_model(name, 10)
    x = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(2, _size(name), _size(name), 3)), jnp.float32)
    variables = _random_variables(model, x, seed)

    def forward(v, x):
        minima = {}

        def interceptor(next_fun, args, kwargs, ctx):
            if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.Conv, nn.Dense)):
                minima["/".join(ctx.module.path)] = jnp.min(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(v, x, train=False)
        return minima

    return {k: float(v) for k, v in jax.device_get(jax.jit(forward)(variables, x)).items()}


# The largest forwards (64 px, many layers) run in the full tier.
SLOW_MEASURED = ("resnet50", "mobilenet_v2", "efficientnet_b0")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow if n in SLOW_MEASURED else ())
                                  for n in MEASURED])
def test_declared_signed_inputs_match_the_measured_signs(name):
    minima = measured_input_minima(name)
    params = jax.eval_shape(lambda: get_model(name, 10).init(
        jax.random.key(0), jnp.zeros((1, _size(name), _size(name), 3)), train=False))["params"]
    assert sorted(minima) == sorted(quantizable_paths(params))  # every quantizable layer measured
    pattern = signed_inputs(name)
    declared = {p for p in minima if re.fullmatch(pattern, p)}
    negative = {p for p, m in minima.items() if m < 0}
    assert not negative - declared, f"{name}: signed inputs not declared: {sorted(negative - declared)}"
    assert not declared - negative, f"{name}: declared signed, no negative value seen: {sorted(declared - negative)}"
    assert all(minima[p] >= 0 for p in minima if p not in declared)


def test_the_documented_signed_layers():
    """The layers named in docs/method.md section 9: MobileNetV2's expand convs of blocks 2-17 and
    head_conv; ShuffleNetV2's 1x1 convs after a BN'd depthwise conv; the stem everywhere."""
    def declared(name):
        params = jax.eval_shape(lambda: get_model(name, 10).init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"]
        return {p for p, lp in resolve(with_signed_inputs(uniform("lsq", 4, 4), signed_inputs(name)),
                                       params).items() if lp.a_signed}

    assert declared("mobilenet_v2") == {"stem", "head_conv", *(f"block{k}/expand" for k in range(2, 18))}
    shuffle = declared("shufflenet_v2_x0_5")
    assert shuffle == {"stem", *(f"stage{s}_0/branch1_pw" for s in (2, 3, 4)),
                       *(f"stage{s}_{j}/branch2_pw2" for s, n in ((2, 4), (3, 8), (4, 4)) for j in range(n))}
    assert declared("shufflenet_v2_x1_0") == shuffle
    assert declared("squeezenet1_0") == {"stem"}


@pytest.mark.parametrize("name", list_models())
def test_every_declaration_matches_a_layer(name):
    """resolve raises when a model's signed_inputs regex matches none of its layers (a typo)."""
    params = jax.eval_shape(lambda: get_model(name, 10).init(
        jax.random.key(0), jnp.zeros((1, _size(name), _size(name), 3)), train=False))["params"]
    resolved = resolve(with_signed_inputs(full_precision(), signed_inputs(name)), params)
    assert "stem" in resolved and re.fullmatch(signed_inputs(name), "stem")
