#!/usr/bin/env bash
# Starts run_scripts/pretrain_*.sh on every rank. Sourced through `bash run_scripts/pretrain_X.sh`:
#   ENGINE=deepspeed (default): the DeepSpeed launcher, across HOSTFILE when set (one line per node:
#                               "node01 slots=8"), else on this node's GPUs.
#   ENGINE=fsdp | ddp:          torchrun; multi-node with NNODES, MASTER_ADDR, MASTER_PORT (c10d
#                               rendezvous, which assigns node ranks), NPROC_PER_NODE processes per node
#                               (default: all GPUs); RDZV_TIMEOUT seconds for all nodes to join (default 900).
#   ENGINE=single:              plain python.
# Arguments after the script name are passed through and override the recipe.
# Preemption: SIGUSR1 (or, under torchrun, SIGTERM) sent to this script reaches the training processes,
# which finish their step, write a checkpoint and exit 0. Launchers ignore SIGUSR1 here: torchrun
# handles only TERM, INT, HUP and QUIT, and would otherwise die of it while its workers write their
# checkpoint. A SIGUSR1 that comes before the training loop installs its handler is ignored.
set -euo pipefail
trap '' USR1  # until the trainer handles it: the processes started below inherit this
script=$1; shift
python=${PYTHON:-python}
engine=${ENGINE:-deepspeed}

die() { echo "error: $*" >&2; exit 2; }

gpu_count() { "$python" -c "import torch; print(max(torch.cuda.device_count(), 1))"; }

check_resolves() {  # host, what names it
  getent hosts "$1" >/dev/null || die "$2 names node '$1', which does not resolve"
}

check_hostfile() {
  [ -f "$1" ] && [ -r "$1" ] || die "HOSTFILE $1 is not a readable file"
  local host
  for host in $(awk '!/^[[:space:]]*(#|$)/ {print $1}' "$1"); do
    check_resolves "$host" "hostfile $1"
  done
}

# Runs the command in the background, hands SIGUSR1 and SIGTERM on to its children (torchrun starts
# each worker in a session of its own, so a signal to this process group does not reach them) and
# returns the command's exit status.
run_forwarding_signals() {
  "$@" &
  local child=$! status=0
  trap 'pkill -USR1 -P "$child" || true' USR1
  trap 'pkill -TERM -P "$child" || true' TERM
  wait "$child" || status=$?
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again
    status=0
    wait "$child" || status=$?
  done
  return "$status"
}

# torchrun (the module, run by $python), with a rendezvous that does not complete (a node that never
# starts within RDZV_TIMEOUT, an unreachable endpoint) reported in one line instead of a traceback.
torchrun_or_explain() {
  ENDPOINT="$1" exec "$python" -c '
import os, sys
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import main
try:
    main(sys.argv[1:])
except RendezvousError as e:
    endpoint, cause = os.environ["ENDPOINT"], type(e).__name__
    print(f"error: the c10d rendezvous at {endpoint} did not complete ({cause}): a node did not start "
          f"within RDZV_TIMEOUT, or the endpoint does not answer", file=sys.stderr)
    sys.exit(2)
' "${@:2}"
}

case "$engine" in
  deepspeed)
    [ -z "${HOSTFILE:-}" ] || check_hostfile "$HOSTFILE"
    # pdsh does not carry these to other nodes: every rank gets them as arguments (megatron_lax/launch.py)
    recipe_env=()
    for name in METHOD GATE ENGINE ZERO_STAGE DATA TOKENIZER PRECISION RUN_DIR RECIPE MEMORY_PLAN PLAN_GPU; do
      [ -z "${!name+set}" ] || recipe_env+=(--launch-env "$name=${!name}")
    done
    exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} \
      ${MASTER_PORT:+--master_port "$MASTER_PORT"} "$script" ${recipe_env[@]+"${recipe_env[@]}"} "$@" ;;
  fsdp|ddp)
    endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
    [ "${NNODES:-1}" = 1 ] || check_resolves "${MASTER_ADDR:-127.0.0.1}" "MASTER_ADDR"
    run_forwarding_signals torchrun_or_explain "$endpoint" --nnodes "${NNODES:-1}" \
      --nproc_per_node "${NPROC_PER_NODE:-$(gpu_count)}" --rdzv_backend c10d --rdzv_endpoint "$endpoint" \
      --rdzv_id "${RDZV_ID:-megatron-lax}" --rdzv_conf "join_timeout=${RDZV_TIMEOUT:-900}" "$script" "$@" ;;
  single)
    exec "$python" "$script" "$@" ;;
  *)
    die "ENGINE must be deepspeed, fsdp, ddp or single, not $engine" ;;
esac
