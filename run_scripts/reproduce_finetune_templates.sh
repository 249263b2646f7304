#!/usr/bin/env bash
# The LoRA vs LaX-LoRA template study over several pre-trained bases (docs/FINETUNING.md, "The template
# study over several bases", issue 36), end to end from a fresh clone:
#   1. the task (data/arithmetic_templates, with its selection wording select_templates.json), if missing;
#   2. the bases: the study's base config (configs/finetune_study_base.yaml, BASE_STEPS steps) once per base
#      seed (train.seed = data.seed = the base seed: initialisation and data order), one thread each, so that
#      a base does not depend on JOBS: the selection base (SELECTION_BASE) and the reported ones (BASES);
#   3. each cell's learning rate, chosen on the selection base and selection seeds (SELECT_SEEDS) by exact
#      match on the selection wording (SELECT), never on a reported base or a test file;
#   4. every cell with every reported seed (SEEDS) on every reported base, at its chosen rate;
#   5. OUT/table.md: every comparison pooled over bases x seeds (hierarchical bootstrap over bases, seeds
#      and problems; Student's t over the base means) and per base.
# Resumable: finished bases and runs are skipped (an interrupted base resumes from its checkpoint).
# Cost with the defaults, measured on a 2-core VM with JOBS=2 (docs/FINETUNING.md, "The template study over
# several bases"): the 4 bases 1,064-1,151 s each, two at a time; 21 tuning runs and 60 reported runs (~100 s
# each) 4,562 s; about 1.9 hours of wall time, 3.5 CPU-hours.
# Environment: OUT (runs/finetune_bases), BASE_STEPS (3000), SELECTION_BASE (0), BASES ("1 2 3"), SEEDS
# ("1 2 3 4 5"), SELECT_SEEDS ("100 101"), CELLS (below), STEPS (300), RATES ("3e-3 1e-2 3e-2"),
# FULL_RATES ("3e-4 1e-3 3e-3"), SELECT (data/arithmetic_templates/select_templates.json), JOBS (2: runs side
# by side, one thread each), BASE_ARGS (more --section.key value for every base), FT_SET (more KEY=VALUE
# for every fine-tune), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-runs/finetune_bases}
base_steps=${BASE_STEPS:-3000}
selection_base=${SELECTION_BASE:-0}
bases=${BASES:-1 2 3}
jobs=${JOBS:-2}
steps=${STEPS:-300}
select=${SELECT:-data/arithmetic_templates/select_templates.json}
cells=${CELLS:-lora_r4 lax_identity_r4 lax_linear_r4 full}  # also: lora_r1 lax_identity_nonorm_r1 lax_identity_nonorm_r4
seeds=${SEEDS:-1 2 3 4 5}
export OMP_NUM_THREADS=1
SECONDS=0
for b in $bases; do
  [ "$b" != "$selection_base" ] || { echo "BASES must not hold the selection base $selection_base" >&2; exit 1; }
done
mkdir -p "$out/bases"

[ -f "$select" ] || "$py" -m data_prep.make_arithmetic \
  --output data/arithmetic_templates --train 1200 --test 300 --documents 6000 --max-number 12 --max-factor 6 \
  --kinds add,take_away,compare,multiply --split templates

train_base() {  # SEED: OUT/bases/baseSEED, or stop if a base of another length is there
  local dir="$out/bases/base$1"
  if [ -f "$dir/finished.json" ]; then
    "$py" -c 'import json, sys; s = json.load(open(sys.argv[1]))["steps"]; sys.exit(0 if s == int(sys.argv[2]) else
        f"{sys.argv[1]}: the base was trained {s} steps, not BASE_STEPS={sys.argv[2]}; set OUT to another folder")' \
      "$dir/finished.json" "$base_steps"
    return
  fi
  # the log is appended to: a second launch, which the base's run.lock refuses, must not empty a live run's log
  # shellcheck disable=SC2086
  "$py" -m megatron_lax.train --config configs/finetune_study_base.yaml --logging.run_dir "$dir" \
    --checkpoint.resume auto --train.steps "$base_steps" --train.seed "$1" --data.seed "$1" ${BASE_ARGS:-} \
    >> "$dir.log" 2>&1 || { echo "base $1 failed:" >&2; tail -5 "$dir.log" >&2; return 1; }
}
export -f train_base
export py out base_steps
echo "bases (seeds $selection_base $bases, $base_steps steps, one thread each): $out/bases"
for b in $selection_base $bases; do  # a base trained before with another length stops the study here
  [ ! -f "$out/bases/base$b/finished.json" ] || train_base "$b"
done
printf '%s\n' $selection_base $bases | xargs -P "$jobs" -I{} bash -c 'train_base {}'

failed="$out/failed.txt"
rm -f "$failed"
read -r -a ft_set <<< "${FT_SET:-}"
common=(--config configs/finetune_templates.yaml --set "train.steps=$steps" "optim.warmup_steps=$((steps / 10))"
        "${ft_set[@]}")
# shellcheck disable=SC2086
echo "learning rates on base $selection_base, seeds ${SELECT_SEEDS:-100 101}, by exact match on $select"
printf '%s\n' $cells | xargs -P "$jobs" -I{} sh -c \
  '"$0" -m megatron_lax.finetune_study tune "$@" --cells {} >> "'"$out"'/tune.{}.log" 2>&1 || echo "tune {}" >> "'"$failed"'"' \
  "$py" "${common[@]}" --base "$out/bases/base$selection_base" --select "$select" --out "$out/tune" \
  --seeds ${SELECT_SEEDS:-100 101} --rates ${RATES:-3e-3 1e-2 3e-2} --full-rates ${FULL_RATES:-3e-4 1e-3 3e-3}
grep -h chosen "$out"/tune.*.log || true
base_dirs=()
for b in $bases; do base_dirs+=("$out/bases/base$b"); done
run_one() {  # ARGS... SEED CELL: `finetune_study run ARGS` for that seed and cell, on every reported base
  local seed=${@: -2:1} cell=${@: -1}
  "$py" -m megatron_lax.finetune_study run "${@:1:$#-2}" --seeds "$seed" --cells "$cell" >> "$out/cells.$cell.log" 2>&1 \
    || echo "run $cell seed $seed" >> "$failed"
}
export -f run_one
export failed
echo "reported seeds $seeds on bases $bases"
# one job a (seed, cell), seed by seed: the jobs stay balanced, and a study cut short has whole seeds
for s in $seeds; do printf "$s %s\n" $cells; done | xargs -P "$jobs" -L 1 bash -c 'run_one "$@"' _ \
  "${common[@]}" --bases "${base_dirs[@]}" --out "$out/cells" --lrs "$out/tune"
"$py" -m megatron_lax.finetune_study table "$out/cells" --output "$out/table.md"
echo "total time ${SECONDS}s with $jobs jobs of one thread" | tee -a "$out/table.md"
[ ! -f "$failed" ] || { echo "failed (see $out/tune.CELL.log, $out/cells.CELL.log):" >&2; cat "$failed" >&2; exit 1; }
