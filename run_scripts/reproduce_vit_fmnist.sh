#!/usr/bin/env bash
# The paper's ViT comparison (Table 1) on Fashion-MNIST with models trained near what they reach
# (docs/RESULTS.md, "Vision"): full rank, SVD, SVD + LaX, CoLA, CoLA + LaX, TT, TT + LaX, under the
# official LaX ViT code's initialisation and under `matched`, and the dense ViT with crop and flip; each
# variant's learning rate chosen at full length on 5,000 held-out training images, then three other
# seeds reported on the 10,000 test images. The plan, with every setting and its cost:
# configs/reproduce_vit_fmnist.yaml. Needs the Debian package (70,000 images, MIT):
#
#   apt-get update && apt-get install dataset-fashion-mnist
#   bash run_scripts/reproduce_vit_fmnist.sh                                        # the comparison (days on 2 CPU cores)
#   bash run_scripts/reproduce_vit_fmnist.sh --variants svd,svd_lax,svd_lax.identity,svd_lax.linear,svd_lax.dense   # the gates
#   bash run_scripts/reproduce_vit_fmnist.sh --quick                                # the earlier short protocol (under an hour here)
#
# Finished runs are not repeated. Results: runs/reproduce_vit_fmnist{,_quick}/results*.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m megatron_lax.reproduce --plan configs/reproduce_vit_fmnist.yaml "$@"
