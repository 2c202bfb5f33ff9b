#!/usr/bin/env bash
# Create .venv and install everything sam2-layerwise needs, from nothing. Idempotent: a second run is quick.
# torch/torchvision first (sam2 builds against them), then sam2 without build isolation and without its CUDA
# extension, then this package with its test and ray extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH="torch==2.14.1 torchvision==0.29.1"
SAM2="sam2==1.1.0"

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, sam2, sam2_layerwise, av, pytest, matplotlib, pandas, pyarrow, ray, starlette, uvicorn, playwright, httpx, ninja" >/dev/null 2>&1; then
  echo "bootstrap: installing $TORCH, $SAM2 and sam2-layerwise into .venv (a few minutes the first time)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet $TORCH
  SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install --quiet --no-build-isolation $SAM2
  .venv/bin/python -m pip install --quiet -e ".[test,ray]"  # ray: sweep --engine ray and its tests (run in CI)
fi
# The compiled statistics kernels: built once into ~/.cache/sam2_layerwise/ext (the torch path serves without a
# compiler); the flash one is checked against torch's own attention kernel before it is used
.venv/bin/python -c "from sam2_layerwise.capture import native; print('bootstrap: all-query statistics path:', native.path_name(), '| float attention with statistics on the way:', native.flash_kernel() is not None)" >&2 || true
