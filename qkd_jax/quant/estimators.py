"""Gradient estimators of the rounding step: small frozen pytrees, registered by name.

An estimator says what the discretizer's backward pass (and, for some, its training-time
forward pass) is; the hard forward `x_q = round(x_n (L - 1)) / (L - 1)` stays the discretizer's,
so evaluation and the integer export never depend on the estimator (docs/method.md section 12).

    backward(g, x_n, x_q, levels) -> dL/dx_n      g = dL/dx_q, all on the [0, 1] grid, L = levels
    forward(x_n, levels, key)     -> x_q          training-time forward (`stochastic` ones only)

Hyperparameters are dataclass fields and pytree leaves (floats, or arrays for learnable or annealed
ones; no gradient flows to them through the discretizer). A new estimator is a subclass decorated
with `@estimator_record` and, to be named in configs, `register(cls)`:

    @estimator_record
    class Clipped(Estimator):
        name: ClassVar[str] = "clipped"
        limit: float = 1.0
        def backward(self, g, x_n, x_q, levels):
            return jnp.clip(g, -self.limit, self.limit)

    register(Clipped)

Built-ins: 'ste', 'ewgs' (fixed delta; delta=None reads the layer's 'quant_delta', which the
Hessian refresh writes), 'dsq', 'approxsign', 'reste', 'stochastic', 'noise'. Formulas and sources
are in docs/method.md section 12; each backward rule below is the derivative of a per-cell surrogate
in grid-index units u = x_n (L - 1) with t = 2 (u - floor(u)) - 1 in [-1, 1] the position in the cell.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp

#: name -> estimator class (`register`).
ESTIMATORS: dict[str, type] = {}


def estimator_record(cls: type) -> type:
    """Makes `cls` a frozen keyword-only dataclass whose fields are pytree leaves."""
    cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


class Estimator:
    """Base class. `stochastic` estimators change the training forward and need a PRNG key."""

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    # False when the training forward leaves the grid (uniform noise): layers then skip their
    # integer factorisation for that call.
    on_grid: ClassVar[bool] = True

    def backward(self, g: jax.Array, x_n: jax.Array, x_q: jax.Array, levels: int) -> jax.Array:
        """dL/dx_n from g = dL/dx_q (straight-through by default)."""
        return g

    def forward(self, x_n: jax.Array, levels: int, key: jax.Array) -> jax.Array:
        """The training-time forward; the hard rounding unless overridden."""
        steps = levels - 1
        return jnp.round(x_n * steps) / steps

    def forward_index(self, u: jax.Array, levels: int, key: jax.Array) -> jax.Array:
        """`forward` in grid-index units u = x_n (L - 1) (LSQ and the released quantizers round u)."""
        steps = levels - 1
        return self.forward(u / steps, levels, key) * steps

    def keyed(self, key: Optional[jax.Array]) -> "Keyed":
        """This estimator with the PRNG key of one discretizer call (what quantizers pass on)."""
        return Keyed(self, key)

    def check(self) -> None:
        """Raises ValueError (one line) for an impossible hyperparameter; nothing by default."""

    def options(self) -> dict[str, Any]:
        """The hyperparameters as a dict (what the run record shows)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class Keyed:
    """An estimator and the PRNG key of one call: quantizers pass it in their `delta` slot."""

    estimator: Estimator
    key: Optional[jax.Array] = None


def register(cls: type) -> type:
    """Adds an estimator class to ESTIMATORS under `cls.name` (a new, non-empty name; a redefinition of
    the same class, e.g. a notebook cell run twice, replaces the earlier one)."""
    if not (isinstance(cls, type) and issubclass(cls, Estimator)) or not cls.name:
        raise ValueError(f"register takes an Estimator subclass with a name, got {cls!r}")
    old = ESTIMATORS.get(cls.name)
    # A class of the same module and qualified name replaces its earlier definition (a re-run cell).
    redefined = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not redefined:
        raise ValueError(f"estimator {cls.name!r} is already registered (by {old.__module__}.{old.__qualname__})")
    ESTIMATORS[cls.name] = cls
    return cls


def make(name: str, options: Optional[dict] = None) -> Estimator:
    """The registered estimator `name` with `options` as its hyperparameters.

    Raises ValueError with one line naming the registered estimators or the estimator's options.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown gradient estimator {name!r}; registered: {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    options = dict(options or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"estimator {name!r} has no option(s) {unknown}; its options: {known}")
    est = cls(**options)
    est.check()
    return est


def _cell(x_n: jax.Array, levels: int) -> jax.Array:
    """t = 2 frac(u) - 1 in [-1, 1]: the position inside the grid cell, u = x_n (L - 1)."""
    u = x_n * (levels - 1)
    return 2.0 * (u - jnp.floor(u)) - 1.0


def _check_positive(est: Estimator, **values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, (int, float)) and not value > 0:
            raise ValueError(f"estimator {est.name!r}: {key}={value!r} must be > 0")


@register
@estimator_record
class STE(Estimator):
    """Straight-through estimator: dL/dx_n = g (Bengio et al. 2013)."""

    name: ClassVar[str] = "ste"


@register
@estimator_record
class EWGS(Estimator):
    """Element-wise gradient scaling: g (1 + delta sign(g) (x_n - x_q)) (Lee et al. 2021).

    delta None: the layer's 'quant_delta' value (quant.delta, or the Hessian refresh).
    """

    name: ClassVar[str] = "ewgs"
    delta: Optional[float] = None

    def check(self) -> None:
        if isinstance(self.delta, (int, float)) and not self.delta >= 0:
            raise ValueError(f"estimator 'ewgs': delta={self.delta!r} must be >= 0 (0 = straight-through)")

    def backward(self, g, x_n, x_q, levels):
        delta = 0.0 if self.delta is None else self.delta
        return g * (1.0 + delta * jnp.sign(g) * (x_n - x_q))


@register
@estimator_record
class DSQ(Estimator):
    """Differentiable soft quantization (Gong et al. 2019), backward only (MQBench's dsq.py):
    the derivative of phi(u) = floor(u) + 1/2 + s tanh(k (frac(u) - 1/2)) / 2,
    s = 1 / (1 - alpha), k = log(2 / alpha - 1); alpha in (0, 1), smaller is closer to rounding."""

    name: ClassVar[str] = "dsq"
    alpha: float = 0.2

    def check(self) -> None:
        if isinstance(self.alpha, (int, float)) and not 0 < self.alpha < 1:
            raise ValueError(f"estimator 'dsq': alpha={self.alpha!r} must be in (0, 1)")

    def backward(self, g, x_n, x_q, levels):
        alpha = jnp.asarray(self.alpha, x_n.dtype)
        s = 1.0 / (1.0 - alpha)
        k = jnp.log(2.0 / alpha - 1.0)
        th = jnp.tanh(k * _cell(x_n, levels) / 2.0)
        return g * (0.5 * s * k * (1.0 - th * th))


@register
@estimator_record
class ApproxSign(Estimator):
    """Bi-Real Net's ApproxSign (Liu et al. 2018): d sign(t)/dt = 2 - 2|t| on [-1, 1]; per cell on
    grids of more than 2 levels (our choice)."""

    name: ClassVar[str] = "approxsign"

    def backward(self, g, x_n, x_q, levels):
        return g * (2.0 - 2.0 * jnp.abs(_cell(x_n, levels)))


@register
@estimator_record
class ReSTE(Estimator):
    """Rectified STE (Wu et al., ICCV 2023): the derivative of sign(t) |t|^(1/o),
    (1/o) |t|^(1/o - 1), clipped at `threshold`; o = 1 is the STE. Per cell beyond 2 levels."""

    name: ClassVar[str] = "reste"
    power: float = 3.0
    threshold: float = 1.5

    def check(self) -> None:
        _check_positive(self, threshold=self.threshold)
        if isinstance(self.power, (int, float)) and not self.power >= 1:
            raise ValueError(f"estimator 'reste': power={self.power!r} must be >= 1 (1 = straight-through)")

    def backward(self, g, x_n, x_q, levels):
        t = jnp.abs(_cell(x_n, levels))
        inv = 1.0 / jnp.asarray(self.power, x_n.dtype)
        # |t|^(1/o - 1) is infinite at t = 0; the clip bounds it (where-guarded for the gradient).
        safe = jnp.where(t > 0, t, 1.0)
        slope = jnp.where(t > 0, inv * safe ** (inv - 1.0), jnp.inf)
        return g * jnp.minimum(slope, self.threshold)


@register
@estimator_record
class Stochastic(Estimator):
    """Stochastic rounding (Gupta et al. 2015): u rounds up with probability frac(u),
    r = floor(u + U[0, 1)), E[r] = u; straight-through backward."""

    name: ClassVar[str] = "stochastic"
    stochastic: ClassVar[bool] = True

    def forward(self, x_n, levels, key):
        steps = levels - 1
        return self.forward_index(x_n * steps, levels, key) / steps

    def forward_index(self, u, levels, key):
        return jnp.floor(u + jax.random.uniform(key, u.shape, u.dtype))


@register
@estimator_record
class Noise(Estimator):
    """Additive uniform noise of one grid step (DiffQ, Defossez et al. 2022; Quant-Noise, Fan et al.
    2021): on a random share `rate` of the elements x_q = x_n + U[-1/2, 1/2) / (L - 1), the others
    hard-rounded; straight-through backward (the exact derivative of the noisy forward)."""

    name: ClassVar[str] = "noise"
    stochastic: ClassVar[bool] = True
    on_grid: ClassVar[bool] = False
    rate: float = 1.0

    def check(self) -> None:
        if isinstance(self.rate, (int, float)) and not 0 <= self.rate <= 1:
            raise ValueError(f"estimator 'noise': rate={self.rate!r} must be in [0, 1]")

    def forward(self, x_n, levels, key):
        steps = levels - 1
        return self.forward_index(x_n * steps, levels, key) / steps

    def forward_index(self, u, levels, key):
        k_noise, k_pick = jax.random.split(key)
        noisy = u + jax.random.uniform(k_noise, u.shape, u.dtype, -0.5, 0.5)
        picked = jax.random.uniform(k_pick, u.shape, u.dtype) < self.rate
        return jnp.where(picked, noisy, jnp.round(u))


def describe(est: Optional[Estimator]) -> str:
    """'name(option=value, ...)' for reports and records."""
    if est is None:
        return "-"
    opts = ", ".join(f"{k}={v!r}" for k, v in est.options().items())
    return f"{est.name}({opts})"


def is_ewgs_family(est: Optional[Estimator]) -> bool:
    """STE and EWGS run the legacy discretizer (same numbers as before estimators existed)."""
    return est is None or type(est) in (STE, EWGS)


def legacy_delta(est: Estimator, delta: Any) -> Any:
    """The EWGS delta an STE / EWGS estimator means (EWGS delta None: the caller's `delta`)."""
    if isinstance(est, STE):
        return 0.0
    return delta if est.delta is None else est.delta

