"""Optimizers for two parameter groups: model weights and quantizer parameters (optax).

A param leaf is in the `quant` group when a component of its path is exactly `'quant'` (the
quantized layers keep their learnable quantizer params in a `quant` sub-dict); every other leaf
(kernels, conv biases, BN scale/bias, ...) is in the `weights` group.

    tx = build_optimizer(GroupSpec(optimizer="adam", learning_rate=1e-3, weight_decay=1e-4,
                                   schedule="cosine_epoch"),
                         GroupSpec(optimizer="adam", learning_rate=1e-5, schedule="cosine_epoch"),
                         steps_per_epoch=196, total_steps=196 * 1200)

Per group, the update of a parameter p with gradient g at step s (rate lr_s from the schedule) is
the torch one:
- clip (optional): `g <- g * min(1, clip_norm / ||g_group||)` (global norm over the group only);
- coupled decay (torch `weight_decay`, default for sgd/adam): `g <- g + wd * p`;
- sgd:  `buf = mu * buf + g`; `p -= lr_s * buf` (nesterov: `p -= lr_s * (g + mu * buf)`), dampening 0;
- adam: `p -= lr_s * m_hat / (sqrt(v_hat) + eps)`;
- decoupled decay (adamw, or `decay='decoupled'`): `p -= lr_s * wd * p` after the direction.
Quantizer params get no weight decay, whatever their spec says (docs/method.md section 10), unless
`build_optimizer(..., quant_decay=True)` (the released SQAKD Tiny-ImageNet setting, which decays
every parameter alike; section 9).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from typing import Any, Mapping, Optional

import jax
import optax

from qkd_jax.train.schedules import SCHEDULES, make_schedule

WEIGHTS = "weights"
QUANT = "quant"
OPTIMIZERS = ("sgd", "adam", "adamw")
DECAYS = ("coupled", "decoupled")


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"GroupSpec.{field}={value!r} is invalid: {why}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupSpec:
    """Optimizer, schedule and decay of one parameter group (validated on construction).

    `decay=None` means the optimizer's own convention: coupled L2 for sgd/adam, decoupled for adamw.
    `warmup_steps`/`warmup_init_lr` are read by 'warmup_cosine'; `decay_epochs`/`decay_factor` by 'step'.
    """

    optimizer: str
    learning_rate: float
    schedule: str = "constant"
    momentum: float = 0.0
    nesterov: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay: Optional[str] = None
    warmup_steps: int = 0
    warmup_init_lr: float = 0.0
    decay_epochs: tuple[int, ...] = ()
    decay_factor: float = 0.1
    clip_norm: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "decay_epochs", tuple(self.decay_epochs))
        if self.optimizer not in OPTIMIZERS:
            _fail("optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        if not _is_number(self.learning_rate) or self.learning_rate < 0:
            _fail("learning_rate", self.learning_rate, "must be a finite number >= 0")
        if self.schedule not in SCHEDULES:
            _fail("schedule", self.schedule, f"must be one of {SCHEDULES}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            _fail("momentum", self.momentum, "must lie in [0, 1)")
        if self.momentum and self.optimizer != "sgd":
            _fail("momentum", self.momentum, f"only sgd uses momentum ({self.optimizer} uses b1)")
        if not isinstance(self.nesterov, bool):
            _fail("nesterov", self.nesterov, "must be a bool")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            _fail("nesterov", self.nesterov, "needs optimizer='sgd' and momentum > 0 (as torch)")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < 1:
                _fail(name, value, "must lie in [0, 1)")
        if not _is_number(self.eps) or self.eps < 0:
            _fail("eps", self.eps, "must be a finite number >= 0")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            _fail("weight_decay", self.weight_decay, "must be a finite number >= 0")
        if self.decay is not None and self.decay not in DECAYS:
            _fail("decay", self.decay, f"must be None or one of {DECAYS}")
        if self.optimizer == "adamw" and self.decay == "coupled":
            _fail("decay", self.decay, "adamw is decoupled by definition; use optimizer='adam' for coupled L2")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            _fail("warmup_steps", self.warmup_steps, "must be an int >= 0")
        if not _is_number(self.warmup_init_lr) or self.warmup_init_lr < 0:
            _fail("warmup_init_lr", self.warmup_init_lr, "must be a finite number >= 0")
        if any(not _is_int(e) or e < 1 for e in self.decay_epochs):
            _fail("decay_epochs", self.decay_epochs, "must be ints >= 1")
        if list(self.decay_epochs) != sorted(set(self.decay_epochs)):
            _fail("decay_epochs", self.decay_epochs, "must be strictly increasing")
        if not _is_number(self.decay_factor) or self.decay_factor <= 0:
            _fail("decay_factor", self.decay_factor, "must be a finite number > 0")
        if self.clip_norm is not None and (not _is_number(self.clip_norm) or self.clip_norm <= 0):
            _fail("clip_norm", self.clip_norm, "must be None or a finite number > 0")

    @property
    def decay_mode(self) -> str:
        """'coupled' (L2 added to the gradient) or 'decoupled' (AdamW-style)."""
        if self.decay is not None:
            return self.decay
        return "decoupled" if self.optimizer == "adamw" else "coupled"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "GroupSpec":
        """Builds a spec from a config dict; unknown keys raise ValueError naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GroupSpec key(s) {unknown}; known: {sorted(known)}.")
        return cls(**dict(values))


def _path_has_quant(path: tuple) -> bool:
    for key in path:
        name = getattr(key, "key", getattr(key, "name", None))
        if name == QUANT:
            return True
    return False


def param_labels(params: Any) -> Any:
    """A tree like `params` with 'quant' on leaves under a path component 'quant', 'weights' elsewhere."""
    return jax.tree_util.tree_map_with_path(lambda path, _: QUANT if _path_has_quant(path) else WEIGHTS, params)


def _check_steps(steps_per_epoch: int, total_steps: int) -> None:
    for name, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}.")


def _effective_quant_spec(quant: GroupSpec, quant_decay: bool = False) -> GroupSpec:
    """The quant spec with weight_decay forced to 0 (warns when the config asked for decay),
    unchanged when `quant_decay`."""
    if quant.weight_decay and not quant_decay:
        warnings.warn(
            f"quantizer parameters get no weight decay; ignoring quant weight_decay={quant.weight_decay}.",
            UserWarning,
            stacklevel=3,
        )
        quant = dataclasses.replace(quant, weight_decay=0.0)
    return quant


def group_schedule(spec: GroupSpec, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule of one group, a function of the number of updates done."""
    _check_steps(steps_per_epoch, total_steps)
    return make_schedule(
        spec.schedule,
        spec.learning_rate,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=spec.warmup_steps,
        warmup_init_lr=spec.warmup_init_lr,
        decay_epochs=spec.decay_epochs,
        decay_factor=spec.decay_factor,
    )


def group_transform(
    spec: GroupSpec, *, steps_per_epoch: int, total_steps: int
) -> optax.GradientTransformation:
    """clip -> coupled decay -> sgd momentum | adam -> decoupled decay -> -lr_s (one group)."""
    parts: list[optax.GradientTransformation] = []
    if spec.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(spec.clip_norm))
    coupled = spec.weight_decay > 0 and spec.decay_mode == "coupled"
    decoupled = spec.weight_decay > 0 and spec.decay_mode == "decoupled"
    if coupled:
        parts.append(optax.add_decayed_weights(spec.weight_decay))
    if spec.optimizer == "sgd":
        if spec.momentum > 0:
            parts.append(optax.trace(decay=spec.momentum, nesterov=spec.nesterov))
    else:
        parts.append(optax.scale_by_adam(b1=spec.b1, b2=spec.b2, eps=spec.eps))
    if decoupled:
        parts.append(optax.add_decayed_weights(spec.weight_decay))
    schedule = group_schedule(spec, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def build_optimizer(
    weights: GroupSpec, quant: GroupSpec, *, steps_per_epoch: int, total_steps: int, quant_decay: bool = False
) -> optax.GradientTransformation:
    """`optax.multi_transform` of the two groups, labelled by `param_labels`.

    `quant_decay`: apply the quant spec's weight decay (default: forced to 0, with a warning).

    Schedules count the optimizer's own updates (step 0 = the first update), so the train state's
    step and the schedules agree when the optimizer is created at the start of a phase.
    """
    _check_steps(steps_per_epoch, total_steps)
    quant = _effective_quant_spec(quant, quant_decay)
    kw = dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    return optax.multi_transform(
        {WEIGHTS: group_transform(weights, **kw), QUANT: group_transform(quant, **kw)}, param_labels
    )


def current_learning_rates(
    weights: GroupSpec, quant: GroupSpec, step: Any, *, steps_per_epoch: int, total_steps: int
) -> dict[str, jax.Array]:
    """`{'lr/weights': ..., 'lr/quant': ...}`: the rates update number `step` (0-based) uses.

    Scalars that work under jit (e.g. as step metrics); `float()` them for printing.
    """
    return {
        f"lr/{name}": group_schedule(spec, steps_per_epoch=steps_per_epoch, total_steps=total_steps)(step)
        for name, spec in ((WEIGHTS, weights), (QUANT, quant))
    }
