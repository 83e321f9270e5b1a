#!/usr/bin/env bash
# Creates .venv/ in the repository root on first use and (re)installs qkd_jax into it
# whenever setup.cfg, pyproject.toml, setup.py, requirements/lock.txt or the C extension source
# changed. It installs the exact versions of requirements/lock.txt (a constraints file).
# Usage: source launch/ensure_venv.sh [EXTRAS]
# EXTRAS is a pip extras list such as "test"; empty installs the core package only.
set -euo pipefail
QKD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QKD_EXTRAS="${1:-}"
QKD_PY="${QKD_PYTHON:-python3.11}"
if ! command -v "$QKD_PY" >/dev/null 2>&1; then QKD_PY=python3; fi
if [ ! -x "$QKD_ROOT/.venv/bin/python" ]; then
  echo "[qkd_jax] creating $QKD_ROOT/.venv with $($QKD_PY --version)" >&2
  "$QKD_PY" -m venv "$QKD_ROOT/.venv"
fi
QKD_STAMP_FILE="$QKD_ROOT/.venv/.qkd_jax_installed"
QKD_WANT="$(cat "$QKD_ROOT/setup.cfg" "$QKD_ROOT/pyproject.toml" "$QKD_ROOT/setup.py" "$QKD_ROOT/requirements/lock.txt" \
  "$QKD_ROOT/qkd_jax/data/_jpeg_crop.c" | sha256sum | cut -c1-16)[$QKD_EXTRAS]"
if [ ! -f "$QKD_STAMP_FILE" ] || ! grep -qxF "$QKD_WANT" "$QKD_STAMP_FILE"; then
  echo "[qkd_jax] installing qkd_jax${QKD_EXTRAS:+[$QKD_EXTRAS]} into .venv (first use or changed dependencies)" >&2
  "$QKD_ROOT/.venv/bin/python" -m pip install -q --upgrade pip
  "$QKD_ROOT/.venv/bin/python" -m pip install -q -e "$QKD_ROOT${QKD_EXTRAS:+[$QKD_EXTRAS]}" \
    -c "$QKD_ROOT/requirements/lock.txt"
  # Keep every extras set installed so far: the stamp lists one line per extras set.
  echo "$QKD_WANT" >> "$QKD_STAMP_FILE"
fi
export PATH="$QKD_ROOT/.venv/bin:$PATH"
