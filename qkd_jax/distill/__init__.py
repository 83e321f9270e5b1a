"""Distillation losses (per example, no reduction) and objectives (weighted sums, batch mean).

    from qkd_jax import distill
    per_example = distill.kl_divergence(student_logits, teacher_logits, temperature=4.0)  # (batch,)
    loss, aux = distill.get_objective("sqakd", alpha=1.0)(student_logits, teacher_logits)

Feature-distillation losses of the paper's comparison (AT, NST, SP, RKD, CC, FitNet, FT,
FSP, VID, PKT, CRD, CKTF) are scalar-valued functions in :mod:`qkd_jax.distill.feature_losses`;
the criteria a train step runs (:func:`get_feature`) are in :mod:`qkd_jax.distill.feature_kd`,
those with trainable parts in their own modules (FitNet 'hint', CC 'correlation', VID 'vid',
CRD 'crd', CKTF 'cktf', FT 'factor', SQuaT 'squat'), imported here so that they register themselves.
`squat(...)` is SQuaT's objective: SQAKD's KL plus the distance between the student's quantized tap
and the teacher's tap quantized with the student's current quantizer (:mod:`qkd_jax.distill.squat_feature`).
"""

from qkd_jax.distill import cc, cktf, crd, factor, feature_losses, fitnet, squat_feature, vid  # noqa: F401  (registers the criteria)
from qkd_jax.distill.losses import cross_entropy, kl_divergence
from qkd_jax.distill.objectives import (
    OBJECTIVES,
    AnyObjective,
    CoStudy,
    Objective,
    Term,
    ce_term,
    co_study,
    get_objective,
    kd,
    kl_term,
    self_study,
    sqakd,
    squat,
    task,
    tutoring,
    weighted_mean,
)

__all__ = [
    "OBJECTIVES",
    "AnyObjective",
    "CoStudy",
    "Objective",
    "Term",
    "ce_term",
    "co_study",
    "cross_entropy",
    "feature_losses",
    "get_objective",
    "kd",
    "kl_divergence",
    "kl_term",
    "self_study",
    "sqakd",
    "squat",
    "task",
    "tutoring",
    "weighted_mean",
]
