"""CIFAR VGG-8/11/13 with BatchNorm, as in the official SQAKD (CRD-derived) CIFAR code.

Five stages of 3x3 convs (with bias) + BN + ReLU; the stage configurations are
    vgg8  ('S'): [64], [128], [256], [512], [512]
    vgg11 ('A'): [64], [128], [256, 256], [512, 512], [512, 512]
    vgg13 ('B'): [64, 64], [128, 128], [256, 256], [512, 512], [512, 512]
A 2x2 max pool follows stages 1-3; stage 4 is pooled only for 64-pixel inputs (the
official CIFAR code's ``if h == 64``; ``pool_stage4_at_64=False`` never pools it, as the released
Tiny-ImageNet ``TinyImageNet/models/vgg.py``, where that line is commented out); then global
average pooling and one Linear(512, classes). There are no hidden FC layers: "VGG-8" is the CRD/SQAKD name of 5 convs + 1 FC,
and vgg11/vgg13 take their conv configurations from VGG-A/B (8 and 10 convs + 1 FC).

Layer names: the first conv is ``stem`` (BN ``stem_bn``); every other conv is
``stage{i}_conv{j}`` with BN ``stage{i}_bn{j}`` (stage i = 1..5, conv j from 1), so stage 1
of vgg13 is ``stem``, ``stage1_conv2``. The official first stage (``stem`` and
``stage1_*``) stays FP; stages 2-5 are quantized; ``classifier`` stays FP.

Distillation features (``is_feat=True`` of the released ``CIFAR/models/custom_models_vgg.py``):
the five stage outputs before their max pool, then the pooled 512-vector (the classifier
input); pre-activation: stages 2-5 before their last ReLU (the released VGG blocks apply the
ReLU inside, so its ``preact`` list repeats the post-ReLU maps; stage 1 stays post-ReLU as there).
Block outputs (``flatGroupOut``'s ``block_out1..4``, for CKTF): each conv block's post-ReLU
output of stages 2-5, per stage, in the BLOCKS collection.
"""

from __future__ import annotations

from typing import Any

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
    record_blocks,
    record_feature,
)

CIFAR_VGG_STAGES: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def cifar_vgg_names(stage: int, index: int) -> tuple[str, str]:
    """(conv name, BN name) of conv ``index`` (from 1) in ``stage`` (from 1)."""
    if (stage, index) == (1, 1):
        return "stem", "stem_bn"
    return f"stage{stage}_conv{index}", f"stage{stage}_bn{index}"


class CifarVGG(nn.Module):
    """CIFAR VGG with BN; ``depth`` in (8, 11, 13)."""

    num_classes: int
    depth: int = 8
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None
    pool_stage4_at_64: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, dense = compute_layers(self)
        if self.depth not in CIFAR_VGG_STAGES:
            raise ValueError(f"CIFAR VGG depth must be one of {sorted(CIFAR_VGG_STAGES)}, got {self.depth}")
        norm = bind_norm(self.norm, train, self.axis_name, self.dtype)
        height = x.shape[1]
        x = jnp.asarray(x, self.dtype)
        for i, stage in enumerate(CIFAR_VGG_STAGES[self.depth], start=1):
            outs = []
            for j, features in enumerate(stage, start=1):
                conv_name, bn_name = cifar_vgg_names(i, j)
                x = conv_layer(conv, features, 3, use_bias=True, name=conv_name)(x)
                pre = norm(name=bn_name)(x)
                x = nn.relu(pre)
                outs.append(x)
            record_feature(self, x, pre if i > 1 else None)
            if i > 1:  # the released block_out1..4: stages 2-5 (layer0, stage 1, has none)
                record_blocks(self, outs, "global")
            if i <= 3 or (i == 4 and height == 64 and self.pool_stage4_at_64):
                x = max_pool(x, 2, 2)
        x = global_avg_pool(x)
        record_feature(self, x)
        return float32_logits(dense(self.num_classes, use_bias=True, name="classifier")(x))
