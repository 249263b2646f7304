#!/usr/bin/env bash
# The LoRA vs LaX-LoRA study (docs/FINETUNING.md, "The study"), end to end, on one CPU thread:
#   the task (data/arithmetic_study), the base (pre-trained on the task's narrative text), the probe of
#   the base, every cell x seed (fine-tune, exact match, teacher-forced losses), the table.
# Resumable: finished steps are skipped. Environment: OUT (runs/finetune_study), SEEDS ("0 1 2 3 4"),
# CELLS (below; e.g. CELLS="lora_r2 lax_identity_r2 lax_linear_r2" adds rank 2).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-runs/finetune_study}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SECONDS=0

[ -f data/arithmetic_study/test.json ] || "$py" -m data_prep.make_arithmetic --output data/arithmetic_study \
  --train 1200 --test 200 --documents 6000 --max-number 12 --max-factor 6 --kinds add,take_away,compare,multiply \
  --split pairs
echo "base model ($out/base)"
[ -f "$out/base/finished.json" ] || "$py" -m megatron_lax.train --config configs/finetune_study_base.yaml \
  --logging.run_dir "$out/base" --checkpoint.resume auto > "$out.base.log" 2>&1 || { tail -5 "$out.base.log"; exit 1; }
echo "probe of the base"
[ -f "$out/probe.json" ] || "$py" -m megatron_lax.finetune_study probe --base "$out/base" --output "$out/probe.json" \
  | grep -E '"(copy|fact|items)"'
# At rank 1 the LayerNorm of LaX makes every gate and latent the same constant adapter (a LayerNorm
# over one feature outputs its bias), so rank 1 compares LoRA with LaX-LoRA with and without it, and
# rank 4 carries the gates and latents. Rank 2 is left out: the CPU hour of the study does not hold it.
cells="lora_r1 lax_linear_r1 lax_identity_nonorm_r1 lax_linear_nonorm_r1
  lora_r4 lax_identity_r4 lax_linear_r4 lax_identity_projection_r4 lax_linear_projection_r4 full"
echo "cells"
"$py" -m megatron_lax.finetune_study run --config configs/finetune_study.yaml --base "$out/base" --out "$out/cells" \
  --seeds ${SEEDS:-0 1 2 3 4} --cells ${CELLS:-$cells}
"$py" -m megatron_lax.finetune_study table "$out/cells" --output "$out/table.md"
times > "$out/times"
echo "total time ${SECONDS}s; CPU time of the commands (user, system): $(tail -1 "$out/times")" | tee -a "$out/table.md"
