"""One process of the two-process CPU run in `test_multihost.py`.

    QKD_COORDINATOR=127.0.0.1:PORT QKD_NUM_PROCESSES=2 QKD_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \
    python -m tests.train.multihost_worker OUT.npz

Joins the run with `distributed.initialize_distributed()` (reading the QKD_* env vars), builds
the toy state, feeds its half of the shared global batch through `parallel.shard_batch`, runs
the compiled step `NUM_STEPS` times and saves the (replicated) params, optimizer state and
per-step metrics to OUT.npz. The test imports `make_state`/`global_batch` from here to compute
the single-process reference, so JAX is imported inside the functions: the env above has to be
in place before this process first imports it.
"""

from __future__ import annotations

import os
import sys

NUM_STEPS = 3
GLOBAL_BATCH = 16
IN_DIM = 6


def make_state(axis_name):
    """The toy student (quantized, no BatchNorm) and frozen teacher, trained with plain SGD."""
    import jax

    from qkd_jax.train.optim import GroupSpec, build_optimizer
    from qkd_jax.train.state import create_train_state
    from tests.train.toy_models import ToyQuantMLP, init_toy

    # SGD keeps the comparison linear in the gradients (no sign() of near-zero gradients).
    tx = build_optimizer(GroupSpec(optimizer="sgd", learning_rate=0.1, momentum=0.9),
                         GroupSpec(optimizer="sgd", learning_rate=0.01),
                         steps_per_epoch=1, total_steps=NUM_STEPS)
    student = ToyQuantMLP(axis_name=axis_name)
    teacher = ToyQuantMLP(quantized=False, axis_name=axis_name)

    def build():
        return create_train_state(
            apply_fn=student.apply,
            variables=init_toy(student, batch=GLOBAL_BATCH, in_dim=IN_DIM),
            tx=tx,
            rng=jax.random.key(1),
            teacher_apply_fn=teacher.apply,
            teacher_variables=init_toy(teacher, key=jax.random.key(7), batch=GLOBAL_BATCH, in_dim=IN_DIM),
        )

    # One compiled init instead of dozens of op-by-op compilations (seconds on a 2-core machine).
    # astype() makes the toy's weak-typed scalar quantizer params strong, as the step returns
    # them, so the second step call does not retrace.
    return jax.tree.map(lambda x: x.astype(x.dtype), jax.jit(build)())


def global_batch(step: int):
    """The global batch of step `step` as numpy arrays (identical in every process)."""
    import numpy as np

    rng = np.random.default_rng(100 + step)
    return {
        "image": (rng.normal(size=(GLOBAL_BATCH, IN_DIM)) * 2).astype(np.float32),
        "label": rng.integers(0, 4, GLOBAL_BATCH).astype(np.int32),
    }


def objective():
    from qkd_jax import distill

    return distill.kd(gamma=1.0, alpha=1.0)


def flat_arrays(tree, prefix: str) -> dict:
    """{prefix + keystr(path): numpy array} for every leaf (works on fully replicated global arrays)."""
    import jax
    import numpy as np

    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(out_path: str) -> None:
    import functools

    import jax
    import numpy as np

    from qkd_jax.train import distributed, parallel
    from qkd_jax.train.step import train_step

    distributed.initialize_distributed()
    distributed.initialize_distributed()  # idempotent
    pid, count = jax.process_index(), jax.process_count()
    assert count == 2 and jax.local_device_count() == 2 and jax.device_count() == 4, (
        count, jax.local_device_count(), jax.device_count())
    assert distributed.is_primary() == (pid == 0)
    local_b = distributed.process_batch_size(GLOBAL_BATCH)

    mesh = parallel.make_mesh()
    step = parallel.compile_train_step(functools.partial(train_step, objective=objective()), mesh)
    state = parallel.replicate(make_state("data"), mesh)
    out = {}
    for i in range(NUM_STEPS):
        batch = global_batch(i)
        local = jax.tree.map(lambda a: a[pid * local_b:(pid + 1) * local_b], batch)
        sharded = parallel.shard_batch(local, mesh)
        assert sharded["image"].shape == (GLOBAL_BATCH, IN_DIM)
        state, metrics = step(state, sharded)
        out.update(flat_arrays(metrics, f"metrics/{i}/"))
    out.update(flat_arrays(state.params, "params/"))
    out.update(flat_arrays(state.opt_state, "opt_state/"))
    out["step"] = np.asarray(state.step)
    out["process"] = np.asarray([pid, count, jax.device_count()])
    np.savez(out_path, **out)
    print(f"process {pid}/{count}: wrote {len(out)} arrays to {out_path}", flush=True)


if __name__ == "__main__":
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    main(sys.argv[1])
