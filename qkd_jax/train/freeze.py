"""Freeze named top-level parameter subtrees of an optimizer: their update is exactly zero.

Used by FSP's initialisation (released kaiqi123/SQAKD CIFAR/utils_distill.py ``init``): only the
student's feature modules are in the optimizer, so the classifier receives no update at all, not
even from weight decay. Wrapping the whole transformation (decay included) in
``optax.multi_transform`` gives the same: the frozen leaves never enter ``tx``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import optax


def freeze_top_level(tx: optax.GradientTransformation, params: Mapping,
                     names: Sequence[str] = ("classifier",)) -> optax.GradientTransformation:
    """``tx`` for every top-level subtree of ``params`` except those in ``names``, whose updates
    are zero. Raises if a name is not a top-level key (a misspelt name would freeze nothing)."""
    missing = sorted(set(names) - set(params))
    if missing:
        raise ValueError(f"freeze_top_level: no top-level parameter named {missing}; the params have "
                         f"{sorted(params)}. Name the subtrees to freeze among those.")
    labels = {key: ("frozen" if key in names else "train") for key in params}
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                 lambda p: {key: labels[key] for key in p})
