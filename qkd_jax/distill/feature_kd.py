"""Feature-distillation criteria as objects a train step can run: features in, scalar loss out.

A :class:`FeatureKD` says which of the models' distillation features it reads (the released
``is_feat=True`` lists, :mod:`qkd_jax.models.features`), which auxiliary parts it trains
(``init`` returns their variables: ``params`` trained by their own optimizer group, ``state``
updated by the criterion itself, e.g. CRD's memory banks), and its loss given both feature
lists. It is the ``feature`` of ``distill.kd(gamma, alpha, beta, feature=...)``:

    objective = distill.kd(gamma=1.0, alpha=0.0, beta=1000.0, feature=distill.get_feature("attention"))

The train step (``qkd_jax.train.step``) records the student's and the frozen teacher's features,
calls :meth:`FeatureKD.loss` inside the differentiated function and adds ``beta * loss``.
Criteria without auxiliary parts (AT, NST, SP, RKD, PKT) are defined here; the ones with
parts live in their own modules and register themselves in :data:`FEATURE_METHODS`.
Layer choices follow the released ``get_loss_kd`` (kaiqi123/SQAKD CIFAR/utils_distill.py):
AT and NST on ``feats[1:-1]`` (each stage output), SP on ``feats[-2]`` (the last stage), RKD
and PKT on ``feats[-1]`` (the pre-logit embedding).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp

from qkd_jax.distill import feature_losses as fl

Array = jax.Array
Features = Sequence[Array]
# {"params": trainable pytree, "state": non-trainable pytree}; both may be empty dicts.
AuxVariables = dict[str, Any]


def empty_aux() -> AuxVariables:
    """The auxiliary variables of a criterion that has none."""
    return {"params": {}, "state": {}}


@dataclasses.dataclass(frozen=True)
class FeatureKD:
    """Base class of a feature-distillation criterion (see the module docstring).

    Subclasses set ``name`` and implement :meth:`loss`; those with auxiliary parts also
    implement :meth:`init`. ``preact`` asks the models for pre-activation features;
    ``needs_index`` asks the batch for each example's dataset index (``batch['index']``);
    ``needs_dataset_labels`` asks :func:`init_feature_aux` for the labels of the whole training
    set, passed to :meth:`init` as ``dataset_labels`` (CRD's class-conditional negatives);
    ``needs_blocks`` asks both models for their per-block outputs (``read_block_outputs``),
    passed to :meth:`init` and :meth:`loss` as ``blocks_s`` / ``blocks_t`` (CKTF).
    """

    name: ClassVar[str] = "feature"
    needs_index: ClassVar[bool] = False
    needs_dataset_labels: ClassVar[bool] = False
    needs_blocks: ClassVar[bool] = False
    preact: bool = False

    def init(self, rng: jax.Array, feats_s: Features, feats_t: Features, *, num_examples: int,
             dataset_labels: Optional[Array] = None) -> AuxVariables:
        """The auxiliary variables, sized from one batch's features (none by default).
        ``dataset_labels`` ((num_examples,) ints) is given only when ``needs_dataset_labels``."""
        del rng, feats_s, feats_t, num_examples, dataset_labels
        return empty_aux()

    def loss(
        self,
        params: Any,
        state: Any,
        feats_s: Features,
        feats_t: Features,
        *,
        rng: jax.Array,
        index: Optional[Array] = None,
        axis_name: Optional[str] = None,
    ) -> tuple[Array, Any]:
        """(scalar loss, new auxiliary state). ``feats_t`` come from a frozen teacher."""
        raise NotImplementedError

    def _check_lengths(self, feats_s: Features, feats_t: Features, minimum: int) -> None:
        if len(feats_s) != len(feats_t):
            raise ValueError(
                f"feature criterion {self.name!r}: student and teacher give {len(feats_s)} and "
                f"{len(feats_t)} features; distil between models of the same family (same stage count)."
            )
        if len(feats_s) < minimum:
            raise ValueError(f"feature criterion {self.name!r} needs at least {minimum} features, got {len(feats_s)}.")


def _stages(feats: Features) -> Features:
    """Each stage's output: the released ``feat[1:-1]`` (stem and embedding dropped)."""
    return feats[1:-1]


@dataclasses.dataclass(frozen=True)
class FSP(FeatureKD):
    """FSP (Yim et al.): the sum of :func:`feature_losses.fsp` over ``feats[:-1]`` (stem and
    stages). Released, this loss trains only in FSP's initialisation phase (``utils_distill.init``);
    the main phase is plain CE."""

    name: ClassVar[str] = "fsp"

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        self._check_lengths(feats_s, feats_t, 3)
        return sum(fl.fsp(feats_s[:-1], feats_t[:-1])), state


@dataclasses.dataclass(frozen=True)
class Attention(FeatureKD):
    """AT (Zagoruyko & Komodakis): sum over stage outputs of :func:`feature_losses.attention`."""

    name: ClassVar[str] = "attention"
    p: float = 2.0

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        self._check_lengths(feats_s, feats_t, 3)
        total = sum(fl.attention(s, t, self.p) for s, t in zip(_stages(feats_s), _stages(feats_t)))
        return total, state


@dataclasses.dataclass(frozen=True)
class NST(FeatureKD):
    """NST (Huang & Wang): sum over stage outputs of :func:`feature_losses.nst`."""

    name: ClassVar[str] = "nst"

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        self._check_lengths(feats_s, feats_t, 3)
        return sum(fl.nst(s, t) for s, t in zip(_stages(feats_s), _stages(feats_t))), state


@dataclasses.dataclass(frozen=True)
class Similarity(FeatureKD):
    """SP (Tung & Mori): :func:`feature_losses.similarity` on the last stage output (``feat[-2]``)."""

    name: ClassVar[str] = "similarity"

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        self._check_lengths(feats_s, feats_t, 2)
        return fl.similarity(feats_s[-2], feats_t[-2]), state


@dataclasses.dataclass(frozen=True)
class RKD(FeatureKD):
    """RKD (Park et al.): distance and angle losses on the pre-logit embedding (``feat[-1]``)."""

    name: ClassVar[str] = "rkd"
    w_d: float = 25.0
    w_a: float = 50.0

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        self._check_lengths(feats_s, feats_t, 1)
        return fl.rkd(feats_s[-1], feats_t[-1], self.w_d, self.w_a), state


@dataclasses.dataclass(frozen=True)
class PKT(FeatureKD):
    """PKT (Passalis & Tefas): probability-distribution transfer on the embedding (``feat[-1]``)."""

    name: ClassVar[str] = "pkt"

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        self._check_lengths(feats_s, feats_t, 1)
        return fl.pkt(feats_s[-1], feats_t[-1]), state


#: Feature criteria by the released ``--distill`` name.
FEATURE_METHODS: dict[str, Callable[..., FeatureKD]] = {
    cls.name: cls for cls in (Attention, NST, Similarity, RKD, PKT, FSP)
}


def register_feature(cls: type[FeatureKD]) -> type[FeatureKD]:
    """Class decorator adding a criterion to :data:`FEATURE_METHODS` under its ``name``."""
    if cls.name in FEATURE_METHODS and FEATURE_METHODS[cls.name] is not cls:
        raise ValueError(f"feature criterion {cls.name!r} is already registered")
    FEATURE_METHODS[cls.name] = cls
    return cls


def get_feature(name: str, **kwargs: Any) -> FeatureKD:
    """A criterion by name with its options, e.g. ``get_feature('rkd', w_d=25.0)`` (for configs)."""
    if name not in FEATURE_METHODS:
        raise ValueError(f"unknown feature criterion {name!r}; known: {sorted(FEATURE_METHODS)}.")
    factory = FEATURE_METHODS[name]
    accepted = [p for p in inspect.signature(factory).parameters]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"feature criterion {name!r} got unknown option(s) {unknown}; it accepts {accepted}.")
    return factory(**kwargs)


def init_feature_aux(
    feature: FeatureKD,
    rng: jax.Array,
    *,
    student_apply: Callable,
    student_variables: dict,
    teacher_apply: Callable,
    teacher_variables: dict,
    images: Array,
    num_examples: int,
    dataset_labels: Optional[Any] = None,
) -> AuxVariables:
    """Sizes and initialises ``feature``'s auxiliary variables from one batch (eval-mode forwards).

    ``dataset_labels``: the (num_examples,) labels of the training set in source order, needed
    by criteria with ``needs_dataset_labels`` (CRD) and ignored by the others.
    """
    from qkd_jax.models.features import apply_with_features, read_block_outputs
    from qkd_jax.models.layers import BLOCKS

    extra: dict[str, Any] = {}
    if feature.needs_dataset_labels:
        if dataset_labels is None:
            raise ValueError(
                f"feature criterion {feature.name!r} needs the training set's labels; pass "
                f"dataset_labels=<(num_examples,) labels in source order> to init_feature_aux."
            )
        extra["dataset_labels"] = dataset_labels

    _, feats_s = apply_with_features(_AsModule(student_apply), student_variables, images, preact=feature.preact)
    _, feats_t = apply_with_features(_AsModule(teacher_apply), teacher_variables, images, preact=feature.preact)
    if feature.needs_blocks:
        sides = (("s", student_apply, student_variables), ("t", teacher_apply, teacher_variables))
        for side, apply, variables in sides:
            _, state = apply(variables, images, train=False, mutable=[BLOCKS])
            if BLOCKS not in state:
                model = type(getattr(apply, "__self__", apply)).__name__
                raise ValueError(
                    f"feature criterion {feature.name!r} reads each stage's block outputs, which model {model} "
                    f"does not record; use a CIFAR ResNet (resnet20/32/56) or CIFAR VGG (vgg8/11/13) for "
                    f"{'student' if side == 's' else 'teacher'}, or another criterion.")
            extra[f"blocks_{side}"] = read_block_outputs(state)
    aux = feature.init(rng, feats_s, feats_t, num_examples=num_examples, **extra)
    if set(aux) != {"params", "state"}:
        raise ValueError(f"{type(feature).__name__}.init must return {{'params', 'state'}}, got {sorted(aux)}")
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                        else jnp.asarray(x), aux)


@dataclasses.dataclass(frozen=True)
class _AsModule:
    """Lets an ``apply`` function stand where :func:`apply_with_features` expects a module."""

    apply: Callable
