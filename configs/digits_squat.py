"""SQAKD and SQuaT side by side on the bundled handwritten digits, for any quantizer method.

The digits demo's teacher and calibration (configs/digits_demo.py), then two student phases from
the same calibration with the demo's student recipe: 'sqakd' (KL_4(student, teacher), no labels)
and 'squat' (the same KL + 1.0 * MSE between the student's quantized input of the last block's
conv2 and the teacher's same input quantized with the student's CURRENT quantizer parameters,
qkd_jax.distill.squat_feature; docs/method.md "SQuaT"). Both phases share the delta policy:
quant.estimator 'ste' (delta 0) unless overridden, for both (--config.quant.estimator=hessian).

ARG (after the colon; default 'squat,interval,w2a2'), comma-separated tokens in any order:
  squat | squat_ce   SQuaT label-free (released ImageNet --kd_alpha 0.0) or with the CIFAR script's
                     1.0 * CE term
  METHOD             interval (EWGS / SQAKD), pact, lsq, dorefa, qkd
  wBaB               B in 1..8
  l1                 the L1 distance instead of the released MSE

    python -m qkd_jax.main --config=configs/digits_squat.py:squat,lsq,w2a2 --workdir=/tmp/qkd_digits_squat
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from qkd_jax.run import recipes

METHODS = ("interval", "pact", "lsq", "dorefa", "qkd")


def _demo_config() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("digits_demo.py")
    spec = importlib.util.spec_from_file_location("_digits_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    tokens = [t.strip().lower() for t in (arg or "squat,interval,w2a2").split(",") if t.strip()]
    distance = "l1" if "l1" in tokens else "mse"
    tokens = [t for t in tokens if t != "l1"]
    variant = recipes.parse_variant(",".join(tokens), objectives=tuple(recipes.SQUAT_TOKENS), methods=METHODS,
                                    default="squat,interval,w2a2",
                                    default_method={t: "interval" for t in recipes.SQUAT_TOKENS})
    if variant.objective == "fp":
        raise ValueError(f"invalid config ARG {arg!r}: this file trains quantized students; name bits, e.g. 'w2a2'")
    c = _demo_config()
    c.quant.method, c.quant.w_bits, c.quant.a_bits = variant.method, variant.w_bits, variant.a_bits
    demo = c.phases.sqakd
    squat = recipes.squat_phase(variant.objective, epochs=demo.epochs, batch_size=demo.batch_size,
                                weights=ml_collections.ConfigDict(demo.weights.to_dict()),
                                quant_params=ml_collections.ConfigDict(demo.quant_params.to_dict()),
                                distance=distance)
    squat.eval_every_epochs = demo.eval_every_epochs
    recipes.set_phases(c, [("teacher", c.phases.teacher), ("calibrate", c.phases.calibrate), ("sqakd", demo),
                           ("squat", squat)])
    return c
