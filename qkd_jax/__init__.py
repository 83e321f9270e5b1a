"""qkd_jax: quantization-aware knowledge distillation (SQAKD, QKD) in functional JAX/Flax."""

__version__ = "0.1.0"
