#!/usr/bin/env bash
# Creates .bench-venv/ (repository root) with TensorFlow for benchmarks/input_pipeline.py --tf.
# TensorFlow is never a dependency of qkd_jax: this venv exists only to time tf.data on the
# same files. Usage: bash benchmarks/tf_venv.sh  (then see benchmarks/input_pipeline.py --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
if [ ! -x .bench-venv/bin/python ]; then
  "$PY" -m venv .bench-venv
fi
.bench-venv/bin/python -m pip install --quiet --upgrade pip
# tensorflow-cpu 2.21.0: the newest CPU-only wheel for Python 3.11 (no CUDA libraries pulled in).
.bench-venv/bin/python -m pip install --quiet tensorflow-cpu==2.21.0 pillow==13.0.0 numpy
.bench-venv/bin/python -c "import tensorflow as tf; print('tensorflow', tf.__version__)"
