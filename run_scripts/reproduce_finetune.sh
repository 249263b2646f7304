#!/usr/bin/env bash
# The paper's section-5 comparison at CPU scale (docs/FINETUNING.md): pre-train the small arithmetic
# base, then fine-tune it with LoRA, LaX-LoRA (identity gate) and LaX-LoRA (linear gate), same rank,
# same steps, several seeds each, and compare greedy-answer accuracy on the shipped test problems
# (operands never seen in training problems) with the base model's; also on new problems over the
# training operands (test_seen_operands.json), a diagnostic of what the fine-tunes learned.
#
#   bash run_scripts/reproduce_finetune.sh [--section.key value ...]     (extra overrides for every fine-tune)
#
# Variables: OUT (runs/finetune_arithmetic), BASE (an already trained base, whose accuracy is then not
# measured again; default: train $OUT/base),
# SEEDS ("0 1 2"), GATES ("none identity linear"), JOBS (2: fine-tunes run side by side, one core
# each), PYTHON (python). Writes $OUT/table.md; finished steps (a `done` file) are not repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-runs/finetune_arithmetic}
seeds=${SEEDS:-"0 1 2"}
gates=${GATES:-"none identity linear"}
jobs=${JOBS:-2}
tests=(data/arithmetic/test.json data/arithmetic/test_seen_operands.json)
mkdir -p "$out"
SECONDS=0

step() {  # step DIR COMMAND...: runs once; the log stays in DIR/log
  local dir=$1; shift
  [ -f "$dir/done" ] && return
  mkdir -p "$dir"
  "$@" > "$dir/log" 2>&1 || { echo "error: $* failed, see $dir/log" >&2; tail -5 "$dir/log" >&2; exit 1; }
  touch "$dir/done"
}

[ -f data/arithmetic/test.json ] || "$py" -m data_prep.make_arithmetic --output data/arithmetic
base=${BASE:-$out/base}
echo "base model ($base)"
[ -n "${BASE:-}" ] || step "$base" "$py" -m megatron_lax.train --config configs/finetune_base_arithmetic.yaml \
  --logging.run_dir "$base" --logging.progress false --logging.tensorboard false --checkpoint.resume auto
results=()
if [ -z "${BASE:-}" ]; then
  step "$out/base_accuracy" "$py" -m megatron_lax.finetune_eval evaluate --base "$base" --test "${tests[@]}" \
    --max-new-tokens 40 --output "$out/base_accuracy/accuracy.json" &
  results+=("$out/base_accuracy/accuracy.json")
fi

finetune_and_evaluate() {  # RUN GATE SEED [overrides...]
  local run=$1 gate=$2 seed=$3; shift 3
  step "$run" "$py" -m megatron_lax.finetune --config configs/finetune_arithmetic.yaml --finetune.base "$base" \
    --lora.lax_gate "$gate" --train.seed "$seed" --data.seed "$seed" --logging.run_dir "$run" \
    --logging.progress false --checkpoint.resume auto "$@"
  step "$run/accuracy" "$py" -m megatron_lax.finetune_eval evaluate --checkpoint "$run" --test "${tests[@]}" \
    --output "$run/accuracy/accuracy.json"
}

for seed in $seeds; do
  for gate in $gates; do
    run="$out/gate_$gate/seed$seed"
    echo "fine-tune: lora.lax_gate $gate, seed $seed ($run)"
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
    finetune_and_evaluate "$run" "$gate" "$seed" "$@" &
    results+=("$run/accuracy/accuracy.json")
  done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n; done

"$py" -m megatron_lax.finetune_eval table "${results[@]}" --output "$out/table.md"
times > "$out/times"  # in this shell: the CPU time of every command it ran (children of a $(...) would not count)
echo "seeds: $seeds; total time ${SECONDS}s; CPU time of the commands (user, system): $(tail -1 "$out/times")" \
  | tee -a "$out/table.md"
