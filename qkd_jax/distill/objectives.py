"""Objectives: weighted sums of per-example losses, reduced by the batch mean.

    objective = distill.sqakd(alpha=1.0, temperature=4.0)
    loss, aux = objective(student_logits, teacher_logits)          # labels never read
    loss, aux = distill.kd(gamma=1.0, alpha=1.0)(s, t, labels)     # gamma*CE + alpha*KL

`loss = sum_i w_i * mean_batch(term_i)`; `aux` holds each term's unweighted batch mean under
its name plus `'loss'`. `needs_labels` / `needs_teacher` tell a train step what it may skip.
An optional per-example `mask` (weights, e.g. 0 for padding) turns the mean into
`sum(m * l) / sum(m)` (0 when `sum(m) == 0`).

In every distillation term the reference distribution (the second argument of KL) is wrapped in
`stop_gradient`, so a frozen teacher never receives gradients even if the caller differentiates
w.r.t. it. `co_study` relies on this: `CoStudy(...)` returns `L_S + L_T`, and the gradient of that
sum w.r.t. the student's logits is the gradient of `L_S` alone, w.r.t. the teacher's logits that
of `L_T` alone.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from qkd_jax.distill.feature_kd import FeatureKD, get_feature
from qkd_jax.distill.losses import _check_static_range, cross_entropy, kl_divergence

Array = jax.Array
Aux = dict[str, Array]
# A term's function: (student_logits, teacher_logits | None, labels | None) -> per-example values.
TermFn = Callable[[Array, Optional[Array], Optional[Array]], Array]


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted summand: `weight * mean_batch(fn(student_logits, teacher_logits, labels))`."""

    name: str
    weight: float
    fn: TermFn
    needs_labels: bool = False
    needs_teacher: bool = False

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name == "loss":
            raise ValueError(f"Term name must be non-empty, without '/', and not 'loss'; got {self.name!r}.")
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"Term {self.name!r}: weight must be finite, got {self.weight!r}.")


def weighted_mean(values: Array, mask: Optional[Array] = None) -> Array:
    """`mean(values)`, or `sum(mask * values) / sum(mask)` (0 if `sum(mask) == 0`) with a mask."""
    if mask is None:
        return jnp.mean(values)
    mask = jnp.asarray(mask, values.dtype)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} must equal the per-example shape {values.shape}.")
    den = jnp.sum(mask)
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, jnp.sum(mask * values) / safe, 0.0)


def _kl_fn(student: Array, teacher: Optional[Array], labels: Optional[Array], *, temperature: float) -> Array:
    del labels  # never read
    return kl_divergence(student, jax.lax.stop_gradient(teacher), temperature)


def _ce_fn(student: Array, teacher: Optional[Array], labels: Optional[Array], *, label_smoothing: float) -> Array:
    del teacher
    return cross_entropy(student, labels, label_smoothing)


def kl_term(weight: float = 1.0, temperature: float = 4.0, name: str = "kl") -> Term:
    """`weight * T^2 KL(softmax(t/T) || softmax(s/T))` with the teacher's logits stop-gradient'ed."""
    _check_static_range(temperature, "temperature", 0.0, math.inf, low_open=True, high_open=True)
    return Term(name, float(weight), functools.partial(_kl_fn, temperature=temperature), needs_teacher=True)


def ce_term(weight: float = 1.0, label_smoothing: float = 0.0, name: str = "ce") -> Term:
    """`weight * CE(labels, student_logits)` with optional label smoothing."""
    _check_static_range(label_smoothing, "label_smoothing", 0.0, 1.0, low_open=False, high_open=False)
    return Term(name, float(weight), functools.partial(_ce_fn, label_smoothing=label_smoothing), needs_labels=True)


def _check_inputs(
    student: Array,
    teacher: Optional[Array],
    labels: Optional[Array],
    *,
    needs_teacher: bool,
    needs_labels: bool,
    name: str,
) -> None:
    if needs_teacher:
        if teacher is None:
            raise ValueError(f"objective {name!r} needs teacher_logits (it has a distillation term); got None.")
        if jnp.shape(teacher) != jnp.shape(student):
            raise ValueError(
                f"objective {name!r}: teacher_logits {jnp.shape(teacher)} and student_logits "
                f"{jnp.shape(student)} differ in shape."
            )
    if needs_labels and labels is None:
        raise ValueError(f"objective {name!r} needs labels (it has a cross-entropy term); got labels=None.")


@dataclasses.dataclass(frozen=True)
class Objective:
    """A weighted sum of `Term`s; call it as `objective(student_logits, teacher_logits, labels, mask=...)`.

    With a `feature` criterion (`qkd_jax.distill.feature_kd`) the train step also records both
    networks' features and adds `beta * feature.loss(...)` (reported under the criterion's
    name); calling the objective itself computes the logit terms only.
    """

    terms: tuple[Term, ...]
    name: str = "objective"
    feature: Optional[FeatureKD] = None
    beta: float = 0.0
    trains_teacher: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms and self.feature is None:
            raise ValueError(f"objective {self.name!r} has no terms (all weights zero?).")
        names = [t.name for t in self.terms]
        if self.feature is not None:
            if not math.isfinite(float(self.beta)) or self.beta == 0:
                raise ValueError(f"objective {self.name!r}: a feature criterion needs a finite beta != 0, got {self.beta!r}.")
            names.append(self.feature.name)
        elif self.beta != 0:
            raise ValueError(
                f"objective {self.name!r}: beta={self.beta!r} weighs a feature loss but no feature criterion "
                f"was given; pass feature=... (see qkd_jax.distill.feature_kd.FEATURE_METHODS)."
            )
        if len(set(names)) != len(names) or "loss" in names:
            raise ValueError(f"objective {self.name!r}: term names must be unique and not 'loss', got {names}.")

    @property
    def needs_labels(self) -> bool:
        return any(t.needs_labels for t in self.terms)

    @property
    def needs_teacher(self) -> bool:
        return self.feature is not None or any(t.needs_teacher for t in self.terms)

    def __call__(
        self,
        student_logits: Array,
        teacher_logits: Optional[Array] = None,
        labels: Optional[Array] = None,
        *,
        mask: Optional[Array] = None,
    ) -> tuple[Array, Aux]:
        """Returns `(sum_i w_i * mean(term_i), {term name: mean(term_i), 'loss': total})`."""
        _check_inputs(
            student_logits, teacher_logits, labels,
            needs_teacher=self.needs_teacher, needs_labels=self.needs_labels, name=self.name,
        )
        aux: Aux = {}
        total = jnp.zeros((), jnp.float32)
        for term in self.terms:
            value = weighted_mean(term.fn(student_logits, teacher_logits, labels), mask)
            aux[term.name] = value
            total = total + term.weight * value
        aux["loss"] = total
        return total, aux


@dataclasses.dataclass(frozen=True)
class CoStudy:
    """QKD co-studying: `L_S + L_T` with `L_S = student(s, sg(t), y)` and `L_T = teacher(t, sg(s), y)`.

    Differentiate the returned total w.r.t. (student params, teacher params) jointly: thanks to the
    stop-gradients each network receives only its own loss's gradient. `aux` keys:
    `student/<term>`, `student/loss`, `teacher/<term>`, `teacher/loss`, `loss`.
    """

    student: Objective
    teacher: Objective
    name: str = "co_study"
    trains_teacher: bool = dataclasses.field(default=True, init=False)

    @property
    def needs_labels(self) -> bool:
        return self.student.needs_labels or self.teacher.needs_labels

    @property
    def needs_teacher(self) -> bool:
        return True

    def __call__(
        self,
        student_logits: Array,
        teacher_logits: Optional[Array] = None,
        labels: Optional[Array] = None,
        *,
        mask: Optional[Array] = None,
    ) -> tuple[Array, Aux]:
        """Returns `(L_S + L_T, aux)`; see the class docstring."""
        _check_inputs(
            student_logits, teacher_logits, labels,
            needs_teacher=True, needs_labels=self.needs_labels, name=self.name,
        )
        loss_s, aux_s = self.student(student_logits, teacher_logits, labels, mask=mask)
        loss_t, aux_t = self.teacher(teacher_logits, student_logits, labels, mask=mask)
        aux = {f"student/{k}": v for k, v in aux_s.items()}
        aux.update({f"teacher/{k}": v for k, v in aux_t.items()})
        aux["loss"] = loss_s + loss_t
        return aux["loss"], aux


AnyObjective = Union[Objective, CoStudy]


# ---------------------------------------------------------------------------------------------
# Presets (the methods of docs/method.md section 7).


def sqakd(alpha: float = 1.0, temperature: float = 4.0) -> Objective:
    """SQAKD: `alpha * KL_T(s, sg(t))`. No cross-entropy: labels are never read."""
    return Objective((kl_term(alpha, temperature),), name="sqakd")


def task(label_smoothing: float = 0.0) -> Objective:
    """Plain QAT / FP training: `CE(y, s)` (Tiny-ImageNet recipe: label_smoothing=0.1)."""
    return Objective((ce_term(1.0, label_smoothing),), name="task")


def kd(
    gamma: float = 1.0,
    alpha: float = 1.0,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
    beta: float = 0.0,
    feature: Union[FeatureKD, str, None] = None,
) -> Objective:
    """`gamma * CE(y, s) + alpha * KL_T(s, sg(t)) + beta * L_feature`, the released
    `--kd_gamma/--kd_alpha/--kd_beta` loss; `feature` is a criterion or its name
    (`get_feature`). Zero-weight terms are dropped (so e.g. alpha=0 and beta=0 give
    `needs_teacher=False`); with gamma=0 labels are never read."""
    if isinstance(feature, str):
        feature = get_feature(feature)
    if beta == 0:
        feature = None
    terms = [ce_term(gamma, label_smoothing), kl_term(alpha, temperature)]
    return Objective(tuple(t for t in terms if t.weight != 0), name="kd", feature=feature, beta=float(beta))


def squat(
    alpha: float = 1.0,
    temperature: float = 4.0,
    beta: float = 1.0,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    feature: Union[FeatureKD, str, None] = None,
) -> Objective:
    """SQuaT: `gamma * CE(y, s) + alpha * KL_T(s, sg(t)) + beta * distance(q_s, sg(q_t))`, the
    distance between the student's quantized tap and the teacher's tap quantized with the
    student's current quantizer (qkd_jax.distill.squat_feature). Released recipe: alpha 1, T 4, beta 1,
    'mse'; gamma 0 (label-free, the default) or 1 (the CIFAR script's CE term). `feature` is a
    `SQuaT` criterion or 'squat' (default: the model's declared tap, 'mse')."""
    from qkd_jax.distill.squat_feature import SQuaT

    if feature is None or isinstance(feature, str):
        feature = get_feature(feature or "squat")
    if not isinstance(feature, SQuaT):
        raise ValueError(f"objective 'squat' takes the 'squat' feature criterion, got {feature.name!r}; "
                         f"use objective='kd' for other criteria.")
    terms = [ce_term(gamma, label_smoothing), kl_term(alpha, temperature)]
    return Objective(tuple(t for t in terms if t.weight != 0), name="squat", feature=feature, beta=float(beta))


def self_study(label_smoothing: float = 0.0) -> Objective:
    """QKD self-studying phase: the quantized student alone, `CE(y, s)`."""
    return Objective((ce_term(1.0, label_smoothing),), name="self_study")


def tutoring(temperature: float = 2.0, label_smoothing: float = 0.0) -> Objective:
    """QKD tutoring phase: `CE(y, s) + KL_T(s, sg(t))` with a frozen teacher."""
    return Objective((ce_term(1.0, label_smoothing), kl_term(1.0, temperature)), name="tutoring")


def co_study(temperature: float = 2.0, label_smoothing: float = 0.0) -> CoStudy:
    """QKD co-studying phase: `L_S = CE(y,s) + KL_T(s, sg(t))`, `L_T = CE(y,t) + KL_T(t, sg(s))`."""
    side = (ce_term(1.0, label_smoothing), kl_term(1.0, temperature))
    return CoStudy(Objective(side, name="co_study/student"), Objective(side, name="co_study/teacher"))


OBJECTIVES: dict[str, Callable[..., AnyObjective]] = {
    "sqakd": sqakd,
    "task": task,
    "kd": kd,
    "squat": squat,
    "self_study": self_study,
    "tutoring": tutoring,
    "co_study": co_study,
}


def get_objective(name: str, **kwargs: float) -> AnyObjective:
    """Builds a preset by name, e.g. `get_objective('sqakd', alpha=100.0)` (for config files)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}.")
    factory = OBJECTIVES[name]
    accepted = list(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"objective {name!r} got unknown argument(s) {unknown}; it accepts {accepted}.")
    return factory(**kwargs)
