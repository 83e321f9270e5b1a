"""The train state: one pytree with the student, its optimizer, the step, an RNG key and the teacher.

The teacher is either frozen (variables only: never differentiated, no optimizer state, left out
of student checkpoints) or trainable (QKD co-studying: its own optimizer state and batch
statistics). Apply functions and optimizers are static fields, so the state can be donated and
passed through `jit`/`shard_map`/`pmap` as a plain pytree.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

Variables = Mapping[str, Any]

# Collections that the step carries for a model: trainable params, BatchNorm statistics, and the
# non-trainable EWGS deltas of quantized layers. 'perturbations' (gradient probes) is never kept.
KEPT_COLLECTIONS = ("params", "batch_stats", "quant_delta")


@flax.struct.dataclass
class TeacherState:
    """The teacher network: frozen (opt_state None) or trained online (QKD co-studying)."""

    params: Any
    batch_stats: Any
    opt_state: Any = None
    apply_fn: Callable = flax.struct.field(pytree_node=False, default=None)
    tx: Optional[optax.GradientTransformation] = flax.struct.field(pytree_node=False, default=None)

    @property
    def trainable(self) -> bool:
        return self.tx is not None

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class AuxState:
    """Auxiliary parts of a feature-distillation criterion (qkd_jax.distill.feature_kd):
    `params` trained by their own optimizer `tx`, `state` updated by the criterion (e.g. CRD's
    memory banks, moved with momentum, never by the optimizer)."""

    params: Any
    state: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class TrainState:
    """Student state plus the (optional) teacher. `step` counts optimizer updates."""

    step: jax.Array
    params: Any
    batch_stats: Any
    quant_delta: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (jax.random.key_data), so checkpoints store plain arrays
    teacher: Optional[TeacherState] = None
    aux: Optional[AuxState] = None
    apply_fn: Callable = flax.struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

    def variables(self) -> dict:
        """The student's variables as flax `apply` expects them."""
        out = {"params": self.params, "batch_stats": self.batch_stats}
        if self.quant_delta:
            out["quant_delta"] = self.quant_delta
        return out


def _collection(variables: Variables, name: str) -> dict:
    value = variables.get(name, {})
    return flax.core.unfreeze(value) if isinstance(value, flax.core.FrozenDict) else dict(value)


def create_train_state(
    *,
    apply_fn: Callable,
    variables: Variables,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    teacher_apply_fn: Optional[Callable] = None,
    teacher_variables: Optional[Variables] = None,
    teacher_tx: Optional[optax.GradientTransformation] = None,
    aux_variables: Optional[Variables] = None,
    aux_tx: Optional[optax.GradientTransformation] = None,
) -> TrainState:
    """Builds a TrainState from flax variables.

    Args:
      apply_fn: the student's `model.apply`.
      variables: the student's variables (e.g. from `model.init` or a teacher copy);
        collections other than params/batch_stats/quant_delta are dropped.
      tx: the student's optimizer.
      rng: base key (typed or raw); the step folds in the step number (and the replica index).
      teacher_apply_fn, teacher_variables: the teacher, if the objective needs one.
      teacher_tx: give it to train the teacher online (QKD co-studying); None freezes it.
      aux_variables, aux_tx: a feature criterion's auxiliary `{'params', 'state'}` and the
        optimizer of its params (`qkd_jax.distill.feature_kd.init_feature_aux`).
    """
    unknown = set(variables) - set(KEPT_COLLECTIONS) - {"perturbations", "intermediates"}
    if unknown:
        raise ValueError(
            f"student variables hold collections {sorted(unknown)} that the train step does not "
            f"carry; expected only {KEPT_COLLECTIONS}."
        )
    params = _collection(variables, "params")
    teacher = None
    if teacher_variables is not None:
        if teacher_apply_fn is None:
            raise ValueError("teacher_variables given without teacher_apply_fn")
        t_params = _collection(teacher_variables, "params")
        teacher = TeacherState(
            params=t_params,
            batch_stats=_collection(teacher_variables, "batch_stats"),
            opt_state=teacher_tx.init(t_params) if teacher_tx is not None else None,
            apply_fn=teacher_apply_fn,
            tx=teacher_tx,
        )
    elif teacher_tx is not None:
        raise ValueError("teacher_tx given without teacher variables")
    aux = None
    if aux_variables is not None:
        if aux_tx is None:
            raise ValueError("aux_variables given without aux_tx (the optimizer of their params)")
        aux_params = _collection(aux_variables, "params")
        aux = AuxState(params=aux_params, state=_collection(aux_variables, "state"),
                       opt_state=aux_tx.init(aux_params), tx=aux_tx)
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        params=params,
        batch_stats=_collection(variables, "batch_stats"),
        quant_delta=_collection(variables, "quant_delta"),
        opt_state=tx.init(params),
        rng=jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
        teacher=teacher,
        aux=aux,
        apply_fn=apply_fn,
        tx=tx,
    )
