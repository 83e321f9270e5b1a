"""ImageNet-style VGG-11 with BatchNorm in the torchvision layout (any input size).

Convs (3x3, bias) + BN + ReLU in configuration A, 2x2 max pool after each stage,
adaptive average pooling to 7x7, flatten in torch (C, H, W) order, then
Linear(25088, 4096) - ReLU - Dropout - Linear(4096, 4096) - ReLU - Dropout - Linear(4096, classes).

Layer names: ``stem`` / ``stem_bn`` for the first conv, ``stage{i}_conv{j}`` / ``stage{i}_bn{j}``
for the others (as in :mod:`qkd_jax.models.cifar_vgg`), ``fc1``, ``fc2``, ``classifier``.
Dropout defaults to 0 (torchvision: 0.5) so that training needs no ``dropout`` rng;
set ``dropout_rate`` and pass ``rngs={'dropout': key}`` to train with it.

Distillation features (as the CIFAR VGG): the five stage outputs before their max pool,
then the classifier input (the ``fc2`` output after ReLU and dropout) as the embedding;
pre-activation: stages 2-5 before their last ReLU.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from qkd_jax.models.cifar_vgg import cifar_vgg_names
from qkd_jax.models.layers import (
    Array,
    BatchNorm,
    ModuleDef,
    adaptive_avg_pool,
    bind_norm,
    compute_layers,
    conv_layer,
    float32_logits,
    max_pool,
    record_feature,
)

VGG_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
    """torchvision VGG with BN; ``stages`` gives the conv widths of the five stages."""

    num_classes: int
    stages: Sequence[Sequence[int]] = VGG_STAGES["A"]
    conv: ModuleDef = nn.Conv
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = BatchNorm
    dtype: Any = jnp.float32
    axis_name: str | None = None
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        conv, dense = compute_layers(self)
        norm = bind_norm(self.norm, train, self.axis_name, self.dtype)
        x = jnp.asarray(x, self.dtype)
        for i, stage in enumerate(self.stages, start=1):
            for j, features in enumerate(stage, start=1):
                conv_name, bn_name = cifar_vgg_names(i, j)
                x = conv_layer(conv, features, 3, use_bias=True, name=conv_name)(x)
                pre = norm(name=bn_name)(x)
                x = nn.relu(pre)
            record_feature(self, x, pre if i > 1 else None)
            x = max_pool(x, 2, 2)
        x = adaptive_avg_pool(x, (7, 7))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch flatten order
        for name in ("fc1", "fc2"):
            x = nn.relu(dense(4096, use_bias=True, name=name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        record_feature(self, x)
        return float32_logits(dense(self.num_classes, use_bias=True, name="classifier")(x))
