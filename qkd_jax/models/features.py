"""Distillation features of the zoo models: the released ``is_feat=True`` lists.

Every model appends to the ``FEATURES`` collection, in forward order, the maps the released
code distils from: the stem output, each stage's output and the pre-logit embedding
(CIFAR ResNet: stem, 3 stages, pooled vector before ``head_bn``; CIFAR / ImageNet VGG: the
5 stage outputs before pooling, then the classifier input; ImageNet-style models: stem
(before any max pool), each stage, the pooled embedding). Each model's docstring lists its
features and says where ``preact`` differs (pre-ReLU stage outputs where a ReLU closes
the stage). Nothing is recorded unless FEATURES is named mutable, so parameters and the
compiled forward are unchanged otherwise.

    logits, feats = apply_with_features(model, variables, x)          # eval / frozen teacher
    logits, state = model.apply(variables, x, train=True, mutable=["batch_stats", FEATURES])
    feats = read_features(state)                                      # training step

Block outputs (CKTF, the released ``flatGroupOut=True``): the CIFAR ResNets and VGGs also
append each stage's per-block outputs to the ``BLOCKS`` collection when it is named mutable
(:func:`read_block_outputs`); other models record none.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from qkd_jax.models.layers import BLOCKS, FEATURES, Array


def read_features(state: Mapping[str, Any], preact: bool = False) -> list[Array]:
    """The recorded features (or their pre-activations) from an apply's mutable state, in order."""
    if FEATURES not in state:
        raise ValueError(f"no {FEATURES!r} collection: apply the model with mutable=[..., {FEATURES!r}]")
    return list(state[FEATURES]["preact" if preact else "post"])


def apply_with_features(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: Array,
    *,
    train: bool = False,
    preact: bool = False,
    **kwargs: Any,
) -> tuple[Array, list[Array]]:
    """(logits, features) of one forward pass. With ``train=True`` the batch statistics are
    used and their running-average update is discarded: a training step that keeps it calls
    ``model.apply`` with ``mutable=["batch_stats", FEATURES]`` and :func:`read_features`."""
    mutable = [FEATURES] + (["batch_stats"] if train and "batch_stats" in variables else [])
    logits, state = model.apply(variables, x, train=train, mutable=mutable, **kwargs)
    return logits, read_features(state, preact)


def read_block_outputs(state: Mapping[str, Any]) -> tuple[str, list[list[Array]]]:
    """(pool rule, per-stage lists of block outputs) recorded in an apply's BLOCKS collection;
    ValueError when the model records none (only the CIFAR ResNets and VGGs do)."""
    recorded = state.get(BLOCKS, {})
    if len(recorded) != 1:
        raise ValueError(f"no per-block outputs in {BLOCKS!r}: apply with mutable=[..., {BLOCKS!r}] a model "
                         f"that records them (the CIFAR ResNets resnet20/32/56 and VGGs vgg8/11/13)")
    (pool, stages), = recorded.items()
    return pool, [list(stage) for stage in stages]
