#!/usr/bin/env bash
# The main job: installs qkd_jax[onnx] into .venv/ on first use (onnxruntime runs the exported
# student at the end of the demo), then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/ensure_venv.sh onnx
exec python -m qkd_jax.demo "$@"
