"""python -m megatron_lax.finetune_study: see megatron_lax/experiments/finetune_study.py."""
from .experiments.finetune_study import main

if __name__ == "__main__":
    import sys
    sys.exit(main())
