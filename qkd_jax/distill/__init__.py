"""Distillation losses (per example, no reduction) and objectives (weighted sums, batch mean).

    from qkd_jax import distill
    per_example = distill.kl_divergence(student_logits, teacher_logits, temperature=4.0)  # (batch,)
    loss, aux = distill.get_objective("sqakd", alpha=1.0)(student_logits, teacher_logits)
"""

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
    "get_objective",
    "kd",
    "kl_divergence",
    "kl_term",
    "self_study",
    "sqakd",
    "task",
    "tutoring",
    "weighted_mean",
]
