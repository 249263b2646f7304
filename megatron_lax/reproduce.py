"""python -m megatron_lax.reproduce: see megatron_lax/experiments/reproduce.py."""
from .experiments.reproduce import main

if __name__ == "__main__":
    import sys
    sys.exit(main())
