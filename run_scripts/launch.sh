#!/usr/bin/env bash
# Starts run_scripts/pretrain_*.sh on every rank. Sourced through `bash run_scripts/pretrain_X.sh`:
#   ENGINE=deepspeed (default): the DeepSpeed launcher, across HOSTFILE when set (one line per node:
#                               "node01 slots=8"), else on this node's GPUs.
#   ENGINE=fsdp | ddp:          torchrun; multi-node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
#                               (c10d rendezvous), NPROC_PER_NODE processes per node (default: all GPUs).
#   ENGINE=single:              plain python.
# Arguments after the script name are passed through and override the recipe.
set -euo pipefail
script=$1; shift
python=${PYTHON:-python}
engine=${ENGINE:-deepspeed}
gpus=$($python -c "import torch; print(max(torch.cuda.device_count(), 1))")
case "$engine" in
  deepspeed)
    exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} \
      ${MASTER_PORT:+--master_port "$MASTER_PORT"} "$script" "$@" ;;
  fsdp|ddp)
    exec torchrun --nnodes "${NNODES:-1}" --nproc_per_node "${NPROC_PER_NODE:-$gpus}" \
      --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
      --rdzv_id "${RDZV_ID:-megatron-lax}" "$script" "$@" ;;
  single)
    exec "$python" "$script" "$@" ;;
  *)
    echo "error: ENGINE must be deepspeed, fsdp, ddp or single, not $engine" >&2; exit 2 ;;
esac
