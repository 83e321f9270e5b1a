#!/usr/bin/env bash
# The main job: installs qkd_jax into .venv/ on first use, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/ensure_venv.sh
exec python -m qkd_jax.demo "$@"
