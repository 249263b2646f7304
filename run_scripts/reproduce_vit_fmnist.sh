#!/usr/bin/env bash
# The paper's ViT comparison (Tables 1-2) at CPU scale on Fashion-MNIST (docs/RESULTS.md): full rank,
# SVD, SVD + LaX, CoLA, CoLA + LaX, TT, TT + LaX (inter-layer, intra-layer, both), and the gates of
# Table 2 on SVD at ranks 24 and 12; every variant's learning rate chosen at full length on held-out
# training images, then three other seeds reported on the 10,000 test images. The plan, with every
# setting: configs/reproduce_vit_fmnist.yaml. Needs the Debian package (70,000 images, MIT):
#
#   apt-get update && apt-get install dataset-fashion-mnist
#   bash run_scripts/reproduce_vit_fmnist.sh                                        # the comparison
#   bash run_scripts/reproduce_vit_fmnist.sh --variants svd,svd_lax,svd_lax.identity,svd_lax.linear,svd_lax.dense,svd.r12,svd_lax.r12.identity,svd_lax.r12.linear,svd_lax.r12.tensor,svd_lax.r12.dense   # the gates
#   bash run_scripts/reproduce_vit_fmnist.sh --variants dense,svd,svd_lax,svd.init_cola,svd_lax.init_cola   # the init check
#
# Finished runs are not repeated. Results: runs/reproduce_vit_fmnist/results*.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m megatron_lax.reproduce --plan configs/reproduce_vit_fmnist.yaml "$@"
