"""The QKD weight-interval search against an independent NumPy search and closed forms.

The NumPy reference quantizes on the symmetric grid written as a step: s = I / (2^(b-1) - 1),
q = s round(clip(w / I, -1, 1) (2^(b-1) - 1)) (1 bit: I sign(w)), in float64. The JAX search
runs in float32, so two candidates whose float64 errors differ by less than float32 rounding
may be swapped: the checks compare errors with a relative tolerance of 1e-4 (a mean of
squares of float32 values carries a relative error of a few 1e-7 per element summed over at
most 1e4 elements: well below 1e-4), and require the result to be one of the candidates.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.quant.interval_search import MSE_CANDIDATES, mse_interval

RTOL = 1e-4


def np_quantize(w: np.ndarray, interval: float, bits: int) -> np.ndarray:
    if bits == 1:
        return interval * np.where(w >= 0, 1.0, -1.0)
    pos = 2 ** (bits - 1) - 1
    return interval / pos * np.round(np.clip(w / interval, -1.0, 1.0) * pos)


def np_mse(w: np.ndarray, interval: float, bits: int) -> float:
    return float(np.mean((np_quantize(w, interval, bits) - w) ** 2))


def np_search(w: np.ndarray, bits: int, n: int = MSE_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """All candidates max|W| k / n and their errors."""
    cands = np.abs(w).max() * np.arange(1, n + 1) / n
    return cands, np.array([np_mse(w, c, bits) for c in cands])


def _weights(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return 0.05 * rng.standard_normal(shape)
    if kind == "laplace":
        return rng.laplace(0.0, 0.02, shape)
    return 0.03 * rng.standard_t(3, shape)  # heavy tails: max|W| far above the bulk


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("kind,shape,seed", [("normal", (3, 3, 16, 32), 0), ("laplace", (3, 3, 8, 8), 1),
                                             ("student_t", (64, 10), 2)])
def test_search_matches_numpy(bits, kind, shape, seed):
    w = _weights(kind, shape, seed).astype(np.float32)
    w64 = w.astype(np.float64)
    got = float(jax.jit(mse_interval, static_argnums=1)(jnp.asarray(w), bits))
    cands, errors = np_search(w64, bits)
    # one of the candidates (up to float32 rounding of max|W| k / n) ...
    assert np.min(np.abs(cands - got)) <= 4e-7 * cands[-1], (got, cands)
    # ... with the least error up to float32 rounding
    assert np_mse(w64, got, bits) <= errors.min() * (1 + RTOL), (got, cands[np.argmin(errors)])


def test_one_bit_is_mean_abs():
    """1 bit: mse(I) = mean(w^2) - 2 I mean|w| + I^2, least at I = mean|w|: the search lands within half a
    candidate spacing (max|W| / 2n) of it."""
    w = _weights("normal", (3, 3, 32, 32), 3).astype(np.float32)
    got = float(mse_interval(jnp.asarray(w), 1))
    spacing = np.abs(w).max() / MSE_CANDIDATES
    assert abs(got - np.abs(w.astype(np.float64)).mean()) <= spacing / 2 + 1e-6


def test_ternary_gaussian_optimum():
    """2 bits, Gaussian weights: the least-MSE step of a 3-level uniform quantizer is 1.224 sigma (Max,
    1960). Closed form for N(0, 1): mse(I) = 1 - 4 I phi(I/2) + 2 I^2 (1 - Phi(I/2)), minimised here on
    a fine grid. The search has a resolution of max|W| / 100 (about 0.045 sigma at this size), and the
    sample's own optimum differs from the population's by O(1/sqrt(n)): tolerance 0.05 sigma."""
    grid = np.linspace(0.5, 2.5, 20001)
    phi = np.exp(-(grid / 2) ** 2 / 2) / math.sqrt(2 * math.pi)
    sf = np.array([0.5 * math.erfc(a / 2 / math.sqrt(2)) for a in grid])
    exact = grid[np.argmin(1 - 4 * grid * phi + 2 * grid**2 * sf)]
    assert abs(exact - 1.224) < 1e-3
    w = np.random.default_rng(4).standard_normal(200_000).astype(np.float32)
    got = float(mse_interval(jnp.asarray(w), 2))
    assert abs(got / w.std() - exact) < 0.05
    # and QKD's max|W| init puts far more of the weights in the zero bin (|w| < I/2)
    assert np.mean(np.abs(w) < got / 2) < 0.5
    assert np.mean(np.abs(w) < np.abs(w).max() / 2) > 0.95


def test_never_worse_than_max_abs():
    """max|W| is the last candidate, so the chosen interval's error is at most QKD's init's."""
    for bits in (2, 4):
        w = _weights("student_t", (256,), 5 + bits).astype(np.float32)
        got = float(mse_interval(jnp.asarray(w), bits))
        assert np_mse(w.astype(np.float64), got, bits) <= np_mse(w.astype(np.float64), np.abs(w).max(), bits) * (
            1 + RTOL)


def test_zero_weights_and_bad_candidates():
    assert float(mse_interval(jnp.zeros((4, 4)), 2)) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        mse_interval(jnp.ones((3,)), 2, n=0)
