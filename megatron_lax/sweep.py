"""python -m megatron_lax.sweep: see megatron_lax/experiments/sweep.py."""
from .experiments.sweep import main

if __name__ == "__main__":
    import sys
    sys.exit(main())
