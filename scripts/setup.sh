#!/usr/bin/env bash
# Create .venv and install torchtitan_disagmoe with its pinned dependencies.
#   CPU hosts: torch==2.13.0 resolves to the CPU wheel (no CUDA download).
#   GPU hosts: set TORCH_INDEX_URL to a CUDA wheel index of torch 2.13.0 first, e.g.
#              TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 ./scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  .venv/bin/pip install --quiet torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, torchtitan, torchtitan_disagmoe; print('torch', torch.__version__, '| torchtitan ok | cuda', torch.cuda.is_available())"
