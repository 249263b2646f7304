"""`python -m data_prep.prepare`: megatron_lax.data.prepare's command (see its --help)."""
import sys

from megatron_lax.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
