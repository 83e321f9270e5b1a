"""Normalisation on the accelerator: uint8 NHWC batches in, the model's float input out.

Host pipelines that emit uint8 (`pipeline.make_train_loader(..., image_dtype='uint8')`) send
a quarter of the bytes of float32 and skip a per-pixel pass on the host CPU; the step applies
this function to `batch['image']` first (`train.step.train_step(..., preprocess=...)`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """`(images / 255 - mean) / std` per channel, computed in float32, returned as `dtype`.

    The same float32 operations, in the same order, as `augment.normalize` on the host.
    """
    # NumPy constants, embedded in the compiled step (a jax.Array made here would be a hidden
    # argument of the jitted step, which jax.export cannot map back to the step's inputs).
    mean_ = np.asarray(mean, np.float32)
    std_ = np.asarray(std, np.float32)
    x = images.astype(jnp.float32) / np.float32(255.0)
    return ((x - mean_) / std_).astype(dtype)


def normalizer(mean: Sequence[float], std: Sequence[float],
               dtype: jnp.dtype = jnp.float32) -> Callable[[jax.Array], jax.Array]:
    """`normalize` with its constants bound: a static `preprocess` for the train/eval steps."""
    return functools.partial(normalize, mean=tuple(mean), std=tuple(std), dtype=dtype)
