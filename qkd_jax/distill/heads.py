"""Trainable auxiliary parts of the feature-distillation criteria, as the released modules.

kaiqi123/SQAKD CIFAR/models/util.py (``ConvReg``, ``LinearEmbed``, ``Embed``) and
CIFAR/distiller_zoo/VID.py (the ``VIDLoss`` regressor), NHWC. Initialisation follows
PyTorch's defaults for ``nn.Linear`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d``: weights
kaiming-uniform with a = sqrt(5), i.e. uniform in +-1/sqrt(fan_in), which is flax's
``variance_scaling(1/3, 'fan_in', 'uniform')``; biases uniform in +-1/sqrt(fan_in) with the
same fan_in (torch's fan_in of a transposed convolution is out_channels * kh * kw, the
kernel's second axis). BatchNorm starts at scale 1, bias 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.distill.feature_losses import _normalize
from qkd_jax.models.layers import Array


def torch_kernel_init(in_axis: int = -2, out_axis: int = -1) -> Callable:
    """PyTorch's default weight init (kaiming_uniform, a = sqrt(5)): U(+-1/sqrt(fan_in)), fan_in
    the product of the kernel's receptive field and its ``in_axis`` size."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis)


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias init: U(+-1/sqrt(fan_in)) with the layer's weight fan_in."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LinearEmbed(nn.Module):
    """Flatten, then ``nn.Linear(dim_in, dim_out)`` (released ``LinearEmbed``, CC's heads)."""

    dim_out: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.dim_out, kernel_init=torch_kernel_init(),
                        bias_init=torch_bias_init(x.shape[-1]), name="linear")(x)


class Embed(nn.Module):
    """:class:`LinearEmbed` then L2 normalisation of each row (released ``Embed``, CRD's heads).
    The released ``Normalize`` divides by the norm itself; here the norm is floored at 1e-12
    (equal except at a zero row, where torch gives NaN)."""

    dim_out: int = 128

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return _normalize(LinearEmbed(self.dim_out, name="embed")(x), axis=1)


class ConvReg(nn.Module):
    """FitNet's convolutional regressor (released ``ConvReg``, ``use_relu=True``) from a student
    map (N, sH, sW, sC) to the teacher's (tH, tW, tC): a 3x3 stride-2 convolution when
    sH = 2 tH, a 4x4 stride-2 transposed convolution when 2 sH = tH, else (sH >= tH) a
    (1 + sH - tH, 1 + sW - tW) valid convolution; then BatchNorm in training mode (batch
    statistics, synchronised over ``axis_name``) and ReLU."""

    target_shape: tuple[int, int, int]  # (tH, tW, tC)
    use_relu: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        t_h, t_w, t_c = self.target_shape
        s_h, s_w, s_c = x.shape[1:]
        if s_h == 2 * t_h:
            x = nn.Conv(t_c, (3, 3), strides=2, padding=((1, 1), (1, 1)), kernel_init=torch_kernel_init(),
                        bias_init=torch_bias_init(9 * s_c), name="conv")(x)
        elif 2 * s_h == t_h:
            # torch ConvTranspose2d(k=4, s=2, p=1): pad the stride-dilated input by k - 1 - p = 2.
            x = nn.ConvTranspose(t_c, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                                 kernel_init=torch_kernel_init(in_axis=-1, out_axis=-2),
                                 bias_init=torch_bias_init(16 * t_c), name="conv")(x)
        elif s_h >= t_h:
            kernel = (1 + s_h - t_h, 1 + s_w - t_w)
            x = nn.Conv(t_c, kernel, padding="VALID", kernel_init=torch_kernel_init(),
                        bias_init=torch_bias_init(kernel[0] * kernel[1] * s_c), name="conv")(x)
        else:
            raise ValueError(
                f"ConvReg: student map height {s_h} is smaller than the teacher's {t_h} and not half of "
                f"it; choose a hint_layer where the student map is at least as tall (or half as tall)."
            )
        x = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, axis_name=self.axis_name,
                         name="bn")(x)
        return nn.relu(x) if self.use_relu else x


class VIDRegressor(nn.Module):
    """VID's regressor: conv1x1 - ReLU - conv1x1 - ReLU - conv1x1, no biases (released
    ``VIDLoss.regressor`` with ``num_mid_channel`` = ``mid``)."""

    mid: int
    out: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.relu(nn.Conv(self.mid, (1, 1), use_bias=False, kernel_init=torch_kernel_init(), name="conv0")(x))
        x = nn.relu(nn.Conv(self.mid, (1, 1), use_bias=False, kernel_init=torch_kernel_init(), name="conv1")(x))
        return nn.Conv(self.out, (1, 1), use_bias=False, kernel_init=torch_kernel_init(), name="conv2")(x)
