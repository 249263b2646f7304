#!/usr/bin/env bash
# Issue 24's fine-tuning study (docs/FINETUNING.md, "The template study"), end to end: the task
# (data/arithmetic_templates), the study's base, each cell's learning rate chosen on held-out training
# examples (selection seeds 100-101), the reported seeds (1-7: seed 0 chose the task and the length, see
# docs/FINETUNING.md), and the table with paired intervals.
# Resumable: finished runs are skipped. Environment: BASE_STEPS (3000: the base's pre-training steps; 1000
# gives the first study's weaker base), OUT (runs/finetune_templates_base$BASE_STEPS), SEEDS ("1 2 3 4 5 6
# 7"), CELLS (below), STEPS (300), JOBS (2: cells run side by side, one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
base_steps=${BASE_STEPS:-3000}
out=${OUT:-runs/finetune_templates_base$base_steps}
jobs=${JOBS:-2}
steps=${STEPS:-300}
export OMP_NUM_THREADS=1
SECONDS=0
mkdir -p "$out"

[ -f data/arithmetic_templates/test_both.json ] || "$py" -m data_prep.make_arithmetic \
  --output data/arithmetic_templates --train 1200 --test 300 --documents 6000 --max-number 12 --max-factor 6 \
  --kinds add,take_away,compare,multiply --split templates
echo "base model ($out/base: the study's base config, $base_steps steps)"
if [ -f "$out/base/finished.json" ]; then  # a base of another length would be mixed into this study's runs
  "$py" -c 'import json, sys; s = json.load(open(sys.argv[1]))["steps"]; sys.exit(
      0 if s == int(sys.argv[2]) else f"{sys.argv[1]}: the base was trained {s} steps, not BASE_STEPS={sys.argv[2]}; set OUT to another folder")' \
    "$out/base/finished.json" "$base_steps"
fi
[ -f "$out/base/finished.json" ] || OMP_NUM_THREADS=$jobs "$py" -m megatron_lax.train \
  --config configs/finetune_study_base.yaml --logging.run_dir "$out/base" --checkpoint.resume auto \
  --train.steps "$base_steps" \
  > "$out/base.log" 2>&1 || { tail -5 "$out/base.log"; exit 1; }
cells=${CELLS:-"lora_r1 lax_identity_nonorm_r1 lora_r4 lax_identity_r4 lax_linear_r4 lax_identity_nonorm_r4 full"}
common=(--config configs/finetune_templates.yaml --base "$out/base" --set "train.steps=$steps"
        "optim.warmup_steps=$((steps / 10))")
echo "learning rates (adapters 3e-3, 1e-2, 3e-2; full 3e-4, 1e-3, 3e-3; two finalists; seeds 100 101)"
printf '%s\n' $cells | xargs -P "$jobs" -I{} sh -c \
  '"$0" -m megatron_lax.finetune_study tune "$@" --cells {} >> "'"$out"'/tune.{}.log" 2>&1 || echo "{} failed"' \
  "$py" "${common[@]}" --out "$out/tune"
grep -h chosen "$out"/tune.*.log
echo "reported seeds"
printf '%s\n' $cells | xargs -P "$jobs" -I{} sh -c \
  '"$0" -m megatron_lax.finetune_study run "$@" --cells {} >> "'"$out"'/cells.{}.log" 2>&1 || echo "{} failed"' \
  "$py" "${common[@]}" --out "$out/cells" --lrs "$out/tune" --seeds ${SEEDS:-1 2 3 4 5 6 7}
"$py" -m megatron_lax.finetune_study table "$out/cells" --output "$out/table.md"
echo "total time ${SECONDS}s with $jobs jobs of one thread" | tee -a "$out/table.md"
