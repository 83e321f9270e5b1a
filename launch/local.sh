#!/usr/bin/env bash
# Training run on this machine, data parallel over all of its devices (CPU, one GPU host, one TPU VM).
#
# Usage:
#   bash launch/local.sh CONFIG WORKDIR [--config.KEY=VALUE ...]
#   bash launch/local.sh configs/cifar10_resnet20.py:sqakd,w2a2 /tmp/c10_r20_sqakd_w2a2
#   bash launch/local.sh configs/digits_demo.py /tmp/digits --config.phases.teacher.batch_size=64
# Runs, from the repository root, with .venv/ on PATH:
#   python -m qkd_jax.main --config=CONFIG --workdir=WORKDIR [--config.KEY=VALUE ...]
# Relative CONFIG files and WORKDIRs are taken from the directory you call the script in.
# Rerunning the same command resumes from the newest checkpoint under WORKDIR.
#
# Env:
#   QKD_EXTRAS   pip extras installed into .venv/ on first use: "" (default, CPU jaxlib), "cuda", "tpu".
#   QKD_PYTHON   interpreter that creates .venv/ (default python3.11; see launch/ensure_venv.sh).
# Several processes on one machine (e.g. to try multi-process code paths on CPU), or a cluster
# without a scheduler JAX knows: start this script once per process with
#   QKD_COORDINATOR=HOST_OF_PROCESS_0:PORT QKD_NUM_PROCESSES=N QKD_PROCESS_ID=i
# (qkd_jax.train.distributed reads them; this script then also sets QKD_DISTRIBUTED=1, and every
# process must see the same WORKDIR).
set -euo pipefail
if [ $# -lt 2 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
CONFIG="$1" WORKDIR="$2"
shift 2
# Make paths given relative to the caller's directory absolute before moving to the repo root.
CONFIG_FILE="${CONFIG%%:*}"
if [[ "$CONFIG_FILE" != /* && -f "$CONFIG_FILE" ]]; then CONFIG="$PWD/$CONFIG"; fi
if [[ "$WORKDIR" != /* && "$WORKDIR" != *://* ]]; then WORKDIR="$PWD/$WORKDIR"; fi
cd "$(dirname "$0")/.."
source launch/ensure_venv.sh "${QKD_EXTRAS:-}"
if [ -n "${QKD_COORDINATOR:-}" ]; then export QKD_DISTRIBUTED=1; fi
exec python -m qkd_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
