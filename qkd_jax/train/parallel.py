"""Compiling the per-replica steps over all devices: `jax.jit` + `jax.shard_map` on a 1-D mesh.

This is the pmap programming model (named axis, `lax.pmean`) compiled the way current JAX
implements pmap itself. The state is replicated (`P()`), the batch is split along its leading
axis (`P('data')`). Multi-host: every process builds the same mesh over all global devices and
feeds its local slice of the global batch with `shard_batch`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree on every device of the mesh (fully replicated)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Builds global arrays split along the leading axis from this process's part of the batch.

    On one host `local_batch` is the whole global batch. Its leading size must divide evenly
    over this process's devices.
    """
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n_local:
            raise ValueError(
                f"per-process batch of {x.shape[0]} does not split over {n_local} local devices; "
                f"choose a batch size divisible by the device count."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)


def compile_train_step(
    step_fn: Callable, mesh: Mesh, *, donate: bool = True
) -> Callable[[Any, Any], tuple[Any, Any]]:
    """jit(shard_map(step_fn)): state replicated, batch split over the mesh axis, state donated.

    `step_fn(state, batch, axis_name=...)` is a per-replica step such as `train_step` with its
    objective bound (functools.partial).
    """
    axis = mesh.axis_names[0]
    sharded = jax.shard_map(
        functools.partial(step_fn, axis_name=axis),
        mesh=mesh,
        in_specs=(P(), P(axis)),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def compile_eval_step(eval_fn: Callable, mesh: Mesh) -> Callable[[Any, Any], Any]:
    """jit(shard_map(eval_fn)) for `eval_fn(variables, batch, axis_name=...) -> summed metrics`."""
    axis = mesh.axis_names[0]
    sharded = jax.shard_map(
        functools.partial(eval_fn, axis_name=axis),
        mesh=mesh,
        in_specs=(P(), P(axis)),
        out_specs=P(),
        check_vma=False,
    )
    return jax.jit(sharded)
