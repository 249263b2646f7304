#!/usr/bin/env bash
# The first-GPU device check, about 9 minutes on one H100: every stage of benchmarks/gpu_check.py in a
# process of its own under its own time limit; a stage that fails or runs out of time is recorded and
# the rest go on. Everything lands in one folder: STAGE.json, STAGE.log and summary.txt.
#   bash benchmarks/gpu_check.sh [OUT]            (default OUT: gpu_check_<date>)
#   bash benchmarks/gpu_check.sh OUT --dry        the same stages on the CPU at tiny shapes (about a minute)
set -uo pipefail
out=${1:-gpu_check_$(date +%Y%m%d_%H%M%S)}
dry=${2:-}
python=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
: > "$out/summary.txt"
# each stage and its time limit in seconds (STAGES: another list, e.g. to rerun one stage)
stages=${STAGES:-"versions:30 attention:60 throughput_eager:90 throughput_compiled:140 trainer:100 fsdp:90 vit_loader:60"}
failed=0
for entry in $stages; do
  stage=${entry%%:*} limit=${entry##*:}
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$python" "$here/gpu_check.py" "$stage" --out "$out" $dry > "$out/$stage.log" 2>&1
  status=$?
  case $status in
    0) verdict=ok ;;
    124|137) verdict="timed out after ${limit}s" ;;
    *) verdict="failed (exit $status)" ;;
  esac
  [ "$status" = 0 ] || failed=$((failed + 1))
  echo "$stage: $verdict in $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
done
echo "$failed stage(s) failed; results in $out" | tee -a "$out/summary.txt"
