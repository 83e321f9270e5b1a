"""CKTF (the released 'crdst'): CRD on the stem, on every stage through similarity transfer, and on the embedding.

Released: kaiqi123/SQAKD CIFAR/utils_distill.py (``define_distill_module_and_loss`` 'crdst',
``get_loss_crdst``), CIFAR/distiller_zoo/ST.py ``SimilarityTransfer`` and CIFAR/train_quant.py
(``loss = kd_gamma * CE + kd_alpha * KL + kd_beta * loss_kd_crd + kd_theta * loss_kd_crdSt``,
``--st_method`` default 'Last'). With ``flatGroupOut=True`` the models return their
features pooled and flattened and, per stage, the outputs of its blocks. Pairs, each with its
own CRD (``Embed`` heads and memory banks, :mod:`qkd_jax.distill.crd`):

- pair 0: the stem outputs ``feat[0]``, pooled and flattened (NCHW order, as ``view``);
- pair 1..G, one per stage: the student's last block output and one teacher block output of
  the same stage, each ``F.normalize(., p=2, dim=0)`` (over the BATCH axis, eps 1e-12), the
  student zero-padded (or cropped) symmetrically on the channel axis to the teacher's width;
  the teacher block is chosen by ``st_method``: 'Last' (the released default), 'First',
  'Largest' / 'Smallest' (the block of largest / smallest cosine similarity with the
  student, ties to the later block as Python's stable sort and ``pop()`` give), 'Random'
  (uniform, drawn from the step's key); both are pooled and flattened;
- pair G+1: the pre-logit embeddings ``feat[-1]``.

L_st is the sum of pairs 0..G, L_crd is pair G+1. Pooling: 'avg8' (ResNets: ``AvgPool2d(8)``,
kernel and stride 8, floor) or 'global' (VGGs: ``AdaptiveAvgPool2d(1)``); the released code
picks it by the student's architecture name, here each model records its rule with its block
outputs (``pool='auto'``), or ``pool`` overrides it. Head sizes follow the released rule
(s_dim = the teacher's dimension for every pair but the last): a student stem of another
width is refused. All CRDs score against ONE draw of negatives per step (the released data
loader gives one ``contrast_idx`` per batch).

Weights: the train step adds ``beta * loss``; this criterion's ``loss`` is
``L_crd + (theta / beta) * L_st``, so the step's total is ``beta * L_crd + theta * L_st`` as
released. ``beta`` is the phase's beta, filled in by the runner (``config_schema``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional, Sequence

import jax
import jax.numpy as jnp

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.crd import bank_state, checked_labels, crd_contrast_index, pair_loss
from qkd_jax.distill.feature_kd import FeatureKD, register_feature
from qkd_jax.distill.heads import Embed
from qkd_jax.models.layers import Array

ST_METHODS = ("Last", "Smallest", "Largest", "First", "Random")
POOLS = ("auto", "avg8", "global")
NORMALIZE_EPS = fl.NORMALIZE_EPS  # torch F.normalize
COSINE_EPS = 1e-8  # ST.py cosineSimilarity
Blocks = tuple[str, Sequence[Sequence[Array]]]


def normalize_batch(x: Array, eps: float = NORMALIZE_EPS) -> Array:
    """``F.normalize(x, p=2, dim=0)``: each position divided by its L2 norm over the batch (floored
    at eps; gradient 0 at an all-zero position, as torch's)."""
    return fl._normalize(x, axis=0, eps=eps)


def pad_channels(x: Array, channels: int) -> Array:
    """ST.py ``zero_pad_on_filter``: (c_out - c_in) // 2 zero channels on each side of NHWC ``x``
    (negative: cropped, as ``F.pad``); an odd difference is refused (the released assert)."""
    p = (channels - x.shape[-1]) // 2
    if x.shape[-1] + 2 * p != channels:
        raise ValueError(f"cktf: cannot zero-pad {x.shape[-1]} student channels symmetrically to the teacher's "
                         f"{channels} (odd difference); pair student and teacher stages of even width difference.")
    return jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (0, 0, 0), (0, 0, 0), (p, p, 0)))


def cosine(x1: Array, x2: Array) -> Array:
    """ST.py ``cosineSimilarity``: <x1, x2> / max(|x1| |x2|, 1e-8) over whole tensors."""
    n1, n2 = jnp.sqrt(jnp.sum(x1 ** 2)), jnp.sqrt(jnp.sum(x2 ** 2))
    return jnp.sum(x1 * x2) / jnp.maximum(n1 * n2, COSINE_EPS)


def select_block(sims: Array, method: str, key: Optional[jax.Array]) -> Array | int:
    """The teacher block index of ST.py ``st_loss_each_group`` given the (n,) similarities."""
    n = sims.shape[0]
    if method == "Last":
        return n - 1
    if method == "First":
        return 0
    sims = jax.lax.stop_gradient(sims)[::-1]  # ties: the later block (stable sort, then pop())
    if method == "Largest":
        return n - 1 - jnp.argmax(sims)
    if method == "Smallest":
        return n - 1 - jnp.argmin(sims)
    if method == "Random":
        return jax.random.randint(key, (), 0, n)
    raise ValueError(f"cktf: unknown st_method {method!r}; one of {ST_METHODS}.")


def pool_flat(x: Array, pool: str) -> Array:
    """The released pooling then ``view(N, -1)`` of NHWC ``x`` (flattened in NCHW order)."""
    if pool == "global":
        x = jnp.mean(x, axis=(1, 2), keepdims=True)
    elif pool == "avg8":
        n, h, w, c = x.shape
        if h < 8 or w < 8:
            raise ValueError(f"cktf: pool 'avg8' (the released ResNet AvgPool2d(8)) needs maps of at least 8x8, "
                             f"got {h}x{w}; use feature_options.pool='global' for small inputs.")
        ho, wo = h // 8, w // 8
        x = x[:, :ho * 8, :wo * 8].reshape(n, ho, 8, wo, 8, c).mean(axis=(2, 4))
    else:
        raise ValueError(f"cktf: unknown pool {pool!r}; one of {POOLS[1:]}.")
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def stage_pair(s_blocks: Sequence[Array], t_blocks: Sequence[Array], method: str, pool: str,
               key: Optional[jax.Array]) -> tuple[Array, Array]:
    """ST.py ``st_loss_each_group``: the (student, teacher) inputs of one stage's CRD."""
    s = normalize_batch(s_blocks[-1])
    t_norms = [normalize_batch(t) for t in t_blocks]
    if s.shape[1:3] != t_norms[0].shape[1:3]:
        raise ValueError(f"cktf: student and teacher stage maps differ in size ({s.shape[1:3]} vs "
                         f"{t_norms[0].shape[1:3]}); distil between models of the same stage layout.")
    s = pad_channels(s, t_norms[0].shape[-1])
    if method in ("Last", "First"):
        t = t_norms[select_block(jnp.zeros(len(t_norms)), method, None)]
    else:
        sims = jnp.stack([cosine(s, t) for t in t_norms])
        t = jnp.stack(t_norms)[select_block(sims, method, key)]
    return pool_flat(s, pool), pool_flat(t, pool)


@register_feature
@dataclasses.dataclass(frozen=True)
class CKTF(FeatureKD):
    """'cktf' (see the module docstring). Params: {'pair<i>': {'student', 'teacher'} heads};
    state: {'labels', 'pair<i>': {'memory_s', 'memory_t', 'z_s', 'z_t'}}, i = 0 (stem),
    1..G (stages), G+1 (embedding). Defaults: the released train_quant.py flags (nce_k 16384;
    the released CKTF scripts pass 4096, set by ``recipes.FEATURE_OPTIONS``)."""

    name: ClassVar[str] = "cktf"
    needs_index: ClassVar[bool] = True
    needs_dataset_labels: ClassVar[bool] = True
    needs_blocks: ClassVar[bool] = True
    theta: float = 0.8
    beta: float = 1.0
    st_method: str = "Last"
    pool: str = "auto"
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.1
    nce_m: float = 0.5

    def __post_init__(self):
        if self.st_method not in ST_METHODS:
            raise ValueError(f"cktf: unknown st_method {self.st_method!r}; one of {ST_METHODS} (released 'Last').")
        if self.pool not in POOLS:
            raise ValueError(f"cktf: unknown pool {self.pool!r}; one of {POOLS} ('auto': the model's own rule).")
        if not self.beta > 0 or not self.theta >= 0:
            raise ValueError(f"cktf: needs beta > 0 and theta >= 0, got beta={self.beta}, theta={self.theta}.")

    def pairs(self, feats_s, feats_t, blocks_s: Optional[Blocks], blocks_t: Optional[Blocks],
              key: jax.Array) -> list[tuple[Array, Array]]:
        """The (student, teacher) inputs of every CRD, in order: stem, each stage, embedding."""
        self._check_lengths(feats_s, feats_t, 2)
        if blocks_s is None or blocks_t is None:
            raise ValueError("cktf needs both models' block outputs: pass blocks_s= and blocks_t= "
                             "(models.features.read_block_outputs; the train step does so).")
        (rule_s, stages_s), (rule_t, stages_t) = blocks_s, blocks_t
        if len(stages_s) != len(stages_t):
            raise ValueError(f"cktf: student and teacher have {len(stages_s)} and {len(stages_t)} stages; "
                             f"distil between models of the same family.")
        pool_s = rule_s if self.pool == "auto" else self.pool
        pool_t = rule_t if self.pool == "auto" else self.pool
        out = [(pool_flat(feats_s[0], pool_s), pool_flat(feats_t[0], pool_t))]
        for g, (s_blocks, t_blocks) in enumerate(zip(stages_s, stages_t)):
            out.append(stage_pair(s_blocks, t_blocks, self.st_method, pool_s, jax.random.fold_in(key, g)))
        out.append((feats_s[-1], feats_t[-1]))
        return out

    def init(self, rng, feats_s, feats_t, *, num_examples, dataset_labels=None, blocks_s=None, blocks_t=None):
        labels = checked_labels(self.name, self.nce_k, num_examples, dataset_labels)
        pairs = self.pairs(feats_s, feats_t, blocks_s, blocks_t, jax.random.key(0))
        s0, t0 = pairs[0]
        if s0.shape[1] != t0.shape[1]:
            raise ValueError(f"cktf: the stems give {s0.shape[1]} (student) and {t0.shape[1]} (teacher) pooled "
                             f"features; the released head takes the teacher's size: use stems of the same width.")
        head = Embed(self.feat_dim)
        params, state = {}, {"labels": jnp.asarray(labels, jnp.int32)}
        for i, (x_s, x_t) in enumerate(pairs):
            k_s, k_t, k_ms, k_mt = jax.random.split(jax.random.fold_in(rng, i), 4)
            params[f"pair{i}"] = {"student": head.init(k_s, x_s)["params"], "teacher": head.init(k_t, x_t)["params"]}
            state[f"pair{i}"] = bank_state(k_ms, k_mt, num_examples, self.feat_dim)
        return {"params": params, "state": state}

    def terms(self, params, state, feats_s, feats_t, *, rng, index, axis_name=None, blocks_s=None,
              blocks_t=None) -> tuple[Array, Array, dict]:
        """(L_crd, L_st, new state): the released ``get_loss_crdst`` with the bank updates."""
        if index is None:
            raise ValueError("cktf needs each example's dataset index: pass index=batch['index'].")
        contrast_idx = crd_contrast_index(rng, state["labels"], index, self.nce_k)
        pairs = self.pairs(feats_s, feats_t, blocks_s, blocks_t, jax.random.fold_in(rng, 1))
        values, new_state = [], {"labels": state["labels"]}
        for i, (x_s, x_t) in enumerate(pairs):
            value, new_state[f"pair{i}"] = pair_loss(
                params[f"pair{i}"], state[f"pair{i}"], x_s, x_t, contrast_idx, index, feat_dim=self.feat_dim,
                nce_t=self.nce_t, nce_m=self.nce_m, axis_name=axis_name)
            values.append(value)
        return values[-1], sum(values[:-1]), new_state

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None, blocks_s=None,
             blocks_t=None):
        l_crd, l_st, new_state = self.terms(params, state, feats_s, feats_t, rng=rng, index=index,
                                            axis_name=axis_name, blocks_s=blocks_s, blocks_t=blocks_t)
        return l_crd + (self.theta / self.beta) * l_st, new_state

