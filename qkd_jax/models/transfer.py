"""Initialise a student from its teacher by copying the variables they share."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict, freeze, unfreeze

Variables = Mapping[str, Any]


def copy_teacher_to_student(
    teacher_vars: Variables,
    student_vars: Variables,
    collections: Iterable[str] = ("params", "batch_stats"),
) -> Variables:
    """Return ``student_vars`` with every teacher leaf of ``collections`` copied to the same path.

    Student-only leaves (quantizer parameters, the ``quant_delta`` collection, ...) are kept.
    Raises ``KeyError`` naming the path when the student lacks a teacher leaf and ``ValueError``
    when the shapes differ. Copied values take the student leaf's dtype. Pure: inputs are not
    modified.
    """
    frozen = isinstance(student_vars, FrozenDict)
    out = dict(unfreeze(student_vars) if frozen else student_vars)
    for collection in collections:
        if collection not in teacher_vars:
            continue
        if collection not in out:
            raise KeyError(f"student has no collection {collection!r} (present in the teacher)")
        target = traverse_util.flatten_dict(unfreeze(out[collection]), sep="/")
        source = traverse_util.flatten_dict(unfreeze(teacher_vars[collection]), sep="/")
        for path, value in sorted(source.items()):
            where = f"{collection}/{path}"
            if path not in target:
                raise KeyError(f"teacher variable {where} has no counterpart in the student")
            if tuple(target[path].shape) != tuple(value.shape):
                raise ValueError(
                    f"shape mismatch at {where}: teacher {tuple(value.shape)}, student {tuple(target[path].shape)}"
                )
            target[path] = jnp.asarray(value, dtype=target[path].dtype)
        out[collection] = traverse_util.unflatten_dict(target, sep="/")
    return freeze(out) if frozen else out
