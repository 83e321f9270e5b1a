"""Each phase of a config resolved once into a plain plan: everything the loop needs, read from
the ConfigDict in one place (objective, optimizer groups, steps, seed, estimator policy)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections
from etils import epath

from qkd_jax.distill import get_objective
from qkd_jax.distill.squat_feature import SQuaT
from qkd_jax.models.registry import squat_tap
from qkd_jax.run.config_schema import build_objective, group_spec, phase_names
from qkd_jax.train.optim import GroupSpec
from qkd_jax.train.paths import as_path


@dataclasses.dataclass(frozen=True)
class HessianPolicy:
    """Refresh every layer's EWGS delta from Hessian traces (quant.estimator='hessian')."""

    every_epochs: int
    batches: int
    batch_size: int
    max_probes: int
    probe: str  # 'per_layer' | 'joint' (quant.hessian_probe)
    objective: Any  # the loss whose Hessian is probed (quant.hessian_loss)


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """One phase, resolved. `total_steps = steps_per_epoch * epochs` (0 for calibrate phases)."""

    name: str
    kind: str  # 'teacher' | 'calibrate' | 'student' | 'paraphraser'
    seed: int
    directory: epath.Path
    from_teacher_checkpoint: bool  # a 'teacher' phase read from config.teacher_checkpoint
    init_from: str
    teacher_from: str
    aux_from: str  # feature='factor': the paraphraser phase
    freeze: tuple[str, ...]  # top-level parameter subtrees with zero updates (train/freeze.py)
    train_teacher: bool
    objective_name: str
    objective: Any  # a distill objective; None for calibrate phases
    batch_size: int
    epochs: int
    steps_per_epoch: int
    eval_every_epochs: int
    weights: GroupSpec
    quant_params: GroupSpec
    quant_decay: bool  # quant_params' weight decay applies (quant.variant 'released'); else forced to 0
    teacher_opt: Optional[GroupSpec]  # train_teacher phases only
    delta: float  # the fixed EWGS delta a calibrate phase writes (0 = STE)
    hessian: Optional[HessianPolicy]  # student phases with the Hessian-updated delta
    log_every_steps: int
    checkpoint_every_steps: int
    keep_checkpoints: int
    # A teacher phase's config.teacher_select: 'best' keeps the best-epoch checkpoint and hands it
    # on (run/teacher_select.py); 'last' for every other phase kind.
    teacher_select: str = "last"

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs if self.kind != "calibrate" else 0

    @property
    def needs_labels(self) -> bool:
        return self.objective is not None and self.objective.needs_labels

    @property
    def needs_index(self) -> bool:
        """The feature criterion reads each example's dataset index (CRD)."""
        feature = getattr(self.objective, "feature", None)
        return feature is not None and feature.needs_index


def phase_seed(config: ml_collections.ConfigDict, name: str) -> int:
    """The phase's seed: the run seed and the phase's position in phase_order."""
    index = phase_names(config).index(name)
    return (int(config.seed) * 1009 + index) % (2**31)


def with_model_tap(objective: Any, model: str) -> Any:
    """``objective`` with its SQuaT criterion's empty tap replaced by ``model``'s declared one
    (``models.registry.squat_tap``); any other objective unchanged."""
    feature = getattr(objective, "feature", None)
    if not isinstance(feature, SQuaT) or feature.tap:
        return objective
    return dataclasses.replace(objective, feature=dataclasses.replace(feature, tap=squat_tap(model)))


def make_plan(config: ml_collections.ConfigDict, workdir: epath.Path, name: str,
              steps_per_epoch: int) -> PhasePlan:
    """Resolves phase `name` (`steps_per_epoch` from the opened training split)."""
    ph, q = config.phases[name], config.quant
    from_checkpoint = ph.kind == "teacher" and bool(config.teacher_checkpoint)
    hessian = None
    if ph.kind == "student" and q.estimator == "hessian":
        # 'ce': plain cross-entropy with labels, no smoothing (the released code's nn.CrossEntropyLoss()).
        loss = get_objective("task") if q.hessian_loss == "ce" else build_objective(ph)
        hessian = HessianPolicy(q.hessian_every_epochs, q.hessian_batches, q.hessian_batch_size,
                                q.hessian_max_probes, q.hessian_probe, loss)
    return PhasePlan(
        name=name,
        kind=ph.kind,
        seed=phase_seed(config, name),
        directory=as_path(config.teacher_checkpoint) if from_checkpoint else as_path(workdir) / name,
        from_teacher_checkpoint=from_checkpoint,
        init_from=ph.init_from,
        teacher_from=ph.teacher_from,
        aux_from=ph.aux_from,
        freeze=tuple(n.strip() for n in ph.freeze.split(",") if n.strip()),
        train_teacher=bool(ph.train_teacher),
        objective_name=ph.objective,
        objective=None if ph.kind == "calibrate" else with_model_tap(build_objective(ph), config.model.name),
        batch_size=ph.batch_size,
        epochs=ph.epochs,
        steps_per_epoch=steps_per_epoch,
        eval_every_epochs=ph.eval_every_epochs,
        weights=group_spec(ph.weights),
        quant_params=group_spec(ph.quant_params),
        quant_decay=q.variant == "released",
        teacher_opt=group_spec(ph.teacher_opt) if ph.train_teacher else None,
        delta=float(q.delta) if q.estimator == "ewgs" else 0.0,
        hessian=hessian,
        log_every_steps=config.log_every_steps,
        checkpoint_every_steps=config.checkpoint_every_steps,
        keep_checkpoints=config.keep_checkpoints,
        teacher_select=config.teacher_select if ph.kind == "teacher" else "last",
    )
