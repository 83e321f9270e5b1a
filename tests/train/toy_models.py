"""Tiny models for train-step tests, built straight from the quantizer core.

`ToyQuantMLP` quantizes its hidden activations and weights with the interval quantizer, keeps
its quantizer parameters under a 'quant' sub-dict, its deltas in 'quant_delta' and exposes the
discretizer outputs as perturbations 'w_q'/'a_q', like the library's quantized layers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qkd_jax import quant


class ToyQuantDense(nn.Module):
    features: int
    bits: int = 2

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        qp = self.param(
            "quant",
            lambda _: {
                "w_lower": jnp.asarray(-0.5),
                "w_upper": jnp.asarray(0.5),
                "a_lower": jnp.asarray(0.0),
                "a_upper": jnp.asarray(2.0),
            },
        )
        dw = self.variable("quant_delta", "w", lambda: jnp.asarray(0.0)).value
        da = self.variable("quant_delta", "a", lambda: jnp.asarray(0.0)).value
        w = quant.interval_quantize(
            kernel, qp["w_lower"], qp["w_upper"], self.bits, signed=True, delta=dw,
            grid_hook=lambda v: self.perturb("w_q", v),
        )
        a = quant.interval_quantize(
            x, qp["a_lower"], qp["a_upper"], self.bits, signed=False, delta=da,
            grid_hook=lambda v: self.perturb("a_q", v),
        )
        return a @ w


class ToyQuantMLP(nn.Module):
    """Dense -> relu -> quantized dense -> relu -> dense; optional BatchNorm after the first."""

    num_classes: int = 4
    hidden: int = 8
    use_bn: bool = False
    axis_name: str | None = None
    quantized: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden, name="stem")(x)
        if self.use_bn:
            x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name, name="bn")(x)
        x = nn.relu(x)
        if self.quantized:
            x = ToyQuantDense(self.hidden, name="qdense")(x)
        else:
            x = nn.Dense(self.hidden, name="qdense")(x)
        x = nn.relu(x)
        return nn.Dense(self.num_classes, name="classifier")(x)


def init_toy(model: nn.Module, key=None, batch: int = 4, in_dim: int = 6):
    key = jax.random.key(0) if key is None else key
    variables = model.init(key, jnp.zeros((batch, in_dim)), train=False)
    return {k: v for k, v in variables.items() if k != "perturbations"}
