"""The README's main job. For now: a demonstration of the quantizer core on a few numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qkd_jax import quant


def main() -> None:
    x = jnp.linspace(-1.2, 1.2, 9)
    rows = {
        "interval W2 (signed)": lambda v: quant.interval_quantize(v, -1.0, 1.0, 2, signed=True),
        "interval A2 (unsigned)": lambda v: quant.interval_quantize(v, 0.0, 1.0, 2, signed=False),
        "PACT A2, alpha=1": lambda v: quant.pact(v, 1.0, 2),
        "LSQ W2, step=0.5": lambda v: quant.lsq(v, 0.5, 2, signed=True),
        "DoReFa W2": lambda v: quant.dorefa_weight(v, 2),
        "QKD W2, I=1": lambda v: quant.qkd_interval(v, 1.0, 2, signed=True),
    }
    print("x:".ljust(26), " ".join(f"{v:6.2f}" for v in x))
    for name, fn in rows.items():
        print(f"{name:26s}", " ".join(f"{v:6.2f}" for v in fn(x)))
    print("\nGradient of sum(interval A2) w.r.t. x: STE (delta=0) vs EWGS (delta=0.5), upstream g=1")
    for delta in (0.0, 0.5):
        g = jax.grad(lambda v: quant.interval_quantize(v, 0.0, 1.0, 2, signed=False, delta=delta).sum())(x)
        print(f"delta={delta:<4}".ljust(26), " ".join(f"{v:6.2f}" for v in g))


if __name__ == "__main__":
    main()
