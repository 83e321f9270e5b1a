"""Pretrained teachers from torchvision: its ``state_dict`` names mapped onto the zoo's flax variables.

    state_dict = {k: v.numpy() for k, v in torchvision_model.state_dict().items()}
    variables = import_torchvision('resnet18', state_dict)      # {'params': ..., 'batch_stats': ...}
    logits = get_model('resnet18', 1000).apply(variables, images_nhwc)

Each zoo model names its layers differently from torchvision (``stem`` for ``conv1``, ``layer1_0``
for ``layer1.0``, ...): :mod:`qkd_jax.models.torchvision_names` maps the module paths, and
:func:`_leaf_pairs` the leaves: conv kernels OIHW <-> HWIO (grouped convs too: flax stores
(H, W, I/groups, O)), linear (out, in) <-> (in, out), BatchNorm ``weight``/``bias``/
``running_mean``/``running_var`` <-> ``scale``/``bias``/``mean``/``var`` (``num_batches_tracked``
is accepted and dropped). The zoo's BatchNorm uses torch's eps 1e-5, as do these torchvision
models (EfficientNet-B0 included; only B5-B7 and V2 change it).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from qkd_jax.models.registry import get_model, image_size
from qkd_jax.models.torchvision_names import RENAMES, Path, supported_models

_BN_TRACKED = "num_batches_tracked"


class Leaf(NamedTuple):
    """One flax variable and the torchvision tensor it comes from."""

    collection: str
    path: Path
    shape: tuple[int, ...]  # flax layout
    dtype: Any


#: (collection, flax leaf name) -> torch tensor name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

#: flax axis order of a torch weight, by rank: conv OIHW -> HWIO, linear (out, in) -> (in, out).
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}


def torch_to_flax(value: np.ndarray) -> np.ndarray:
    """torch layout -> flax layout: OIHW -> HWIO (grouped: (H, W, I/groups, O)), (out, in) -> (in, out)."""
    return value.transpose(_TO_FLAX[value.ndim]) if value.ndim in _TO_FLAX else value


def flax_to_torch(value: np.ndarray) -> np.ndarray:
    """flax layout -> torch layout (inverse of :func:`torch_to_flax`)."""
    return value.transpose(_TO_TORCH[value.ndim]) if value.ndim in _TO_TORCH else value


def flax_to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a flax variable of ``shape``."""
    return tuple(shape[a] for a in _TO_TORCH[len(shape)]) if len(shape) in _TO_TORCH else tuple(shape)


def _leaf_pairs(name: str, variables: Mapping[str, Any]) -> tuple[dict[str, Leaf], set[str]]:
    """torchvision key -> flax leaf for every variable, and the BatchNorm module prefixes."""
    rename = RENAMES[name]
    params = variables["params"]
    pairs: dict[str, Leaf] = {}
    norms: set[str] = set()
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
        for path, leaf in flat.items():
            prefix = rename(path[:-1], params)
            if collection == "batch_stats":
                norms.add(prefix)
            key = f"{prefix}.{_LEAF_NAMES[collection, path[-1]]}"
            pairs[key] = Leaf(collection, path, tuple(leaf.shape), leaf.dtype)
    return pairs, norms


def torchvision_shapes(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The torchvision ``state_dict`` keys and shapes :func:`import_torchvision` expects (torch layout)."""
    _check_name(name)
    pairs, norms = _leaf_pairs(name, _abstract_variables(name, num_classes))
    shapes = {key: flax_to_torch_shape(leaf.shape) for key, leaf in pairs.items()}
    return shapes | {f"{prefix}.{_BN_TRACKED}": () for prefix in norms}


def _check_name(name: str) -> None:
    if name not in RENAMES:
        raise ValueError(f"no torchvision mapping for {name!r}; supported: {', '.join(supported_models())}")


def _abstract_variables(name: str, num_classes: int) -> Mapping[str, Any]:
    """Shapes and dtypes of ``get_model(name, num_classes)``'s variables (traced, nothing computed)."""
    size = image_size(name)
    model = get_model(name, num_classes)
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))


def torchvision_num_classes(name: str, state_dict: Mapping[str, Any]) -> int:
    """The class count of a torchvision ``state_dict`` of model ``name`` (rows of its classifier weight)."""
    _check_name(name)
    key = RENAMES[name](("classifier",), {}) + ".weight"
    if key not in state_dict:
        raise ValueError(f"missing torchvision key {key!r} (the classifier weight, which gives num_classes)")
    return int(np.shape(state_dict[key])[0])


def _listing(items: list[str], sep: str, limit: int = 20) -> str:
    """The first ``limit`` items joined by ``sep``, then how many were left out."""
    more = f"{sep}... ({len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def import_torchvision(name: str, state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flax variables of ``get_model(name, num_classes)`` from a torchvision ``state_dict`` (NumPy arrays).

    ``num_classes`` is read from the classifier weight. Every key must be used and every variable
    provided (``num_batches_tracked`` of a BatchNorm may be present or not); otherwise a
    ``ValueError`` names the unknown keys, the missing keys and the shape mismatches (with the
    expected torch shape). Values are cast to the variable dtype (float32). Feed the model NHWC
    input: ``images_nchw.transpose(0, 2, 3, 1)``.
    """
    _check_name(name)
    abstract = _abstract_variables(name, torchvision_num_classes(name, state_dict))
    pairs, norms = _leaf_pairs(name, abstract)
    tracked = {f"{prefix}.{_BN_TRACKED}" for prefix in norms}
    unknown = sorted(set(state_dict) - set(pairs) - tracked)
    missing = sorted(set(pairs) - set(state_dict))
    mismatched = []
    for key, leaf in pairs.items():
        if key in state_dict and tuple(np.shape(state_dict[key])) != flax_to_torch_shape(leaf.shape):
            mismatched.append(
                f"{key}: got {tuple(np.shape(state_dict[key]))}, expected {flax_to_torch_shape(leaf.shape)}"
            )
    problems = []
    if unknown:
        problems.append(f"unknown keys: {_listing(unknown, ', ')}")
    if missing:
        problems.append(f"missing keys: {_listing(missing, ', ')}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(sorted(mismatched), '; ')}")
    if problems:
        raise ValueError(f"torchvision state_dict does not fit {name!r}: " + " | ".join(problems))
    out: dict[str, dict[Path, Any]] = {}
    for key, leaf in pairs.items():
        value = torch_to_flax(np.asarray(state_dict[key]))
        out.setdefault(leaf.collection, {})[leaf.path] = jnp.asarray(value, dtype=leaf.dtype)
    return {collection: traverse_util.unflatten_dict(flat) for collection, flat in out.items()}


def export_torchvision(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse of :func:`import_torchvision`: a torchvision ``state_dict`` (NumPy) from flax variables.

    Every BatchNorm also gets ``num_batches_tracked`` = 0 so that torch's strict
    ``load_state_dict`` accepts the result.
    """
    _check_name(name)
    pairs, norms = _leaf_pairs(name, variables)
    flat = {c: traverse_util.flatten_dict(dict(variables[c])) for c in ("params", "batch_stats") if c in variables}
    out = {}
    for key, leaf in pairs.items():
        out[key] = np.array(flax_to_torch(np.asarray(flat[leaf.collection][leaf.path])), order="C")
    for prefix in norms:
        out[f"{prefix}.{_BN_TRACKED}"] = np.zeros((), np.int64)
    return out

