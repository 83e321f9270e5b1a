#!/usr/bin/env bash
# The test suite: installs qkd_jax[test] into .venv/ on first use, then runs pytest.
# Extra arguments go to pytest (e.g. `bash launch/test.sh tests/quant -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/ensure_venv.sh test
# Two pytest workers match the 2-core CI machine; set QKD_TEST_WORKERS=0 to run serially.
WORKERS="${QKD_TEST_WORKERS:-2}"
if [ "$WORKERS" != "0" ]; then set -- -n "$WORKERS" "$@"; fi
exec python -m pytest "$@"
