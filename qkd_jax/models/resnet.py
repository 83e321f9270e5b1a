"""ImageNet-style ResNet-18/34/50 in the torchvision layout (any input size).

7x7/2 stem + BN + ReLU + 3x3/2 max pool; four stages (64, 128, 256, 512 planes); basic
blocks (18/34) or bottlenecks with the stride on the 3x3 conv (50, "v1.5"); 1x1 conv + BN
downsample where the shape changes; global average pooling; Linear classifier.

Layer names: ``stem``, ``stem_bn``, ``layer{i}_{j}`` (stage i = 1..4, block j from 0) with
``conv1``/``bn1``, ``conv2``/``bn2`` (``conv3``/``bn3``), ``downsample_conv``/``downsample_bn``
inside, ``classifier``.

Distillation features: the stem output (after its ReLU, before the max pool), the four
stage outputs, the pooled embedding (the classifier input); pre-activation: the stages'
last-block sums before their ReLU.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from qkd_jax.models.layers import (
    Array,
    BatchNorm,
    ModuleDef,
    bind_norm,
    compute_layers,
    conv_layer,
    float32_logits,
    global_avg_pool,
    max_pool,
    record_feature,
)


class BasicBlock(nn.Module):
    """Two 3x3 convs (torchvision BasicBlock)."""

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    expansion: int = 1

    def __call__(self, x: Array) -> Array:
        return nn.relu(self.preactivation(x))

    @nn.compact
    def preactivation(self, x: Array) -> Array:
        """The residual sum before the final ReLU."""
        y = conv_layer(self.conv, self.planes, 3, strides=self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv_layer(self.conv, self.planes, 3, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        return y + _downsample(self, x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 x4 (torchvision Bottleneck)."""

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    expansion: int = 4

    def __call__(self, x: Array) -> Array:
        return nn.relu(self.preactivation(x))

    @nn.compact
    def preactivation(self, x: Array) -> Array:
        """The residual sum before the final ReLU."""
        y = conv_layer(self.conv, self.planes, 1, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = conv_layer(self.conv, self.planes, 3, strides=self.strides, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = conv_layer(self.conv, self.planes * self.expansion, 1, name="conv3")(y)
        y = self.norm(name="bn3")(y)
        return y + _downsample(self, x)


def _downsample(block: BasicBlock | Bottleneck, x: Array) -> Array:
    """Identity, or 1x1 strided conv + BN where stride or width changes (called inside a block)."""
    out = block.planes * block.expansion
    if block.strides == 1 and x.shape[-1] == out:
        return x
    x = conv_layer(block.conv, out, 1, strides=block.strides, name="downsample_conv")(x)
    return block.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    """torchvision-layout ResNet; ``stage_sizes`` blocks per stage of ``block_cls``."""

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: ModuleDef = BasicBlock
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, dense = compute_layers(self)
        norm = bind_norm(self.norm, train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv_layer(conv, 64, 7, strides=2, name="stem")(x)
        x = nn.relu(norm(name="stem_bn")(x))
        record_feature(self, x)
        x = max_pool(x, 3, 2, padding=1)
        for i, blocks in enumerate(self.stage_sizes, start=1):
            planes = 64 * 2 ** (i - 1)
            for j in range(blocks):
                strides = 2 if (i > 1 and j == 0) else 1
                pre = self.block_cls(planes, strides, conv, norm, name=f"layer{i}_{j}").preactivation(x)
                x = nn.relu(pre)
            record_feature(self, x, pre)
        x = global_avg_pool(x)
        record_feature(self, x)
        return float32_logits(dense(self.num_classes, use_bias=True, name="classifier")(x))
