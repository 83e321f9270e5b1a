"""Stopping a phase whose loss or parameters became NaN or infinite, before anything is saved,
with advice that is true for the phase directory as it is on disk."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

# Above this, parameters have diverged: trained weights, biases and quantizer scales are of
# order 1 (a checkpoint of the digits run at Adam lr 1e6 held |p| ~ 3.6e11).
SANE_PARAM_ABS = 1e4


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@jax.jit
def all_finite(tree) -> jax.Array:
    """1.0 when every element of `tree` is finite, NaN otherwise (the metric the check reads).

    The loss of the step that produced a state comes from before its update, so the
    parameters themselves are checked before a checkpoint is written."""
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
    return jnp.where(ok, 1.0, jnp.nan)


def params_health(params: dict) -> tuple[bool, float]:
    """(every parameter finite, largest finite |parameter|) of a parameter tree (NumPy)."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    finite = all(bool(np.all(np.isfinite(x))) for x in leaves)
    largest = max((float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0)) for x in leaves), default=0.0)
    return finite, largest


def checkpoint_advice(phase: str, directory: epath.Path, steps: list[int]) -> str:
    """What the phase directory holds and what rerunning would do, then the ways out."""
    ways_out = (f"Lower config.phases.{phase}.weights.learning_rate (or set "
                f"config.phases.{phase}.weights.clip_norm) and rerun with --config.retrain_from={phase}, "
                f"which deletes this phase's checkpoints (and later phases') and trains it again; "
                f"the logged losses are in {directory.parent / 'metrics.jsonl'}.")
    if not steps:
        return (f"Nothing of this phase was saved ({directory} holds no checkpoint), so rerunning "
                f"unchanged starts it from scratch and will diverge the same way. {ways_out}")
    from qkd_jax.train.checkpoint import read_arrays

    step = steps[-1]
    try:
        finite, largest = params_health(read_arrays(directory / str(step), ("params",)).get("params", {}))
    except Exception as err:  # noqa: BLE001  (orbax raises many types for a damaged checkpoint)
        return (f"Nothing after step {step} was saved; that checkpoint could not be read "
                f"({type(err).__name__}). {ways_out}")
    if not finite:
        state = "holds non-finite parameters"
    elif largest > SANE_PARAM_ABS:
        state = (f"already diverged: its largest |parameter| is {largest:.3g} (> {SANE_PARAM_ABS:g}), "
                 f"so resuming from it fails again")
    else:
        state = (f"has finite parameters of sane size (largest |parameter| {largest:.3g}); rerunning "
                 f"unchanged resumes there with the same settings and will likely diverge again")
    return f"Nothing after step {step} was saved: that checkpoint ({directory / str(step)}) {state}. {ways_out}"


def check_finite(values: dict, name: str, step: int, advice: Callable[[], str]) -> dict:
    """`values` as floats; raises NonFiniteLossError naming the non-finite ones, followed by
    `advice()` (computed only then: it reads the newest checkpoint)."""
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(f"phase {name!r}: {bad} at step {step}. {advice()}")
    return values
