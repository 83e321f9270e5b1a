"""Test configuration: 8 virtual CPU devices and a persistent compilation cache.

XLA reads the device count when the backend starts, so the flag is set before any test
module imports JAX.
"""

import os
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
