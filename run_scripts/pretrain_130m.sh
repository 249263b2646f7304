#!/usr/bin/env bash
""":"
# LLaMA-130M pre-training with the paper's recipe (Table 14); CoLA + LaX (identity gate) by default.
#   bash run_scripts/pretrain_130m.sh [--section.key value ...]       (launches DeepSpeed / torchrun)
#   deepspeed run_scripts/pretrain_130m.sh [--section.key value ...]  (the launcher runs this file as Python)
# Environment: METHOD, GATE, ENGINE, ZERO_STAGE, DATA, TOKENIZER, PRECISION, RUN_DIR, HOSTFILE; see megatron_lax/launch.py.
exec bash "$(dirname "$0")/launch.sh" "$0" "$@"
":"""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_lax.launch import main
sys.exit(main("130m"))
