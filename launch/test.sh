#!/usr/bin/env bash
# The test suite: installs qkd_jax[test,torch,onnx] into .venv/ on first use, then runs pytest.
#
#   bash launch/test.sh                 the fast tier: every unit test (-m "not slow"), ~10 min on 2 cores
#   bash launch/test.sh --all           both tiers: also the end-to-end runs (tests/e2e/) and other slow tests
#   bash launch/test.sh --slow          the slow tier alone (what --all adds; CI runs it after the fast one)
#   bash launch/test.sh --isa=AVX2 ...  caps the instruction set XLA compiles CPU code for
#
# Options come first, in any order; everything after them goes to pytest
# (e.g. `bash launch/test.sh tests/quant -x`, `bash launch/test.sh --all -k resume`).
# `--isa=NAME` sets XLA_FLAGS=--xla_cpu_max_isa=NAME (SSE4_2, AVX, AVX2, AVX512...): float checks
# must hold for any correct float32 evaluation, so run the suite natively and e.g. with
# `--isa=AVX2` before a release.
set -euo pipefail
cd "$(dirname "$0")/.."
TIER=(-m "not slow")
while [ $# -gt 0 ]; do
  case "$1" in
    --isa=*)
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_max_isa=${1#--isa=}"
      echo "[qkd_jax] XLA_FLAGS=$XLA_FLAGS" >&2
      shift
      ;;
    --all) TIER=(); shift ;;
    --slow) TIER=(-m slow); shift ;;
    *) break ;;
  esac
done
source launch/ensure_venv.sh test,torch,onnx
# Two pytest workers match the 2-core CI machine; set QKD_TEST_WORKERS=0 to run serially.
# --dist loadfile: a module's tests run on one worker, so a module fixture that trains a whole
# run (tests/e2e) runs once per test run, not once per worker.
WORKERS="${QKD_TEST_WORKERS:-2}"
if [ "$WORKERS" != "0" ]; then set -- -n "$WORKERS" --dist loadfile "$@"; fi
exec python -m pytest ${TIER[@]+"${TIER[@]}"} "$@"
