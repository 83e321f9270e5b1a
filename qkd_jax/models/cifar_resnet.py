"""CIFAR ResNet-20/32/56 in the layout of the official EWGS / SQAKD CIFAR code.

3x3 stem (16 channels, no bias) + BN + ReLU; three stages of basic blocks (16, 32, 64
channels, strides 1, 2, 2) with option-A shortcuts (stride-2 slice and zero-padded
channels, no parameters); global average pooling; a BatchNorm1d over the 64 pooled
features; a Linear classifier. ResNet-20 on 10 classes has 269,850 parameters.

Layer names: ``stem``, ``stem_bn``, ``layer{i}_{j}`` (stage i = 1..3, block j from 0) with
``conv1``, ``bn1``, ``conv2``, ``bn2`` inside, ``head_bn`` (the BatchNorm1d), ``classifier``.
The SQAKD recipe quantizes every conv under ``layer*``; stem, BNs and classifier stay FP.

Distillation features (``is_feat=True`` of the released ``CIFAR/models/custom_models_resnet.py``):
stem output, the three stage outputs, the pooled 64-vector before ``head_bn``; pre-activation:
the stages' last-block sums before their ReLU. Block outputs (``flatGroupOut``'s
``block_out1..3``, for CKTF): each block's output, per stage, in the BLOCKS collection.
"""

from __future__ import annotations

from typing import Any, Callable

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
    record_blocks,
    record_feature,
)


def option_a_shortcut(x: Array, planes: int, stride: int = 2) -> Array:
    """Option-A shortcut: ``x[:, ::stride, ::stride]`` with planes//4 zero channels on each side."""
    pad = planes // 4
    if x.shape[-1] + 2 * pad != planes:
        raise ValueError(f"option-A shortcut maps {x.shape[-1]} channels to {planes}: needs in = planes / 2")
    return jnp.pad(x[:, ::stride, ::stride, :], ((0, 0), (0, 0), (0, 0), (pad, pad)))


class CifarBasicBlock(nn.Module):
    """Two 3x3 convs with BN; option-A shortcut where the shape changes."""

    planes: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[Array], Array] = nn.relu

    def __call__(self, x: Array) -> Array:
        return self.act(self.preactivation(x))

    @nn.compact
    def preactivation(self, x: Array) -> Array:
        """The block's output before its final activation (residual sum)."""
        y = conv_layer(self.conv, self.planes, 3, strides=self.strides, name="conv1")(x)
        y = self.act(self.norm(name="bn1")(y))
        y = conv_layer(self.conv, self.planes, 3, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.planes:
            x = option_a_shortcut(x, self.planes, self.strides)
        return y + x


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110)."""

    num_classes: int
    depth: int = 20
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None
    act: Callable[[Array], Array] = nn.relu

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, dense = compute_layers(self)
        if (self.depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
        blocks = (self.depth - 2) // 6
        norm = bind_norm(self.norm, train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        x = conv_layer(conv, 16, 3, name="stem")(x)
        x = self.act(norm(name="stem_bn")(x))
        record_feature(self, x)
        for i, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            outs = []
            for j in range(blocks):
                pre = CifarBasicBlock(
                    planes, stride if j == 0 else 1, conv, norm, self.act, name=f"layer{i}_{j}"
                ).preactivation(x)
                x = self.act(pre)
                outs.append(x)
            record_feature(self, x, pre)
            record_blocks(self, outs, "avg8")
        x = global_avg_pool(x)
        record_feature(self, x)
        x = norm(name="head_bn")(x)
        return float32_logits(dense(self.num_classes, use_bias=True, name="classifier")(x))
