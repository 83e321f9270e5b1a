"""Test configuration: 8 virtual CPU devices, a persistent compilation cache, and the two tiers.

XLA reads the device count when the backend starts, so the flag is set before any test
module imports JAX.

Tiers (README, "Tests"): every test under tests/e2e/ is marked `slow` here, so an end-to-end
test cannot land in the fast tier by accident; other expensive tests carry `@pytest.mark.slow`
themselves. `bash launch/test.sh` runs `-m "not slow"`, `--all` runs both.
"""

import os
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_E2E = _ROOT / "tests" / "e2e"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# One cache directory for every worker of a run (and every later run of this checkout): a
# program compiled by one xdist worker is read back by the other.
jax.config.update("jax_compilation_cache_dir", str(_ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """Marks every test under tests/e2e/ as `slow` (the full tier)."""
    for item in items:
        if _E2E in pathlib.Path(str(item.path)).parents:
            item.add_marker(pytest.mark.slow)
