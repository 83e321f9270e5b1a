"""Contrastive representation distillation (CRD): embedding heads, memory banks, class-aware negatives.

Released: kaiqi123/SQAKD CIFAR/crd/criterion.py ``CRDLoss`` (``Embed`` heads, linear + L2
normalisation, on both networks' ``feat[-1]``, trained with the student), CIFAR/crd/memory.py
``ContrastMemory`` (banks ``memory_v1`` / ``memory_v2`` of past student / teacher embeddings,
n_data x feat_dim, moved with momentum ``nce_m`` after scoring; normalisers Z set on the first
batch and then fixed) and the 'exact' sampler of CIFAR/dataset/cifar10.py / cifar100.py
``*InstanceSample``: column 0 of the contrast indices is the example's own dataset index, the
``nce_k`` negatives are drawn uniformly without replacement from the examples of the other
classes (``np.random.choice(cls_negative[target], k, replace=False)``). Defaults are the
released ``train_quant.py`` flags: feat_dim 128, nce_k 16384, nce_t 0.1, nce_m 0.5.

Here the negatives are drawn inside the loss from the step's key (the released data loader
draws them with NumPy), by one of two samplers (option ``sampler``):

- ``'exact'`` (default, the released distribution): a uniform random score per (example,
  dataset row), +inf for rows of the example's own class, and the ``nce_k`` smallest (a
  uniformly random k-subset without replacement, cost O(batch x n_data) per step: the draw
  alone takes 0.45 s at CIFAR-100 scale and 14 s at ImageNet scale on 2 CPU cores,
  benchmarks/crd_sampler.py). The released sampler falls back to
  sampling with replacement when a class has fewer than ``nce_k`` other-class examples; this
  one refuses such an ``nce_k`` at init instead.
- ``'with_replacement'``: each of the ``nce_k`` negatives drawn independently and uniformly from
  the other-class rows, cost O(batch x nce_k) and no sort: the auxiliary state holds the
  dataset rows grouped by class (``class_order``) with each class's offset and count; a draw
  u in [0, n - count(own)) skips the own class's block. What differs from 'exact': a row can
  appear more than once among an example's negatives; the expected number of repeated pairs
  is C(nce_k, 2) / m ~ nce_k^2 / (2 m) for m other-class rows (ImageNet, nce_k 16384:
  ~105 of 16384 draws; the released 'exact' has none), and nce_k may exceed m.

The class of each row comes from the training labels held in the auxiliary state
(``init(..., dataset_labels=...)``).

Several replicas (a named ``axis_name``): each draws its own negatives; Z is the mean over
all replicas' first batches; every replica writes the gathered rows of all replicas into its
banks, so the banks stay identical everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.feature_kd import FeatureKD, register_feature
from qkd_jax.distill.heads import Embed
from qkd_jax.models.layers import Array


def crd_contrast_index(key: jax.Array, labels: Array, index: Array, nce_k: int) -> Array:
    """(N, 1 + nce_k) bank rows: column 0 ``index`` (the positive), then ``nce_k`` distinct rows
    whose label differs from ``labels[index]``, a uniformly random subset in random order."""
    labels = jnp.asarray(labels)
    own = labels[index]
    scores = jax.random.uniform(key, (index.shape[0], labels.shape[0]))
    scores = jnp.where(labels[None, :] == own[:, None], jnp.inf, scores)
    _, negatives = jax.lax.top_k(-scores, nce_k)
    return jnp.concatenate([index[:, None].astype(negatives.dtype), negatives], axis=1)


def class_blocks(labels: np.ndarray) -> dict[str, jax.Array]:
    """The dataset rows grouped by class: ``class_order`` (rows sorted by label, stable), and per
    label value its block's ``class_start`` offset in it and ``class_count`` (0 for absent labels)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=int(labels.max()) + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return {"class_order": jnp.asarray(np.argsort(labels, kind="stable"), jnp.int32),
            "class_start": jnp.asarray(starts, jnp.int32), "class_count": jnp.asarray(counts, jnp.int32)}


def crd_contrast_index_with_replacement(key: jax.Array, labels: Array, index: Array, nce_k: int,
                                        class_order: Array, class_start: Array, class_count: Array) -> Array:
    """(N, 1 + nce_k) bank rows: column 0 ``index``, then ``nce_k`` independent uniform draws from
    the rows whose label differs from ``labels[index]`` (with replacement). O(N x nce_k): u in
    [0, n - count(own class)) indexes ``class_order`` with the own class's block skipped."""
    own = jnp.asarray(labels)[index]
    start, count = class_start[own][:, None], class_count[own][:, None]
    n = class_order.shape[0]
    u = jax.random.randint(key, (index.shape[0], nce_k), 0, n - count, dtype=jnp.int32)
    negatives = class_order[jnp.where(u >= start, u + count, u)]
    return jnp.concatenate([index[:, None].astype(negatives.dtype), negatives], axis=1)


SAMPLERS = ("exact", "with_replacement")


def _gather(x: Array, axis_name) -> Array:
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def checked_labels(name: str, nce_k: int, num_examples: int, dataset_labels, sampler: str = "exact") -> np.ndarray:
    """The training labels as an array, after checking their shape, that they are >= 0, and that
    the sampler can draw ``nce_k`` negatives: 'exact' draws without replacement, so every class
    must leave at least ``nce_k`` examples of other classes; 'with_replacement' needs two classes."""
    if dataset_labels is None:
        raise ValueError(f"{name} needs the training labels: init(..., dataset_labels=<(num_examples,) labels>).")
    labels = np.asarray(dataset_labels)
    if labels.shape != (num_examples,):
        raise ValueError(f"{name}: dataset_labels has shape {labels.shape}, expected ({num_examples},) "
                         f"(one label per training example, in source order).")
    if labels.min() < 0:
        raise ValueError(f"{name}: dataset_labels holds the negative label {labels.min()}; labels must be >= 0.")
    counts = np.unique(labels, return_counts=True)[1]
    fewest = int(num_examples - counts.max())
    if sampler == "with_replacement":
        if nce_k <= 0 or fewest <= 0:
            raise ValueError(f"{name}: nce_k={nce_k} must be > 0 and the labels must have two or more "
                             f"classes (largest class leaves {fewest} other-class examples).")
    elif not 0 < nce_k <= fewest:
        raise ValueError(f"{name}: nce_k={nce_k} negatives per example, but the largest class leaves only "
                         f"{fewest} examples of other classes; set nce_k to at most {fewest}"
                         + (", or sampler='with_replacement'." if name == "crd" else "."))
    return labels


def bank_state(key_s: jax.Array, key_t: jax.Array, num_examples: int, feat_dim: int) -> dict:
    """One CRD's state: the released ``ContrastMemory`` banks and normalisers (z < 0: not yet set)."""
    return {
        "memory_s": fl.crd_memory_init(key_s, num_examples, feat_dim),
        "memory_t": fl.crd_memory_init(key_t, num_examples, feat_dim),
        "z_s": jnp.full((), -1.0, jnp.float32),
        "z_t": jnp.full((), -1.0, jnp.float32),
    }


def pair_loss(heads: dict, bank: dict, x_s: Array, x_t: Array, contrast_idx: Array, index: Array, *,
              feat_dim: int, nce_t: float, nce_m: float, axis_name=None) -> tuple[Array, dict]:
    """One released ``CRDLoss`` call: ``Embed`` heads ({'student', 'teacher'} params) on ``x_s`` /
    ``x_t``, :func:`feature_losses.crd_nce` against ``bank`` (:func:`bank_state`) with the given
    negatives, then the momentum update of both banks: (loss, new bank)."""
    head = Embed(feat_dim)
    v_s = head.apply({"params": heads["student"]}, x_s)
    v_t = head.apply({"params": heads["teacher"]}, x_t)
    memory_s, memory_t = bank["memory_s"], bank["memory_t"]
    n_data = memory_s.shape[0]
    z_now = fl.crd_normalizers(v_s, v_t, memory_s, memory_t, contrast_idx, n_data=n_data, temperature=nce_t)
    if axis_name is not None:
        z_now = jax.lax.pmean(z_now, axis_name)
    z_s = jnp.where(bank["z_s"] < 0, z_now[0], bank["z_s"])
    z_t = jnp.where(bank["z_t"] < 0, z_now[1], bank["z_t"])
    value = fl.crd_nce(v_s, v_t, memory_s, memory_t, contrast_idx, n_data=n_data, temperature=nce_t,
                       z_s=z_s, z_t=z_t, teacher_grad=True)
    rows = _gather(index, axis_name)
    return value, {
        "memory_s": fl.crd_memory_update(memory_s, _gather(v_s, axis_name), rows, nce_m),
        "memory_t": fl.crd_memory_update(memory_t, _gather(v_t, axis_name), rows, nce_m),
        "z_s": z_s,
        "z_t": z_t,
    }


@register_feature
@dataclasses.dataclass(frozen=True)
class CRD(FeatureKD):
    """'crd': :func:`feature_losses.crd_nce` of ``Embed(feat_dim)`` of each network's ``feat[-1]``
    against the banks, then :func:`feature_losses.crd_memory_update` of both banks.
    Params: {'student', 'teacher'} heads; state: {'memory_s', 'memory_t', 'z_s', 'z_t', 'labels'}
    (z < 0 until the first step sets it, as released), plus :func:`class_blocks` with
    sampler='with_replacement'. `sampler`: how the negatives are drawn (module docstring)."""

    name: ClassVar[str] = "crd"
    needs_index: ClassVar[bool] = True
    needs_dataset_labels: ClassVar[bool] = True
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.1
    nce_m: float = 0.5
    sampler: str = "exact"

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"crd: sampler={self.sampler!r} is unknown; use one of {list(SAMPLERS)}.")

    def init(self, rng, feats_s, feats_t, *, num_examples, dataset_labels=None):
        self._check_lengths(feats_s, feats_t, 1)
        labels = checked_labels(self.name, self.nce_k, num_examples, dataset_labels, self.sampler)
        k_s, k_t, k_ms, k_mt = jax.random.split(rng, 4)
        head = Embed(self.feat_dim)
        params = {"student": head.init(k_s, feats_s[-1])["params"], "teacher": head.init(k_t, feats_t[-1])["params"]}
        state = {**bank_state(k_ms, k_mt, num_examples, self.feat_dim), "labels": jnp.asarray(labels, jnp.int32)}
        if self.sampler == "with_replacement":
            state.update(class_blocks(labels))
        return {"params": params, "state": state}

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        if index is None:
            raise ValueError("crd needs each example's dataset index: pass index=batch['index'].")
        if self.sampler == "with_replacement":
            contrast_idx = crd_contrast_index_with_replacement(
                rng, state["labels"], index, self.nce_k, state["class_order"], state["class_start"],
                state["class_count"])
        else:
            contrast_idx = crd_contrast_index(rng, state["labels"], index, self.nce_k)
        value, bank = pair_loss(params, state, feats_s[-1], feats_t[-1], contrast_idx, index,
                                feat_dim=self.feat_dim, nce_t=self.nce_t, nce_m=self.nce_m, axis_name=axis_name)
        return value, {**state, **bank}
