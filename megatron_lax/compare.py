"""python -m megatron_lax.compare: see megatron_lax/experiments/compare.py."""
from .experiments.compare import main

if __name__ == "__main__":
    import sys
    sys.exit(main())
