"""What a gradient estimator does to the gradients of a quantized network, per quantized layer.

    report = estimator_diagnostics(model_for, rules, variables, images, labels,
                                   {"ste": None, "dsq": estimators.make("dsq")})

For one batch and one model state (inference mode: BatchNorm's running statistics, hard forward):
  grad_norm[est][layer]     ||dL/dW|| of the layer's kernel under each estimator
  act_grad_norm[est][layer] ||dL/dx|| at the layer's input x (before its activation quantizer: the
                            gradient the layer passes back, after its own estimator) under each
                            estimator
  cosine[layer][a|b]        cosine similarity of two estimators' kernel gradients
  clip_fraction[layer]      share of kernel elements outside the weight quantizer's clip range
                            (its straight-through derivative is exactly 0 there)
  act_clip_fraction[layer]  the same for the layer's input elements and its activation quantizer
                            (0 for a layer whose inputs stay full precision)
  descent[est]              share of (layer, step size) pairs where the estimator's gradient step
                            on that layer's kernel alone, W - eta dL/dW / ||dL/dW||, lowers the true
                            quantized loss (the descent check); descent_detail[est][layer] per eta
L is the cross-entropy of the hard-quantized network. `model_for(estimator)` builds the model with
every quantized layer using `estimator` (`with_estimator` of the rules); None is the rules' own.
The layer inputs are read (and probed with a zero offset for dL/dx) by intercepting the quantized
layers' calls (`flax.linen.intercept_methods`), so no model has to expose them.
Plain functions, for notebooks; docs/method.md section 12.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from qkd_jax.quant.estimators import Estimator
from qkd_jax.quant.layer_quant import QUANT, quantize_input, quantize_weight
from qkd_jax.quant.rules import Rule, RuleSet, resolve


def with_estimator(rules: RuleSet, estimator: Optional[Estimator]) -> RuleSet:
    """`rules` with every quantizing plain `Rule` carrying `estimator` (full-precision and
    full-range rules, which do not round, are kept)."""
    out = tuple(dataclasses.replace(r, estimator=estimator)
                if type(r) is Rule and not r.full_precision else r for r in rules.rules)
    return dataclasses.replace(rules, rules=out)


def _loss(model: nn.Module, variables: Mapping, params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
    logits = model.apply({**variables, "params": params}, images, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def _loss_and_inputs(model: nn.Module, variables: Mapping, params: Any, offsets: Optional[Mapping[str, jax.Array]],
                     images: jax.Array, labels: jax.Array, layers: Sequence[str]) -> tuple[jax.Array, dict]:
    """(loss, {layer: its input}) with `offsets[layer]` (zeros: a gradient probe) added to the input
    of each named layer's call."""
    inputs: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        path = "/".join(context.module.path) if context.method_name == "__call__" else None
        if path in layers and args:
            x = args[0] if offsets is None else args[0] + offsets[path]
            inputs[path] = x
            args = (x, *args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        loss = _loss(model, variables, params, images, labels)
    return loss, inputs


def _kernel_path(layer: str) -> tuple[str, ...]:
    return (*layer.split("/"), "kernel") if layer else ("kernel",)


def _cosine(a: jax.Array, b: jax.Array) -> float:
    den = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return float(jnp.where(den > 0, jnp.vdot(a, b) / jnp.where(den > 0, den, 1.0), 0.0))


def clip_fraction(lp: Any, kernel: jax.Array, q: Mapping[str, jax.Array]) -> float:
    """Share of kernel elements where the weight quantizer's straight-through derivative is 0
    (outside its clip range); 0 for a layer whose weights stay full precision."""
    if not lp.quantized or lp.w_bits is None:
        return 0.0
    grad = jax.grad(lambda w: jnp.sum(quantize_weight(lp, w, q)))(kernel)
    return float(jnp.mean(grad == 0))


def input_clip_fraction(lp: Any, x: jax.Array, q: Mapping[str, jax.Array]) -> float:
    """Share of input elements where the activation quantizer's straight-through derivative is 0
    (outside its clip range); 0 for a layer whose inputs stay full precision."""
    if not lp.quantized or lp.a_bits is None:
        return 0.0
    grad = jax.grad(lambda v: jnp.sum(quantize_input(lp, v, q)))(jnp.asarray(x, jnp.float32))
    return float(jnp.mean(grad == 0))


def estimator_diagnostics(
    model_for: Callable[[Optional[Estimator]], nn.Module],
    rules: RuleSet,
    variables: Mapping[str, Any],
    images: jax.Array,
    labels: jax.Array,
    estimators: Mapping[str, Optional[Estimator]],
    *,
    step_sizes: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> dict[str, Any]:
    """The per-layer report of the module docstring for the named `estimators` (>= 1)."""
    if not estimators:
        raise ValueError("estimator_diagnostics needs at least one estimator, e.g. {'ste': None}")
    layers = [p for p, lp in resolve(rules, variables).items() if lp.quantized and lp.w_bits is not None]
    resolved = resolve(rules, variables)
    params = variables["params"]
    flat_params = traverse_util.flatten_dict(params)
    hard = model_for(None)
    # one compiled loss for the base value and every moved one: a step of size 0 compares equal
    loss_at = jax.jit(lambda p: _loss(hard, variables, p, images, labels))
    base = float(loss_at(params))
    inputs = jax.jit(lambda p: _loss_and_inputs(hard, variables, p, None, images, labels, layers)[1])(params)
    zeros = jax.tree.map(jnp.zeros_like, inputs)
    grads: dict[str, dict[str, jax.Array]] = {}
    act_grads: dict[str, dict[str, jax.Array]] = {}
    for name, est in estimators.items():
        model = model_for(est)
        g, g_x = jax.jit(jax.grad(lambda p, o: _loss_and_inputs(model, variables, p, o, images, labels, layers)[0],
                                  argnums=(0, 1)))(params, zeros)
        g = traverse_util.flatten_dict(g)
        grads[name] = {layer: g[_kernel_path(layer)] for layer in layers}
        act_grads[name] = g_x
    report: dict[str, Any] = {"loss": base, "layers": layers,
                              "grad_norm": {n: {l: float(jnp.linalg.norm(g[l])) for l in layers}
                                            for n, g in grads.items()},
                              "act_grad_norm": {n: {l: float(jnp.linalg.norm(g[l])) for l in layers}
                                                for n, g in act_grads.items()}}
    names = list(estimators)
    report["cosine"] = {l: {f"{a}|{b}": _cosine(grads[a][l], grads[b][l])
                            for i, a in enumerate(names) for b in names[i + 1:]} for l in layers}

    def quant_params(layer: str) -> dict:
        prefix = _kernel_path(layer)[:-1] + (QUANT,)
        return {k[-1]: v for k, v in flat_params.items() if k[:-1] == prefix}

    report["clip_fraction"] = {l: clip_fraction(resolved[l], flat_params[_kernel_path(l)], quant_params(l))
                               for l in layers}
    report["act_clip_fraction"] = {l: input_clip_fraction(resolved[l], inputs[l], quant_params(l)) for l in layers}
    detail: dict[str, dict[str, list[bool]]] = {}
    for name in names:
        detail[name] = {}
        for layer in layers:
            g = grads[name][layer]
            norm = jnp.linalg.norm(g)
            falls = []
            for eta in step_sizes:
                step = jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), 0.0)
                moved = dict(flat_params)
                moved[_kernel_path(layer)] = flat_params[_kernel_path(layer)] - eta * step
                falls.append(bool(loss_at(traverse_util.unflatten_dict(moved)) < base))
            detail[name][layer] = falls
    report["descent_detail"] = detail
    report["descent"] = {n: sum(map(sum, d.values())) / max(1, len(layers) * len(step_sizes))
                         for n, d in detail.items()}
    return report
