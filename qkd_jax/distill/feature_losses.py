"""Feature-distillation losses of the SQAKD comparison (pure functions, NHWC maps, (N, D) vectors).

Each function reproduces one criterion of the released code (kaiqi123/SQAKD
CIFAR/distiller_zoo/*.py and CIFAR/crd/*.py; PKT, which that repository calls in
CIFAR/utils_distill.py without shipping, from its parent HobbitLong/RepDistiller
distiller_zoo/PKT.py): same spatial matching, normalisations, epsilons and reduction.
The teacher side is wrapped in ``jax.lax.stop_gradient`` everywhere (the released teacher
runs without gradients); ``correlation`` and ``crd_nce`` take ``teacher_grad=True`` to let
the gradient reach a trainable teacher-side embedding head, as the released code does.

Degenerate points (zero features, equal embeddings, zero distances) have finite
gradients: norms use a "double where" so that a zero vector gets torch's subgradient 0
for its norm (as ``torch.nn.functional.normalize`` does), and ``|x|`` has torch's
subgradient ``sign(0) = 0``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax.models.layers import Array, adaptive_avg_pool

#: ``torch.nn.functional.normalize`` default epsilon.
NORMALIZE_EPS = 1e-12


def _abs(x: Array) -> Array:
    """|x| with torch's subgradient sign(0) = 0 (jnp.abs has 1 at 0)."""
    return x * jax.lax.stop_gradient(jnp.sign(x))


def _norm(x: Array, axis: int) -> Array:
    """L2 norm over ``axis`` (kept) whose gradient at a zero vector is 0 instead of NaN."""
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _normalize(x: Array, axis: int = 1, eps: float = NORMALIZE_EPS) -> Array:
    """``torch.nn.functional.normalize``: x / max(||x||, eps) along ``axis``."""
    return x / jnp.maximum(_norm(x, axis), eps)


def _flatten(f: Array) -> Array:
    return f.reshape(f.shape[0], -1)


def match_spatial(f_s: Array, f_t: Array) -> tuple[Array, Array]:
    """Adaptive-average-pool the taller NHWC map to (H, H) of the other (the released rule,
    which compares heights only and pools to a square); equal heights pass unchanged."""
    s_h, t_h = f_s.shape[1], f_t.shape[1]
    if s_h > t_h:
        f_s = adaptive_avg_pool(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = adaptive_avg_pool(f_t, (s_h, s_h))
    return f_s, f_t


def _spatial_map(f: Array, p: float) -> Array:
    """normalize(mean_c(f ** p)) as an (N, H*W) matrix (AT's attention map, FT's factor)."""
    return _normalize(_flatten(jnp.mean(f**p, axis=-1)), axis=1)


def attention(f_s: Array, f_t: Array, p: float = 2) -> Array:
    """Attention transfer for one pair of maps (kaiqi123/SQAKD CIFAR/distiller_zoo/AT.py ``at_loss``).

    After :func:`match_spatial`, a(f) = normalize_HW(mean_C(f ** p)); loss = mean over
    (N, H*W) of (a(f_s) - a(f_t)) ** 2. The released ``forward`` returns one such loss per
    pair of a list and the caller sums them.
    """
    f_s, f_t = match_spatial(f_s, jax.lax.stop_gradient(f_t))
    return jnp.mean((_spatial_map(f_s, p) - _spatial_map(f_t, p)) ** 2)


def _channel_rows(f: Array) -> Array:
    """(N, H, W, C) -> (N, C, H*W), each channel's map L2-normalised over H*W."""
    rows = jnp.swapaxes(f.reshape(f.shape[0], -1, f.shape[-1]), 1, 2)
    return _normalize(rows, axis=2)


def _poly_kernel_mean(a: Array, b: Array) -> Array:
    """mean over (N, C_b, C_a) of <b_i, a_j> ** 2 (NST's degree-2 polynomial kernel)."""
    return jnp.mean(jnp.einsum("nid,njd->nij", b, a) ** 2)


def nst(f_s: Array, f_t: Array) -> Array:
    """Neuron selectivity transfer for one pair of maps (kaiqi123/SQAKD CIFAR/distiller_zoo/NST.py).

    After :func:`match_spatial`, each channel is L2-normalised over H*W; with
    k(a, b) = mean of (a_i . b_j) ** 2 over samples and channel pairs,
    loss = k(t, t) + k(s, s) - 2 k(s, t) (the released ``full_loss`` branch).
    """
    f_s, f_t = match_spatial(f_s, jax.lax.stop_gradient(f_t))
    s, t = _channel_rows(f_s), _channel_rows(f_t)
    return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


def similarity(f_s: Array, f_t: Array) -> Array:
    """Similarity-preserving KD for one pair (kaiqi123/SQAKD CIFAR/distiller_zoo/SP.py).

    G = normalize_rows(F F^T) on the flattened (N, D) features; loss = ||G_t - G_s||_F^2 / N^2.
    The released value is a shape-(1,) tensor; this returns the scalar.
    """
    n = f_s.shape[0]

    def gram(f: Array) -> Array:
        f = _flatten(f)
        return _normalize(f @ f.T, axis=1)

    diff = gram(jax.lax.stop_gradient(f_t)) - gram(f_s)
    return jnp.sum(diff * diff) / (n * n)


def _smooth_l1(x: Array, y: Array) -> Array:
    """``F.smooth_l1_loss`` (beta 1, mean): 0.5 d^2 where |d| < 1, else |d| - 0.5."""
    d = x - y
    a = _abs(d)
    return jnp.mean(jnp.where(a < 1.0, 0.5 * d * d, a - 0.5))


def _pdist(e: Array, eps: float = 1e-12) -> Array:
    """RKD ``pdist``: sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, eps)) with a zero diagonal."""
    sq = jnp.sum(e * e, axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (e @ e.T), eps)
    return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, jnp.sqrt(d2))


def _mean_scaled(d: Array) -> Array:
    """d / (mean of the positive entries of d); all-zero d (a batch of one) stays zero."""
    mask = jax.lax.stop_gradient(d > 0)
    count = jnp.sum(mask)
    mean = jnp.sum(jnp.where(mask, d, 0.0)) / jnp.maximum(count, 1)
    return d / jnp.where(count > 0, mean, 1.0)


def _angles(e: Array) -> Array:
    """cos of the angle at e_i between e_j and e_k, flattened (N^3,); zero differences give 0."""
    diff = _normalize(e[None, :, :] - e[:, None, :], axis=2)
    return jnp.einsum("ijd,ikd->ijk", diff, diff).reshape(-1)


def rkd(f_s: Array, f_t: Array, w_d: float = 25.0, w_a: float = 50.0) -> Array:
    """Relational KD, distance + angle (kaiqi123/SQAKD CIFAR/distiller_zoo/RKD.py).

    Distances: the (N, N) pairwise distance matrix (squared distances clamped at 1e-12
    before the square root, zero diagonal) divided by the mean of its positive entries;
    angles: cosines of all (N^3) triangles; loss = w_d * smooth_l1(d_s, d_t) + w_a *
    smooth_l1(angle_s, angle_t), both means. For a batch of one the released mean over an
    empty set is NaN; here the distance matrix is left at zero (the limit value 0).
    """
    s, t = _flatten(f_s), _flatten(jax.lax.stop_gradient(f_t))
    loss_d = _smooth_l1(_mean_scaled(_pdist(s)), _mean_scaled(_pdist(t)))
    loss_a = _smooth_l1(_angles(s), _angles(t))
    return w_d * loss_d + w_a * loss_a


def _maybe_stop(x: Array, teacher_grad: bool) -> Array:
    return x if teacher_grad else jax.lax.stop_gradient(x)


def correlation(f_s: Array, f_t: Array, *, teacher_grad: bool = False) -> Array:
    """Correlation congruence on embeddings (kaiqi123/SQAKD CIFAR/distiller_zoo/CC.py).

    delta = |e_s - e_t|; loss = mean over i < N-1 of sum_d delta[i, d] * delta[i+1, d].
    The released code feeds the outputs of trainable linear embeddings and lets the
    gradient reach the teacher-side one: pass ``teacher_grad=True`` for that. A batch of
    one (an empty mean, NaN in the released code) gives 0.
    """
    f_t = _maybe_stop(f_t, teacher_grad)
    if f_s.shape[0] < 2:
        return jnp.zeros((), f_s.dtype)
    delta = _abs(f_s - f_t)
    return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))


def hint(f_s: Array, f_t: Array) -> Array:
    """FitNet hint: mean squared error between the regressed student map and the teacher map
    (kaiqi123/SQAKD CIFAR/distiller_zoo/FitNet.py, ``nn.MSELoss``)."""
    return jnp.mean((f_s - jax.lax.stop_gradient(f_t)) ** 2)


def factor_transfer(f_s: Array, f_t: Array, p1: float = 2, p2: float = 1) -> Array:
    """Factor transfer on the translator / paraphraser factors (kaiqi123/SQAKD CIFAR/distiller_zoo/FT.py).

    After :func:`match_spatial`, F(f) = normalize_HW(mean_C(f ** p1)); loss = mean |F_s - F_t|
    for p2 = 1, else mean (F_s - F_t) ** p2.
    """
    f_s, f_t = match_spatial(f_s, jax.lax.stop_gradient(f_t))
    diff = _spatial_map(f_s, p1) - _spatial_map(f_t, p1)
    return jnp.mean(_abs(diff)) if p2 == 1 else jnp.mean(diff**p2)


def _fsp_matrices(feats: Sequence[Array]) -> list[Array]:
    """FSP matrix per consecutive pair: (N, C_top, C_bottom) = mean_HW top_i * bottom_j."""
    out = []
    for bottom, top in zip(feats[:-1], feats[1:]):
        bottom, top = match_spatial(bottom, top)
        hw = bottom.shape[1] * bottom.shape[2]
        out.append(jnp.einsum("nxi,nxj->nij", top.reshape(top.shape[0], -1, top.shape[-1]),
                              bottom.reshape(bottom.shape[0], -1, bottom.shape[-1])) / hw)
    return out


def fsp(feats_s: Sequence[Array], feats_t: Sequence[Array]) -> list[Array]:
    """Flow-of-solution-procedure loss, one per consecutive pair (kaiqi123/SQAKD CIFAR/distiller_zoo/FSP.py).

    For each pair (bottom, top), the taller map is pooled to the other's height; the FSP
    matrix is G[i, j] = mean over H*W of top_i * bottom_j; loss_k = mean (G_s - G_t) ** 2.
    Student and teacher must have the same channel counts (the released constructor checks it).
    """
    if len(feats_s) != len(feats_t):
        raise ValueError(f"fsp needs equally long feature lists, got {len(feats_s)} and {len(feats_t)}")
    for a, b in zip(feats_s, feats_t):
        if a.shape[-1] != b.shape[-1]:
            raise ValueError(f"fsp needs equal channel counts, got {a.shape[-1]} and {b.shape[-1]}")
    feats_t = [jax.lax.stop_gradient(f) for f in feats_t]
    return [jnp.mean((s - t) ** 2) for s, t in zip(_fsp_matrices(feats_s), _fsp_matrices(feats_t))]


def vid_log_scale_init(init_pred_var: float = 5.0, eps: float = 1e-5) -> float:
    """The released initial ``log_scale``: softplus^-1(init_pred_var - eps)."""
    return float(np.log(np.expm1(init_pred_var - eps)))


def vid(pred_mean: Array, target: Array, log_scale: Array, eps: float = 1e-5) -> Array:
    """Variational information distillation NLL (kaiqi123/SQAKD CIFAR/distiller_zoo/VID.py).

    sigma^2 = softplus(log_scale) + eps per channel (the last NHWC axis);
    loss = mean of 0.5 * ((mu - t) ** 2 / sigma^2 + log sigma^2). ``pred_mean`` is the
    regressor's output; the released code pools the taller of (student input, target)
    before the regressor: pool the student input with :func:`match_spatial` before the
    regressor, a taller target is pooled here. softplus is the stable form of the released
    log(1 + exp(x)) (equal values, no overflow).
    """
    target = jax.lax.stop_gradient(target)
    if target.shape[1] > pred_mean.shape[1]:
        _, target = match_spatial(pred_mean, target)
    var = jax.nn.softplus(log_scale) + eps
    return jnp.mean(0.5 * ((pred_mean - target) ** 2 / var + jnp.log(var)))


def pkt(f_s: Array, f_t: Array, eps: float = 1e-7) -> Array:
    """Probabilistic knowledge transfer (HobbitLong/RepDistiller distiller_zoo/PKT.py; the SQAKD
    code dispatches 'pkt' in CIFAR/utils_distill.py without shipping the file).

    x / (||x|| + eps) rows; S = (X X^T + 1) / 2; P = S / row sums;
    loss = mean over (N, N) of P_t * log((P_t + eps) / (P_s + eps)). At a zero row the
    released gradient is NaN (sqrt at 0); here the norm's subgradient there is 0.
    """

    def probs(f: Array) -> Array:
        f = _flatten(f)
        f = f / (_norm(f, 1) + eps)
        sim = (f @ f.T + 1.0) / 2.0
        return sim / jnp.sum(sim, axis=1, keepdims=True)

    p_s, p_t = probs(f_s), probs(jax.lax.stop_gradient(f_t))
    return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def crd_memory_init(key: jax.Array, n_data: int, dim: int, dtype: jnp.dtype = jnp.float32) -> Array:
    """A released initial memory bank: (n_data, dim) uniform in +-1 / sqrt(dim / 3)
    (kaiqi123/SQAKD CIFAR/crd/memory.py ``ContrastMemory.__init__``)."""
    bound = 1.0 / np.sqrt(dim / 3.0)
    return jax.random.uniform(key, (n_data, dim), dtype, -bound, bound)


def _crd_logits(anchor: Array, memory: Array, contrast_idx: Array, temperature: float) -> Array:
    """(N, K+1) scores <memory[idx[n, k]], anchor[n]> / T; the bank is a constant."""
    weights = jax.lax.stop_gradient(memory)[contrast_idx]
    return jnp.einsum("nkd,nd->nk", weights, anchor) / temperature


def crd_normalizers(
    v_s: Array, v_t: Array, memory_s: Array, memory_t: Array, contrast_idx: Array, *, n_data: int,
    temperature: float = 0.07,
) -> tuple[Array, Array]:
    """The released constants (Z_s, Z_t) = n_data * mean exp(scores / T), set on the first
    batch and kept for the whole run (``ContrastMemory`` ``params[2:4]``); no gradient."""
    z = [
        n_data * jnp.mean(jnp.exp(_crd_logits(anchor, memory, contrast_idx, temperature)))
        for anchor, memory in ((v_s, memory_t), (v_t, memory_s))
    ]
    return jax.lax.stop_gradient(z[0]), jax.lax.stop_gradient(z[1])


def _contrast_loss(logits: Array, log_z: Array, n_data: int, eps: float = 1e-7) -> Array:
    """CRD NCE loss (Eq. 18): -(sum log D1 + sum log D0) / N, P = exp(logits) / Z,
    D1 = P_pos / (P_pos + K/n + eps), D0 = (K/n) / (P_neg + K/n + eps)."""
    k_over_n = (logits.shape[1] - 1) / n_data
    log_p = logits - log_z
    p = jnp.exp(log_p)
    log_d1 = log_p[:, 0] - jnp.log(p[:, 0] + k_over_n + eps)
    log_d0 = np.log(k_over_n) - jnp.log(p[:, 1:] + k_over_n + eps)
    return -(jnp.sum(log_d1) + jnp.sum(log_d0)) / logits.shape[0]


def crd_nce(
    v_s: Array,
    v_t: Array,
    memory_s: Array,
    memory_t: Array,
    contrast_idx: Array,
    *,
    n_data: int,
    temperature: float = 0.07,
    z_s: Array | float | None = None,
    z_t: Array | float | None = None,
    teacher_grad: bool = False,
) -> Array:
    """Contrastive representation distillation loss (kaiqi123/SQAKD CIFAR/crd/criterion.py
    ``CRDLoss`` / ``ContrastLoss`` with CIFAR/crd/memory.py ``ContrastMemory.forward``).

    ``v_s``, ``v_t``: (N, D) L2-normalised embeddings; ``memory_s`` / ``memory_t``: the
    (n_data, D) banks of past student / teacher embeddings (``memory_v1`` / ``memory_v2``);
    ``contrast_idx``: (N, K+1) bank rows, column 0 the positive (the sample's own index).
    The student anchor is scored against the teacher bank and the teacher anchor against the
    student bank, s = exp(<m, v> / T) / Z; loss = NCE(student scores) + NCE(teacher scores).
    ``z_s`` / ``z_t`` default to this batch's :func:`crd_normalizers` (the released first
    step); later steps must pass the stored values. Update the banks afterwards with
    :func:`crd_memory_update`. log P = score - log Z is used instead of log(exp(score) / Z)
    (equal values, no underflow). ``teacher_grad=True`` lets the gradient reach ``v_t``, as
    in the released code where it trains the teacher-side embedding head.
    """
    v_t = _maybe_stop(v_t, teacher_grad)
    if z_s is None or z_t is None:
        z_s, z_t = crd_normalizers(
            v_s, v_t, memory_s, memory_t, contrast_idx, n_data=n_data, temperature=temperature
        )
    loss_s = _contrast_loss(_crd_logits(v_s, memory_t, contrast_idx, temperature), jnp.log(z_s), n_data)
    loss_t = _contrast_loss(_crd_logits(v_t, memory_s, contrast_idx, temperature), jnp.log(z_t), n_data)
    return loss_s + loss_t


def crd_memory_update(memory: Array, v: Array, idx: Array, momentum: float = 0.5) -> Array:
    """The released bank update: rows ``idx`` <- normalize(momentum * memory[idx] + (1 - momentum) * v)
    (kaiqi123/SQAKD CIFAR/crd/memory.py, no gradient). A zero row stays zero (the released
    division by a zero norm gives NaN). With repeated indices one of the rows wins, as with
    torch's ``index_copy_``."""
    v = jax.lax.stop_gradient(v)
    rows = momentum * memory[idx] + (1.0 - momentum) * v
    return memory.at[idx].set(_normalize(rows, axis=1).astype(memory.dtype))
