#!/usr/bin/env bash
# The test suite: installs qkd_jax[test] into .venv/ on first use, then runs pytest.
# Extra arguments go to pytest (e.g. `bash launch/test.sh tests/quant -x`).
# `--isa=NAME` (first argument) caps the instruction set XLA compiles CPU code for
# (XLA_FLAGS=--xla_cpu_max_isa=NAME: SSE4_2, AVX, AVX2, AVX512...): float checks must hold for any
# correct float32 evaluation, so run the suite natively and e.g. with `--isa=AVX2` before a release.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --isa=*)
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=${1#--isa=}"
    echo "[qkd_jax] XLA_FLAGS=$XLA_FLAGS" >&2
    shift
    ;;
esac
source launch/ensure_venv.sh test,torch
# Two pytest workers match the 2-core CI machine; set QKD_TEST_WORKERS=0 to run serially.
WORKERS="${QKD_TEST_WORKERS:-2}"
if [ "$WORKERS" != "0" ]; then set -- -n "$WORKERS" "$@"; fi
exec python -m pytest "$@"
