"""SqueezeNet 1.0 in the torchvision layout (any input size large enough).

7x7/2 stem (96, bias, no padding) + ReLU; ceil-mode 3x3/2 max pools; Fire modules
fire2-fire9 (squeeze 1x1, then expand 1x1 and 3x3 concatenated); Dropout; the
classifier is a 1x1 conv to the classes + ReLU + global average pooling, as in
torchvision (the model has no Linear layer and no BatchNorm: ``norm`` and
``axis_name`` are accepted for a uniform interface and unused).

Layer names: ``stem``; ``fire{k}`` (k = 2..9) with ``squeeze``, ``expand1x1``, ``expand3x3``;
``classifier`` (a conv made by the ``conv`` factory).

Distillation features: the stem output (before the first max pool), the outputs of the
three Fire groups between max pools (fire2-4, fire5-8, fire9), and the global average of
the fire9 output as the embedding (the classifier acts on the map, conv + ReLU + pooling,
so no vector is its input); pre-activation: the groups' last Fire before its ReLU.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from qkd_jax.models.layers import (
    Array,
    BatchNorm,
    ModuleDef,
    compute_layers,
    conv_layer,
    float32_logits,
    global_avg_pool,
    max_pool,
    record_feature,
)

#: (squeeze, expand1x1, expand3x3) of fire2..fire9; a max pool precedes fire2, fire5 and fire9.
FIRE_SETTING: tuple[tuple[int, int, int], ...] = (
    (16, 64, 64),
    (16, 64, 64),
    (32, 128, 128),
    (32, 128, 128),
    (48, 192, 192),
    (48, 192, 192),
    (64, 256, 256),
    (64, 256, 256),
)
_POOL_BEFORE = (2, 5, 9)


class Fire(nn.Module):
    """Squeeze 1x1 -> ReLU -> [expand 1x1, expand 3x3] -> ReLU."""

    squeeze: int
    expand1x1: int
    expand3x3: int
    conv: ModuleDef

    def __call__(self, x: Array) -> Array:
        return nn.relu(self.preactivation(x))

    @nn.compact
    def preactivation(self, x: Array) -> Array:
        """The concatenated expand outputs before the final ReLU."""
        x = nn.relu(conv_layer(self.conv, self.squeeze, 1, use_bias=True, name="squeeze")(x))
        a = conv_layer(self.conv, self.expand1x1, 1, use_bias=True, name="expand1x1")(x)
        b = conv_layer(self.conv, self.expand3x3, 3, use_bias=True, name="expand3x3")(x)
        return jnp.concatenate([a, b], axis=-1)


class SqueezeNet(nn.Module):
    """torchvision SqueezeNet 1.0."""

    num_classes: int
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, _ = compute_layers(self)
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(conv_layer(conv, 96, 7, strides=2, padding=0, use_bias=True, name="stem")(x))
        record_feature(self, x)
        last = len(FIRE_SETTING) + 1
        for k, setting in enumerate(FIRE_SETTING, start=2):
            if k in _POOL_BEFORE:
                x = max_pool(x, 3, 2, ceil_mode=True)
            pre = Fire(*setting, conv=conv, name=f"fire{k}").preactivation(x)
            x = nn.relu(pre)
            if k + 1 in _POOL_BEFORE or k == last:
                record_feature(self, x, pre)
        record_feature(self, global_avg_pool(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = conv_layer(conv, self.num_classes, 1, use_bias=True, name="classifier")(x)
        return float32_logits(global_avg_pool(nn.relu(x)))
