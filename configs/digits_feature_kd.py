"""Feature-distillation baselines on the bundled handwritten digits (W2A2, ResNet-20).

The digits demo's teacher and calibration (configs/digits_demo.py), then one student phase per
baseline named in ARG (comma-separated; default: all of them), each from the same calibration
with the released recipe gamma * CE(y, s) + beta * L_feature (gamma 1, alpha 0; the betas of the
released SQAKD CIFAR scripts, qkd_jax.run.recipes.FEATURE_BASELINES) and the demo's student
optimizer (the criterion's auxiliary parameters, if any, train in the weights group).

ARG tokens: at (AT), nst (NST), sp (SP), rkd (RKD), crd (CRD), fitnet (FitNet), cc (CC), vid (VID),
cktf (CKTF, the released 'crdst': beta 1 on the embedding CRD, theta 0.8 on the stem and stage CRDs),
ft (FT: a phase 'ft_paraphraser' training the paraphraser on the teacher, PARAPHRASER_EPOCHS here,
released 30 on CIFAR, then the student phase 'ft' with beta 200; not in the default list),
fsp (FSP: a phase 'fsp_init' training all but the classifier on the FSP losses, FSP_INIT_EPOCHS
here, released 30, the weights with SGD at the student's learning rate, the quantizer parameters
with the student's own optimizer (`fsp_init_phase`: the released init SGD drives them to NaN here),
then the student phase 'fsp' with plain CE; not in the default list).
CRD draws nce_k = 1024 negatives here (released 16384: more than the digits of the other classes),
CKTF too (released 4096); CKTF pools with pool='global' here: the released ResNet AvgPool2d(8)
needs maps of at least 8x8 and the last stage of ResNet-20 on 16x16 digits is 4x4.

    python -m qkd_jax.main --config=configs/digits_feature_kd.py --workdir=/tmp/qkd_digits_fkd
    python -m qkd_jax.main --config=configs/digits_feature_kd.py:at,rkd --workdir=/tmp/qkd_digits_at_rkd
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from qkd_jax.run import recipes

DIGITS_EPOCHS = 12
PARAPHRASER_EPOCHS = 3  # released init_epochs 30 against 1200 student epochs; scaled down on digits
FSP_INIT_EPOCHS = 3  # released init_epochs 30; scaled down on digits
TOKENS = (*recipes.FEATURE_BASELINES, "ft", "fsp")
# Criterion options that differ from the released defaults on digits (1437 training images).
DIGITS_OPTIONS = {"crd": {"nce_k": 1024}, "cktf": {"nce_k": 1024, "pool": "global"}}


def _demo_config() -> ml_collections.ConfigDict:
    path = pathlib.Path(__file__).with_name("digits_demo.py")
    spec = importlib.util.spec_from_file_location("_digits_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def fsp_init_phase(student: ml_collections.ConfigDict, epochs: int = FSP_INIT_EPOCHS) -> ml_collections.ConfigDict:
    """FSP's init phase on digits, from the student phase `student` (its batch size, learning rate,
    weight decay and quantizer optimizer); experiments/feature_kd_digits.py runs this one.

    recipes.fsp_init_phase (the released init: SGD at the student's learning rate, momentum 0.9,
    the student's weight decay, constant) for the weights; one digits deviation: the quantizer
    parameters keep the student's own optimizer (Adam 1e-4, cosine). The released init SGD (lr
    1e-3, momentum 0.9) on them drives the W2A2 interval parameters to NaN within 3 epochs here
    (step ~50 of 66)."""
    init = recipes.fsp_init_phase(epochs=epochs, batch_size=student.batch_size,
                                  learning_rate=student.weights.learning_rate,
                                  weight_decay=student.weights.weight_decay)
    init.quant_params = student.quant_params.copy_and_resolve_references()
    return init


def parse_tokens(arg: str) -> list[str]:
    """The baselines named in ARG ('' = all), in the order given."""
    tokens = [t.strip() for t in arg.split(",") if t.strip()] if arg else list(recipes.FEATURE_BASELINES)
    unknown = [t for t in tokens if t not in TOKENS]
    if unknown or len(set(tokens)) != len(tokens):
        raise ValueError(f"invalid config ARG {arg!r}: name each baseline once, from "
                         f"{sorted(TOKENS)} (comma-separated)")
    return tokens


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = _demo_config()
    demo = c.phases.sqakd
    phases = [("teacher", c.phases.teacher), ("calibrate", c.phases.calibrate)]
    for token in parse_tokens(arg):
        weights = ml_collections.ConfigDict(demo.weights.to_dict())
        quant_params = ml_collections.ConfigDict(demo.quant_params.to_dict())
        if token == "ft":
            phases.append(("ft_paraphraser", recipes.paraphraser_phase(epochs=PARAPHRASER_EPOCHS,
                                                                       batch_size=demo.batch_size)))
            ph = recipes.ft_phase(paraphraser="ft_paraphraser", epochs=DIGITS_EPOCHS, batch_size=demo.batch_size,
                                  weights=weights, quant_params=quant_params)
            ph.eval_every_epochs = demo.eval_every_epochs
            phases.append((token, ph))
            continue
        if token == "fsp":
            phases.append(("fsp_init", fsp_init_phase(demo)))
            ph = recipes.phase("student", objective="task", init_from="fsp_init", epochs=DIGITS_EPOCHS,
                               batch_size=demo.batch_size, weights=weights, quant_params=quant_params)
            ph.eval_every_epochs = demo.eval_every_epochs
            phases.append((token, ph))
            continue
        ph = recipes.feature_phase(token, epochs=DIGITS_EPOCHS, batch_size=demo.batch_size,
                                   weights=ml_collections.ConfigDict(demo.weights.to_dict()),
                                   quant_params=ml_collections.ConfigDict(demo.quant_params.to_dict()),
                                   options=DIGITS_OPTIONS.get(token))
        ph.eval_every_epochs = demo.eval_every_epochs
        phases.append((token, ph))
    recipes.set_phases(c, phases)
    return c
