#!/usr/bin/env bash
""":"
# ViT-L/16 pre-training on ImageNet-1k with the paper's recipe (Tables 9-10); CoLA + LaX (tensor gate) by default.
#   bash run_scripts/pretrain_vit_l.sh [--section.key value ...]       (launches DeepSpeed / torchrun)
#   deepspeed run_scripts/pretrain_vit_l.sh [--section.key value ...]  (the launcher runs this file as Python)
# Environment: METHOD (dense, svd, cola, tt), GATE, ENGINE, ZERO_STAGE, DATA (ImageNet root: train/, val/ class
# folders), RUN_DIR, HOSTFILE; see megatron_lax/launch.py.
exec bash "$(dirname "$0")/launch.sh" "$0" "$@"
":"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lax.launch import main
sys.exit(main("vit_l"))
