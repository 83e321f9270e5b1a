"""Quantizer core: pure functions with custom gradients, usable under jit/vmap/grad/pmap.

    from qkd_jax import quant
    w_hat = quant.interval_quantize(w, -0.1, 0.1, bits=2, signed=True, delta=0.0)
"""

from qkd_jax.quant.clip import clip_inclusive, clip_straight_through
from qkd_jax.quant.discretize import discretize, levels_for_bits, round_ste
from qkd_jax.quant.hessian import (
    HESSIAN_PROBES,
    ewgs_delta,
    ewgs_ratio,
    hutchinson_trace,
    hutchinson_traces,
    hutchinson_traces_per_leaf,
    hvp,
)
from qkd_jax.quant.quantizers import (
    dorefa_activation,
    dorefa_weight,
    interval_quantize,
    lsq,
    lsq_bounds,
    pact,
    qkd_interval,
    qkd_levels,
)
from qkd_jax.quant.positive import positive_width  # noqa: E402
from qkd_jax.quant.validation import MAX_BITS, MIN_BITS, check_bits

__all__ = [
    "HESSIAN_PROBES",
    "MAX_BITS",
    "MIN_BITS",
    "check_bits",
    "clip_inclusive",
    "clip_straight_through",
    "discretize",
    "dorefa_activation",
    "dorefa_weight",
    "ewgs_delta",
    "ewgs_ratio",
    "hutchinson_trace",
    "hutchinson_traces",
    "hutchinson_traces_per_leaf",
    "hvp",
    "interval_quantize",
    "levels_for_bits",
    "lsq",
    "lsq_bounds",
    "pact",
    "qkd_interval",
    "qkd_levels",
    "round_ste",
    "positive_width",
]

# Quantized layers, per-layer precision rules and calibration (issue 3).
from qkd_jax.quant.calibration import (  # noqa: E402
    DeadLayerError,
    UnsignedInputError,
    calibrate,
    calibrate_with_report,
)
from qkd_jax.quant.layer_quant import (  # noqa: E402
    CALIBRATION_COLLECTION,
    DELTA_COLLECTION,
    PERTURBATIONS,
    QUANT,
)
from qkd_jax.quant.layers import QConv, QDense, quantized_layers  # noqa: E402
from qkd_jax.quant.methods import QUANT_METHODS, QuantMethod, get_method, register  # noqa: E402
from qkd_jax.quant.rules import (  # noqa: E402
    LayerPrecision,
    Rule,
    RuleSet,
    describe,
    first_last_8bit,
    full_precision,
    quantizable_paths,
    resolve,
    rule_set,
    sqakd_cifar,
    sqakd_cifar_vgg,
    uniform,
    with_signed_inputs,
)

__all__ += [
    "CALIBRATION_COLLECTION",
    "DELTA_COLLECTION",
    "DeadLayerError",
    "LayerPrecision",
    "PERTURBATIONS",
    "QConv",
    "QDense",
    "QUANT_METHODS",
    "QuantMethod",
    "QUANT",
    "Rule",
    "RuleSet",
    "calibrate",
    "calibrate_with_report",
    "describe",
    "first_last_8bit",
    "full_precision",
    "get_method",
    "quantizable_paths",
    "quantized_layers",
    "register",
    "resolve",
    "rule_set",
    "sqakd_cifar",
    "sqakd_cifar_vgg",
    "uniform",
    "UnsignedInputError",
    "with_signed_inputs",
]
