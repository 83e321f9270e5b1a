"""Device normalisation against the host (NumPy) normalisation and a float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.data import augment as aug
from qkd_jax.data.device_normalize import normalize, normalizer

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _images() -> np.ndarray:
    images = np.random.default_rng(0).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    images[0, 0, 0] = 0
    images[0, 0, 1] = 255  # both ends of the range
    return images


def test_equals_the_host_normalisation_to_float32_rounding():
    images = _images()
    host = aug.normalize(images, MEAN, STD)
    device = np.asarray(jax.jit(normalizer(MEAN, STD))(images))
    assert device.dtype == np.float32 and device.shape == images.shape
    # Three float32 roundings (x/255, -mean, /std) each side, values below 2.7 in magnitude:
    # a few float32 ulps (2**-22 at 2.7) apart at most, whatever the compiler fuses.
    np.testing.assert_allclose(device, host, rtol=0, atol=4 * 2.0**-22)
    exact = (images.astype(np.float64) / 255 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(device, exact, rtol=0, atol=4 * 2.0**-22)


def test_dtype_is_a_cast_of_the_float32_result():
    images = _images()
    bf16 = np.asarray(normalize(jnp.asarray(images), MEAN, STD, dtype=jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    f32 = aug.normalize(images, MEAN, STD)
    # bfloat16 keeps 8 significant bits: relative error <= 2**-8 after round-to-nearest.
    np.testing.assert_allclose(bf16.astype(np.float32), f32, rtol=2.0**-8, atol=1e-6)
