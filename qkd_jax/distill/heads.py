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


def _conv3(features: int, in_features: int, name: str) -> nn.Conv:
    """torch ``nn.Conv2d(in, out, 3, 1, 1)`` with its default init."""
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), kernel_init=torch_kernel_init(),
                   bias_init=torch_bias_init(9 * in_features), name=name)


def _conv_transpose3(features: int, name: str) -> nn.ConvTranspose:
    """torch ``nn.ConvTranspose2d(in, out, 3, 1, 1)`` with its default init (fan_in = out * 9);
    stride 1 with torch padding 1 pads the input by k - 1 - p = 1."""
    return nn.ConvTranspose(features, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                            kernel_init=torch_kernel_init(in_axis=-1, out_axis=-2),
                            bias_init=torch_bias_init(9 * features), name=name)


class FactorEncoder(nn.Module):
    """Three 3x3 same-padding convolutions in -> in -> out -> out, each followed (when ``use_bn``)
    by BatchNorm in training mode and LeakyReLU(0.1): the released ``Paraphraser.encoder``
    (``use_bn=False``) and ``Translator.encoder`` (``use_bn=True``)."""

    out_channels: int
    use_bn: bool
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_c = x.shape[-1]
        for i, (c_in, c_out) in enumerate(((in_c, in_c), (in_c, self.out_channels),
                                           (self.out_channels, self.out_channels))):
            x = _conv3(c_out, c_in, f"conv{i}")(x)
            if self.use_bn:
                x = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                                 axis_name=self.axis_name, name=f"bn{i}")(x)
            x = nn.leaky_relu(x, 0.1)
        return x


def factor_channels(t_channels: int, rate: float = 0.5) -> int:
    """The factor's channel count, ``int(t_channels * rate)`` as released (rate k = 0.5)."""
    out = int(t_channels * rate)
    if out < 1:
        raise ValueError(f"factor rate {rate} leaves no channel of the teacher's {t_channels}; use a larger rate.")
    return out


class Paraphraser(nn.Module):
    """Factor Transfer's paraphraser (released ``Paraphraser(t_shape)``, k = 0.5, no BatchNorm):
    an encoder to ``int(C * rate)`` channels and a decoder of three 3x3 stride-1 transposed
    convolutions back to C, each followed by LeakyReLU(0.1). ``is_factor=True`` returns the
    factor only; otherwise (factor, reconstruction)."""

    rate: float = 0.5

    @nn.compact
    def __call__(self, x: Array, is_factor: bool = False) -> Array | tuple[Array, Array]:
        in_c = x.shape[-1]
        out_c = factor_channels(in_c, self.rate)
        factor = FactorEncoder(out_c, use_bn=False, name="encoder")(x)
        if is_factor:
            return factor
        rec = factor
        for i, c in enumerate((out_c, in_c, in_c)):
            rec = nn.leaky_relu(_conv_transpose3(c, f"deconv{i}")(rec), 0.1)
        return factor, rec


class Translator(nn.Module):
    """Factor Transfer's translator (released ``Translator(s_shape, t_shape)``, k = 0.5, with
    BatchNorm in training mode): the student's map -> ``int(t_channels * rate)`` channels."""

    t_channels: int
    rate: float = 0.5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return FactorEncoder(factor_channels(self.t_channels, self.rate), use_bn=True,
                             axis_name=self.axis_name, name="encoder")(x)
