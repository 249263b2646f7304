"""`python -m tokenizer.train`: megatron_lax.data.train_tokenizer's command (see its --help)."""
import sys

from megatron_lax.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
