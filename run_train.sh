#!/usr/bin/bash
# Launch training with torchrun, torchtitan style.
#   CONFIG_FILE  TOML job file (default: train_configs/debug_model.toml)
#   NGPU         ranks: GPUs on a GPU host, processes on CPU (default: all GPUs, or 2 on CPU)
# Every other argument is passed on as an override, e.g. --training.steps 10.
set -euo pipefail
cd "$(dirname "$0")"

# Use the project's virtualenv when none is active (README: ./scripts/setup.sh makes it).
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then
  export PATH="$PWD/.venv/bin:$PATH"
fi

CONFIG_FILE=${CONFIG_FILE:-"./train_configs/debug_model.toml"}
if [ -z "${NGPU:-}" ]; then
  NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
# A free rendezvous port, so that two runs on one host do not collide.
PORT=${MASTER_PORT:-$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")}
# CPU: the trainer gives each rank cores/NGPU intra-op threads; keep OpenMP in line.
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 0 ? $(nproc) / NGPU : 1 ))}
fi

exec torchrun --nproc-per-node="${NGPU}" --rdzv-backend=c10d --rdzv-endpoint="localhost:${PORT}" \
  --local-ranks-filter=0 --role=rank --tee=3 \
  -m torchtitan_disagmoe.train --job.config_file "${CONFIG_FILE}" "$@"
