#!/usr/bin/env bash
# Create .venv and install jax_inpaint_rl with every extra.
# torch is installed first, pinned to the CPU build, so that no later
# requirement can pull the multi-GB CUDA stack by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  $PIP install "torch==${TORCH_VERSION:-2.13.0}"
fi
$PIP install -e ".[convert,ocr,dev]"
