"""Building the networks of a run from its config: teacher and student models, rules, variables.

Each network exists in two forms with identical parameters: one whose BatchNorm synchronises
its statistics over the device axis (for the compiled train step) and one without an axis (for
work outside the step: calibration, Hessian probes, initialisation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from qkd_jax.data import dataset_info
from qkd_jax.models import get_model, signed_inputs
from qkd_jax.quant import rules as qrules
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.quant.released_methods import RELEASED_METHODS
from qkd_jax.quant.released_rules import mqbench_academic
from qkd_jax.run.estimator_config import config_estimator
from qkd_jax.train.parallel import DATA_AXIS
from qkd_jax.train.state import KEPT_COLLECTIONS

PRESETS: dict[str, Callable[..., qrules.RuleSet]] = {
    "sqakd_cifar": qrules.sqakd_cifar,
    "sqakd_cifar_vgg": qrules.sqakd_cifar_vgg,
    "first_last_8bit": qrules.first_last_8bit,
    "uniform": qrules.uniform,
    "mqbench_academic": mqbench_academic,
}
# The quantizing methods a config may name (rules.METHODS less "none" and the released records,
# which a config selects with quant.variant='released').
METHODS = tuple(m for m in qrules.METHODS if m != "none" and m not in RELEASED_METHODS.values())


@dataclasses.dataclass(frozen=True)
class Network:
    """One network: `train_model` syncs BatchNorm over the device axis, `local_model` does not."""

    train_model: nn.Module
    local_model: nn.Module


def num_classes(config: ml_collections.ConfigDict) -> int:
    return config.model.num_classes or dataset_info(config.dataset.name).num_classes


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) fed to the model."""
    info = dataset_info(config.dataset.name)
    size = config.dataset.image_size or info.input_size
    return (size, size, info.image_shape[2])


def student_method(config: ml_collections.ConfigDict) -> str:
    """The quantizer record the student uses: quant.method, or its released record when
    quant.variant == 'released'."""
    q = config.quant
    return RELEASED_METHODS[q.method] if q.variant == "released" else q.method


def student_rules(config: ml_collections.ConfigDict) -> qrules.RuleSet:
    """The preset's rules with the model's signed-input declaration (`models.signed_inputs`)."""
    q = config.quant
    method = student_method(config)
    extra = {"pact_alpha": q.pact_alpha} if (method == "pact" and q.pact_alpha > 0) else {}
    estimator = config_estimator(q)
    if estimator is not None:  # every quantized layer's rule carries it (docs/method.md section 12)
        extra["estimator"] = estimator
    rules = PRESETS[q.preset](method, q.w_bits, q.a_bits, **extra)
    return qrules.with_signed_inputs(rules, signed_inputs(config.model.name))


def compute_dtype(config: ml_collections.ConfigDict) -> Any:
    """The models' compute dtype (config.compute_dtype; float32 for a config written before the
    key existed): activations, convolutions and matmuls. Parameters stay float32."""
    return jnp.dtype(config.get("compute_dtype", "float32"))


def _network(config: ml_collections.ConfigDict, dtype: Any = None, **layer_kwargs: Any) -> Network:
    dtype = compute_dtype(config) if dtype is None else dtype
    build = lambda axis: get_model(  # noqa: E731
        config.model.name, num_classes(config), axis_name=axis, dtype=dtype, **layer_kwargs
    )
    return Network(train_model=build(DATA_AXIS), local_model=build(None))


def teacher_network(config: ml_collections.ConfigDict) -> Network:
    return _network(config)


def student_network(config: ml_collections.ConfigDict, dtype: Any = None) -> Network:
    """The quantized student, computing in `dtype` (default: the config's compute dtype; the
    integer export passes float32, the precision its integer inference is checked against)."""
    conv, dense = quantized_layers(student_rules(config))
    return _network(config, dtype, conv=conv, dense=dense)


def init_variables(model: nn.Module, config: ml_collections.ConfigDict, key: jax.Array) -> dict:
    """Fresh variables (params, batch_stats, quant_delta), without gradient-probe collections."""
    dummy = jnp.zeros((1, *input_shape(config)), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(key)
    return {k: v for k, v in dict(variables).items() if k in KEPT_COLLECTIONS}


def set_deltas(variables: dict, value: float) -> dict:
    """Every entry of 'quant_delta' set to `value` (the fixed-delta EWGS estimator; 0 = STE)."""
    if "quant_delta" not in variables:
        return variables
    deltas = jax.tree.map(lambda d: jnp.full_like(d, value), variables["quant_delta"])
    return {**variables, "quant_delta": deltas}
