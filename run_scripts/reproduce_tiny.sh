#!/usr/bin/env bash
# Small-scale reproduction of the paper's comparison (Tables 5 and 6) on the shipped sample, on CPU:
# the llama_tiny preset as dense, SVD, SVD + LaX (identity), SVD + LaX (dense gate), CoLA and
# CoLA + LaX (identity), every run on the same tokens. The base learning rate of each method is
# picked by a short sweep; LaX variants train at 10x their base (paper Table 14).
#
#   bash run_scripts/reproduce_tiny.sh [--section.key value ...]     (extra overrides for every run)
#
# Variables: OUT (runs/reproduce_tiny), SEED (0), STEPS (200), SWEEP_STEPS (100),
# BASE_LRS ("1e-3 3e-3 1e-2"), PYTHON (python). Prints the comparison table and writes
# $OUT/comparison.png, $OUT/table.md and $OUT/sweep.md.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
out=${OUT:-runs/reproduce_tiny}
seed=${SEED:-0}
steps=${STEPS:-200}
sweep_steps=${SWEEP_STEPS:-100}
base_lrs=${BASE_LRS:-"1e-3 3e-3 1e-2"}
common=(--config llama_tiny --model.rank 64 --train.global_batch 8 --train.micro_batch 8 --train.seed "$seed"
        --data.seed "$seed" --train.eval_tokens 100000 --train.eval_every 50 --logging.progress false --logging.tensorboard false
        --logging.lax_stats_every 0 "$@")
mkdir -p "$out"
SECONDS=0

train() {  # train RUN_DIR STEPS [overrides...]; a finished run (RUN_DIR/done) is not repeated
  local dir=$1 n=$2; shift 2
  echo "  $dir"
  [ -f "$dir/done" ] && return
  mkdir -p "$dir"
  "$py" -m megatron_lax.train "${common[@]}" --train.steps "$n" --logging.run_dir "$dir" "$@" > "$dir/train.log" 2>&1 \
    || { echo "error: run $dir failed, see $dir/train.log" >&2; tail -5 "$dir/train.log" >&2; exit 1; }
  touch "$dir/done"
}

echo "LR sweep ($sweep_steps steps each):"
for method in dense svd cola; do
  for lr in $base_lrs; do
    train "$out/sweep/${method}_lr$lr" "$sweep_steps" --model.method "$method" --optim.lr "$lr"
  done
done
best_lr() { basename "$("$py" -m megatron_lax.compare "$out"/sweep/"$1"_lr* --best)" | sed "s/^$1_lr//"; }
dense_lr=$(best_lr dense); svd_lr=$(best_lr svd); cola_lr=$(best_lr cola)
times10() { "$py" -c "print(f'{10 * float(\"$1\"):g}')"; }
"$py" -m megatron_lax.compare "$out"/sweep/* --output "$out/sweep.png" > "$out/sweep.md"
echo "chosen base LRs: dense $dense_lr, SVD $svd_lr, CoLA $cola_lr (LaX: 10x)" | tee -a "$out/sweep.md"

echo "Runs ($steps steps each):"
train "$out/dense" "$steps" --model.method dense --optim.lr "$dense_lr"
train "$out/svd" "$steps" --model.method svd --optim.lr "$svd_lr"
train "$out/svd_lax_identity" "$steps" --model.method svd --model.lax_gate identity --optim.lr "$(times10 "$svd_lr")"
train "$out/svd_lax_dense" "$steps" --model.method svd --model.lax_gate dense --optim.lr "$(times10 "$svd_lr")"
train "$out/cola" "$steps" --model.method cola --optim.lr "$cola_lr"
train "$out/cola_lax_identity" "$steps" --model.method cola --model.lax_gate identity --optim.lr "$(times10 "$cola_lr")"

"$py" -m megatron_lax.compare "$out/dense" "$out/svd" "$out/svd_lax_identity" "$out/svd_lax_dense" "$out/cola" \
  "$out/cola_lax_identity" --output "$out/comparison.png" | tee "$out/table.md"
echo "seed $seed; $steps steps of 8 x 256 tokens per run; total time ${SECONDS}s" | tee -a "$out/table.md"
