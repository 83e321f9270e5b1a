#!/usr/bin/env bash
# Training run on every worker of a Cloud TPU VM (single host or pod slice), started from your workstation.
#
# Usage:
#   bash launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   bash launch/tpu_pod.sh my-v4-32 us-central2-b configs/imagenet_resnet18.py:qat,w4a4 \
#       /mnt/gcs/qkd/r18_w4a4 --config.dataset.data_dir=/mnt/gcs/tfds
# What it does:
#   1. (QKD_SYNC=1, the default) packs this checkout (without .git, .venv, .cache) and copies it to
#      $QKD_REMOTE_DIR on every worker:  gcloud compute tpus tpu-vm scp ... --worker=all
#   2. runs the same command on all workers at once:
#        gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all --command="
#          cd $QKD_REMOTE_DIR && source launch/ensure_venv.sh tpu &&
#          QKD_DISTRIBUTED=1 python -m qkd_jax.main --config=CONFIG --workdir=WORKDIR [--config.KEY=VALUE ...]"
#      ensure_venv.sh creates .venv/ there and runs `pip install -e .[tpu]` on first use (needs
#      python3.11 on the VM image, or QKD_PYTHON=/path/to/python3.11).
#      jax.distributed.initialize() finds the pod's workers by itself (TPU metadata server).
# WORKDIR (checkpoints, metrics) must be one absolute path that is the same storage on every
# worker, never a worker's local disk: a GCS bucket mounted with gcsfuse at the same path on all
# workers, or Filestore/NFS. (A bare gs:// URL needs the train loop to write its config/metrics
# files through a GCS-aware file API; see launch/README.md.) The same holds for the dataset
# (--config.dataset.data_dir). CONFIG is a path inside the repository (e.g. configs/...).
# Rerun the same command to resume.
#
# Env:
#   QKD_REMOTE_DIR  checkout location on the workers (default: qkd_jax, i.e. ~/qkd_jax).
#   QKD_SYNC        1 (default) copy the code first; 0 reuse what is on the workers.
#   QKD_DETACH      1: run in the background with nohup, logging to $QKD_REMOTE_DIR/train.log on each
#                   worker (survives a dropped ssh); default 0 streams every worker's output here.
#   QKD_GCLOUD_FLAGS extra gcloud flags, e.g. "--project=my-proj --tunnel-through-iap".
set -euo pipefail
if [ $# -lt 4 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
TPU="$1" ZONE="$2" CONFIG="$3" WORKDIR="$4"
shift 4
REMOTE_DIR="${QKD_REMOTE_DIR:-qkd_jax}"
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
GCLOUD_FLAGS=(--zone="$ZONE" ${QKD_GCLOUD_FLAGS:-})
if [[ "$WORKDIR" != /* && "$WORKDIR" != *://* ]]; then
  echo "WORKDIR '$WORKDIR' is relative: it would land on each worker's local disk; give the absolute path of shared storage" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

if [ "${QKD_SYNC:-1}" = "1" ]; then
  TARBALL="$(mktemp -d)/qkd_jax_src.tgz"
  tar --exclude=./.git --exclude=./.venv --exclude=./.cache --exclude='*.egg-info' \
      --exclude='__pycache__' -czf "$TARBALL" .
  echo "[qkd_jax] copying $(du -h "$TARBALL" | cut -f1) of code to $TPU:$REMOTE_DIR on all workers" >&2
  gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU":qkd_jax_src.tgz --worker=all "${GCLOUD_FLAGS[@]}"
  gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_FLAGS[@]}" \
    --command="mkdir -p $(printf '%q' "$REMOTE_DIR") && tar -xzf qkd_jax_src.tgz -C $(printf '%q' "$REMOTE_DIR") && rm qkd_jax_src.tgz"
  rm -f "$TARBALL"
fi

# The training command, quoted for the remote shell.
TRAIN="QKD_DISTRIBUTED=1 python -m qkd_jax.main $(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "$@")"
SETUP="cd $(printf '%q' "$REMOTE_DIR") && source launch/ensure_venv.sh tpu"
if [ "${QKD_DETACH:-0}" = "1" ]; then
  REMOTE="$SETUP && (nohup bash -c $(printf '%q' "$TRAIN") > train.log 2>&1 &) && echo started, log: \$PWD/train.log"
else
  REMOTE="$SETUP && $TRAIN"
fi
echo "[qkd_jax] on all workers of $TPU: $REMOTE" >&2
exec gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_FLAGS[@]}" --command="bash -c $(printf '%q' "$REMOTE")"
