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
        if dataset_labels is None:
            raise ValueError("crd needs the training labels: init(..., dataset_labels=<(num_examples,) labels>).")
        labels = np.asarray(dataset_labels)
        if labels.shape != (num_examples,):
            raise ValueError(f"crd: dataset_labels has shape {labels.shape}, expected ({num_examples},) "
                             f"(one label per training example, in source order).")
        counts = np.unique(labels, return_counts=True)[1]
        fewest = int(num_examples - counts.max())
        if labels.min() < 0:
            raise ValueError(f"crd: dataset_labels holds the negative label {labels.min()}; labels must be >= 0.")
        if self.sampler == "with_replacement":
            if self.nce_k <= 0 or fewest <= 0:
                raise ValueError(f"crd: nce_k={self.nce_k} must be > 0 and the labels must have two or more "
                                 f"classes (largest class leaves {fewest} other-class examples).")
        elif not 0 < self.nce_k <= fewest:
            raise ValueError(f"crd: nce_k={self.nce_k} negatives per example, but the largest class leaves only "
                             f"{fewest} examples of other classes; set nce_k to at most {fewest}, or "
                             f"sampler='with_replacement'.")
        k_s, k_t, k_ms, k_mt = jax.random.split(rng, 4)
        head = Embed(self.feat_dim)
        params = {"student": head.init(k_s, feats_s[-1])["params"], "teacher": head.init(k_t, feats_t[-1])["params"]}
        state = {
            "memory_s": fl.crd_memory_init(k_ms, num_examples, self.feat_dim),
            "memory_t": fl.crd_memory_init(k_mt, num_examples, self.feat_dim),
            "z_s": jnp.full((), -1.0, jnp.float32),
            "z_t": jnp.full((), -1.0, jnp.float32),
            "labels": jnp.asarray(labels, jnp.int32),
        }
        if self.sampler == "with_replacement":
            state.update(class_blocks(labels))
        return {"params": params, "state": state}

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        if index is None:
            raise ValueError("crd needs each example's dataset index: pass index=batch['index'].")
        head = Embed(self.feat_dim)
        v_s = head.apply({"params": params["student"]}, feats_s[-1])
        v_t = head.apply({"params": params["teacher"]}, feats_t[-1])
        memory_s, memory_t = state["memory_s"], state["memory_t"]
        n_data = memory_s.shape[0]
        if self.sampler == "with_replacement":
            contrast_idx = crd_contrast_index_with_replacement(
                rng, state["labels"], index, self.nce_k, state["class_order"], state["class_start"],
                state["class_count"])
        else:
            contrast_idx = crd_contrast_index(rng, state["labels"], index, self.nce_k)
        z_now = fl.crd_normalizers(v_s, v_t, memory_s, memory_t, contrast_idx, n_data=n_data,
                                   temperature=self.nce_t)
        if axis_name is not None:
            z_now = jax.lax.pmean(z_now, axis_name)
        z_s = jnp.where(state["z_s"] < 0, z_now[0], state["z_s"])
        z_t = jnp.where(state["z_t"] < 0, z_now[1], state["z_t"])
        value = fl.crd_nce(v_s, v_t, memory_s, memory_t, contrast_idx, n_data=n_data, temperature=self.nce_t,
                           z_s=z_s, z_t=z_t, teacher_grad=True)
        rows = _gather(index, axis_name)
        new_state = {
            **state,
            "memory_s": fl.crd_memory_update(memory_s, _gather(v_s, axis_name), rows, self.nce_m),
            "memory_t": fl.crd_memory_update(memory_t, _gather(v_t, axis_name), rows, self.nce_m),
            "z_s": z_s,
            "z_t": z_t,
        }
        return value, new_state
