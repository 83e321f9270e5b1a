#!/usr/bin/env bash
# One-command accelerator benchmark (one GPU/TPU host, a few minutes): ResNet-18 and MobileNetV2
# at 224 px, batch 256, FP / QAT W4A4 / SQAKD W4A4 train steps in float32 and bfloat16 compute.
# Extra arguments go to benchmarks/accelerator.py (e.g. --batch=128, --tiny, --out=FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
exec "$PYTHON" benchmarks/accelerator.py --out="${OUT:-accelerator_results.json}" "$@"
